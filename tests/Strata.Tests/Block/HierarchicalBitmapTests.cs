using System.Security.Cryptography;
using Strata.Block.Bitmaps;

namespace Strata.Tests.Block;

/// <summary>The hierarchical bitmap against a plain bool[] over random operation sequences.</summary>
public class HierarchicalBitmapTests
{
    [Theory]
    [InlineData(1, 1)]
    [InlineData(63, 2)]
    [InlineData(64, 3)]
    [InlineData(65, 4)]
    [InlineData(4097, 5)]
    [InlineData(300_000, 6)]
    [InlineData(2_000_000, 7)]
    public void MatchesABoolArrayModel(long length, int seed)
    {
        var rng = new Random(seed);
        var bm = new HierarchicalBitmap(length);
        var model = new bool[length];
        var other = new HierarchicalBitmap(length);
        var otherModel = new bool[length];
        for (int op = 0; op < 300; op++)
        {
            long start = rng.NextInt64(length);
            long count = Math.Min(length - start, rng.Next(4) == 0 ? rng.NextInt64(length) + 1 : rng.Next(1, 200));
            switch (rng.Next(7))
            {
                case 0:
                case 1:
                    bm.SetRange(start, count);
                    Array.Fill(model, true, (int)start, (int)count);
                    break;
                case 2:
                    bm.ResetRange(start, count);
                    Array.Fill(model, false, (int)start, (int)count);
                    break;
                case 3:
                    other.SetRange(start, count);
                    Array.Fill(otherModel, true, (int)start, (int)count);
                    break;
                case 4:
                    bm.Merge(other);
                    for (long i = 0; i < length; i++) model[i] |= otherModel[i];
                    break;
                case 5:
                    if (rng.Next(10) == 0) { bm.Clear(); Array.Clear(model); }
                    break;
                default:
                    long probe = rng.NextInt64(length);
                    Assert.Equal(model[probe], bm.Get(probe));
                    Assert.Equal(Expect(model, probe, true), bm.NextSet(probe));
                    Assert.Equal(Expect(model, probe, false), bm.NextClear(probe));
                    break;
            }
            Assert.Equal(model.LongCount(b => b), bm.Count);
        }
        // Runs and serialisation agree with the model.
        var runs = bm.SetRuns().ToList();
        var fromRuns = new bool[length];
        foreach (var (s, c) in runs) Array.Fill(fromRuns, true, (int)s, (int)c);
        Assert.Equal(model, fromRuns);
        for (int i = 1; i < runs.Count; i++) Assert.True(runs[i].Start > runs[i - 1].Start + runs[i - 1].Count, "runs are maximal");
        var bytes = new byte[bm.SerializedWordBytes];
        bm.CopyBytes(0, bytes);
        for (long i = 0; i < length; i++) Assert.Equal(model[i], (bytes[i / 8] & (1 << (int)(i % 8))) != 0);
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(bytes)), bm.Sha256());
        var back = new HierarchicalBitmap(length);
        back.OrBytes(0, bytes);
        Assert.Equal(bm.Sha256(), back.Sha256());
        Assert.Equal(bm.Count, back.Count);
    }

    private static long Expect(bool[] model, long from, bool value)
    {
        for (long i = from; i < model.Length; i++) if (model[i] == value) return i;
        return -1;
    }

    [Fact]
    public void EmptyHashMatchesQemu()
    {
        // 64 MiB at 64 KiB: 1024 bits, 128 zero bytes (qemu-spec §2.5).
        Assert.Equal("38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca", new HierarchicalBitmap(1024).Sha256());
    }

    [Fact]
    public void ATerabyteAtSixtyFourKiBIsSmallWhenEmptyAndUnderTwoPointOneMiBWhenFull()
    {
        var bm = new HierarchicalBitmap((1L << 40) / 65536);
        Assert.True(bm.MemoryBytes <= 24 << 10, $"empty: {bm.MemoryBytes} (QEMU: 24 KiB)");
        bm.SetRange(0, bm.Length);
        Assert.Equal(bm.Length, bm.Count);
        Assert.True(bm.MemoryBytes <= 2.1 * (1 << 20), $"full: {bm.MemoryBytes}");
        bm.ResetRange(12345, 1);
        Assert.Equal(12345, bm.NextClear(0));
        bm.Clear();
        Assert.Equal(-1, bm.NextSet(0));
    }
}
