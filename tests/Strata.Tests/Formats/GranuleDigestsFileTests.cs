using System.Buffers.Binary;
using System.Security.Cryptography;
using Strata.Formats.Backup;

namespace Strata.Tests.Formats;

public class GranuleDigestsFileTests
{
    private static GranuleDigests Sample()
    {
        // 3 granules of 64 KiB and a short last one of 4 KiB.
        var d = new GranuleDigests(3 * 65536 + 4096, 65536);
        for (int i = 0; i < d.Count; i++) d.Set(i, Enumerable.Range(0, 16).Select(b => (byte)(i * 16 + b)).ToArray());
        return d;
    }

    [Fact]
    public void TheHeaderLayoutIsFrozen()
    {
        var file = GranuleDigestsFile.Serialize(Sample());
        Assert.Equal(40 + 4 * 16, file.Length);
        Assert.Equal("STRATAGD"u8.ToArray(), file[..8]);
        Assert.Equal(1u, BinaryPrimitives.ReadUInt32LittleEndian(file.AsSpan(8)));
        Assert.Equal((ushort)1, BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(12)));
        Assert.Equal((ushort)16, BinaryPrimitives.ReadUInt16LittleEndian(file.AsSpan(14)));
        Assert.Equal(3 * 65536 + 4096, BinaryPrimitives.ReadInt64LittleEndian(file.AsSpan(16)));
        Assert.Equal(65536, BinaryPrimitives.ReadInt64LittleEndian(file.AsSpan(24)));
        Assert.Equal(4, BinaryPrimitives.ReadInt64LittleEndian(file.AsSpan(32)));
        // Granule 2's digest is bytes 32..47, at 40 + 2 × 16.
        Assert.Equal(Enumerable.Range(32, 16).Select(b => (byte)b).ToArray(), file.AsSpan(72, 16).ToArray());
    }

    [Fact]
    public void ParseReadsBackWhatSerializeWrote()
    {
        var d = Sample();
        var back = GranuleDigestsFile.Parse(GranuleDigestsFile.Serialize(d));
        Assert.Equal(d.DiskSize, back.DiskSize);
        Assert.Equal(d.Granularity, back.Granularity);
        Assert.Equal(4, back.Count);
        Assert.Empty(back.Differences(d));
        Assert.Equal(4096, back.LengthOf(3));
        Assert.Equal(3 * 65536, back.OffsetOf(3));
    }

    [Fact]
    public void AnEmptyDiskHasNoGranules()
    {
        var back = GranuleDigestsFile.Parse(GranuleDigestsFile.Serialize(new GranuleDigests(0, 65536)));
        Assert.Equal(0, back.Count);
    }

    public static TheoryData<string, Action<byte[]>, string> Damage => new()
    {
        { "magic", f => f[0] = (byte)'X', "not a digests file" },
        { "version", f => f[8] = 2, "version 2 is not supported" },
        { "hash", f => f[12] = 7, "unknown digest: hash 7" },
        { "digest size", f => f[14] = 32, "of 32 bytes" },
        { "granularity not a power of two", f => BinaryPrimitives.WriteInt64LittleEndian(f.AsSpan(24), 65535), "granularity 65535 is not a power of two" },
        { "granularity too small", f => BinaryPrimitives.WriteInt64LittleEndian(f.AsSpan(24), 256), "granularity 256" },
        { "negative size", f => BinaryPrimitives.WriteInt64LittleEndian(f.AsSpan(16), -1), "negative" },
        { "count", f => BinaryPrimitives.WriteInt64LittleEndian(f.AsSpan(32), 5), "5 granules recorded, but a 200704-byte disk at 65536 bytes has 4" },
        { "size grown", f => BinaryPrimitives.WriteInt64LittleEndian(f.AsSpan(16), 10 * 65536), "has 10" },
    };

    [Theory]
    [MemberData(nameof(Damage))]
    public void DamagedHeadersAreRefusedWithTheReason(string what, Action<byte[]> damage, string message)
    {
        var file = GranuleDigestsFile.Serialize(Sample());
        damage(file);
        var e = Assert.Throws<GranuleDigestsFormatException>(() => GranuleDigestsFile.Parse(file));
        Assert.True(e.Message.Contains(message, StringComparison.Ordinal), $"{what}: {e.Message}");
    }

    [Theory]
    [InlineData(0)]
    [InlineData(39)]
    public void ShortFilesAreRefused(int length)
    {
        Assert.Throws<GranuleDigestsFormatException>(() => GranuleDigestsFile.Parse(GranuleDigestsFile.Serialize(Sample()).AsSpan(0, length)));
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(1)]
    public void ABodyOfTheWrongLengthIsRefused(int delta)
    {
        var file = GranuleDigestsFile.Serialize(Sample());
        var e = Assert.Throws<GranuleDigestsFormatException>(() => GranuleDigestsFile.Parse(file.AsSpan(0, file.Length + Math.Min(0, delta)).ToArray().Concat(new byte[Math.Max(0, delta)]).ToArray()));
        Assert.Contains("4 granules need 64", e.Message);
    }

    [Fact]
    public void TheDigestIsSha256CutTo16BytesAndZerosNeedNoBuffer()
    {
        var data = new byte[65536];
        new Random(3).NextBytes(data);
        Assert.Equal(SHA256.HashData(data)[..16], GranuleDigests.Hash(data));
        Assert.Equal(SHA256.HashData(new byte[65536])[..16], GranuleDigests.ZeroDigest(65536));
        Assert.Equal(SHA256.HashData(new byte[200000])[..16], GranuleDigests.ZeroDigest(200000));
        Assert.Equal(SHA256.HashData(new byte[4096])[..16], GranuleDigests.ZeroDigest(4096));
    }

    [Fact]
    public void AHugeDiskGetsCoarserGranulesSoOneSetHoldsThem()
    {
        Assert.Equal(65536, GranuleDigests.GranularityFor(4L << 40, 65536));
        long g = GranuleDigests.GranularityFor(64L << 40, 65536);
        Assert.Equal(1 << 20, g);
        Assert.True(GranuleDigests.CountFor(64L << 40, g) <= GranuleDigests.MaxCount);
        Assert.Throws<ArgumentOutOfRangeException>(() => GranuleDigests.CountFor(64L << 40, 65536));
    }
}
