using System.Buffers.Binary;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Block;

/// <summary>Persistent bitmaps: store/load round trips, and corrupt directories refused without losing the data.</summary>
public class BitmapPersistenceTests
{
    private static string MakeImage(TempDir dir, int bitmaps = 2)
    {
        string path = dir["b.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 8 << 20, ClusterSize = 4096 }))
        {
            for (int i = 0; i < bitmaps; i++) img.Bitmaps.Add($"bm{i}", 4096 << i, persistent: true);
            img.Write(0, Enumerable.Repeat((byte)0xab, 20000).ToArray());
            img.Write(5 << 20, new byte[] { 1 });
        }
        return path;
    }

    [Fact]
    public void StoredBitmapsComeBackWithTheirBitsAndFlags()
    {
        using var dir = new TempDir();
        string path = MakeImage(dir);
        string hash;
        using (var img = ImageOpener.Open(path, readOnly: false))
        {
            var b = img.Bitmaps.Get("bm0");
            Assert.Equal(5 * 4096 + 4096, b.CountBytes);
            img.Bitmaps.Disable("bm1");
            hash = b.Bits.Sha256();
        }
        using var ro = (Qcow2Image)ImageOpener.Open(path);
        Assert.Equal(hash, ro.Bitmaps.Get("bm0").Bits.Sha256());
        Assert.True(ro.Bitmaps.Get("bm0").Enabled);
        Assert.False(ro.Bitmaps.Get("bm1").Enabled);
        Assert.True(ro.Bitmaps.Get("bm0").ReadOnly);
        var report = ro.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void SwitchingToReadOnlyStoresTheBitmapsAndRefusesWrites()
    {
        using var dir = new TempDir();
        string path = MakeImage(dir);
        using var img = ImageOpener.Open(path, readOnly: false);
        img.Write(7 << 20, new byte[] { 2 });
        string hash = img.Bitmaps.Get("bm0").Bits.Sha256();
        img.SwitchToReadOnly();
        Assert.True(img.ReadOnly);
        Assert.True(img.Bitmaps.Get("bm0").ReadOnly);
        Assert.Throws<BlockException>(() => img.Write(0, new byte[] { 3 }));
        // Still open, yet another reader finds the bitmaps stored and consistent, with the last write in them.
        using var other = ImageOpener.Open(path);
        Assert.False(other.Bitmaps.Get("bm0").Inconsistent);
        Assert.Equal(hash, other.Bitmaps.Get("bm0").Bits.Sha256());
        var report = ((Qcow2Image)other).Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void AReadWriteOpenMarksBitmapsInUseUntilClosed()
    {
        using var dir = new TempDir();
        string path = MakeImage(dir);
        using (var img = ImageOpener.Open(path, readOnly: false))
        {
            // While open read-write, another reader sees them in use (inconsistent), as after a crash.
            using var other = ImageOpener.Open(path);
            Assert.True(other.Bitmaps.Get("bm0").Inconsistent);
        }
        using var after = ImageOpener.Open(path);
        Assert.False(after.Bitmaps.Get("bm0").Inconsistent);
    }

    [Fact]
    public void RemovingTheLastBitmapDropsTheExtensionAndAutoclearBit()
    {
        using var dir = new TempDir();
        string path = MakeImage(dir, bitmaps: 1);
        using (var img = ImageOpener.Open(path, readOnly: false)) img.Bitmaps.Remove("bm0");
        using var ro = (Qcow2Image)ImageOpener.Open(path);
        Assert.Null(ro.Extras.Find(Qcow2ExtensionType.Bitmaps));
        Assert.Equal(Qcow2AutoclearFeatures.None, ro.Header.AutoclearFeatures & Qcow2AutoclearFeatures.Bitmaps);
        var report = ro.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void BitmapOperationsFollowQemusRules()
    {
        var set = new BitmapSet(1 << 20, 65536);
        set.Add("a");
        Assert.Equal("Bitmap already exists: a", Assert.Throws<BitmapException>(() => set.Add("a")).Message);
        Assert.Equal("Bitmap name cannot be empty", Assert.Throws<BitmapException>(() => set.Add("")).Message);
        Assert.Equal("Granularity must be power of 2 and at least 512", Assert.Throws<BitmapException>(() => set.Add("g", 1000)).Message);
        Assert.StartsWith("Bitmap name too long", Assert.Throws<BitmapException>(() => set.Add(new string('n', 1024))).Message);
        Assert.Contains("not found", Assert.Throws<BitmapException>(() => set.Clear("zz")).Message);
        Assert.Throws<BitmapException>(() => set.Add("p", persistent: true)); // no store configured: not supported
        set.MarkDirty(0, 1);
        var a = set.Get("a");
        var successor = set.CreateSuccessor(a);
        Assert.True(a.Busy);
        Assert.True(a.Recording); // frozen, with a recording successor
        Assert.Contains("in use", Assert.Throws<BitmapException>(() => set.Clear("a")).Message);
        set.MarkDirty(512 << 10, 1);
        Assert.Equal(65536, a.CountBytes);
        Assert.Equal(65536, successor.CountBytes);
        set.Reclaim(a);
        Assert.Equal(2 * 65536, a.CountBytes); // failure: nothing lost
        set.CreateSuccessor(a);
        set.MarkDirty(768 << 10, 1);
        set.Abdicate(a);
        Assert.Equal(65536, a.CountBytes); // success: only writes since the job started
        Assert.False(a.Busy);
        // Merge across granularities: a 64 KiB bit sets sixteen 4 KiB bits.
        set.Add("fine", 4096);
        set.Merge("fine", [a]);
        Assert.Equal(65536, set.Get("fine").CountBytes);
        Assert.Equal(16, set.Get("fine").Bits.Count);
        var other = new BitmapSet(2 << 20, 65536);
        var big = other.Add("big");
        Assert.Contains("different sizes", Assert.Throws<BitmapException>(() => set.Merge("a", [big])).Message);
    }

    public static TheoryData<string, int, byte[]> Corruptions => new()
    {
        { "table past EOF", 0, new byte[] { 0, 0, 0, 0, 0x10, 0, 0, 0 } },
        { "name not UTF-8", 24, new byte[] { 0xff, 0xfe } },
        { "extra data", 20, new byte[] { 0, 0, 0, 8 } },
    };

    /// <summary>Entries QEMU's open refuses outright (qemu-img info too): "doesn't satisfy the constraints".</summary>
    public static TheoryData<string, int, byte[]> ConstraintViolations => new()
    {
        { "type", 16, new byte[] { 2 } },
        { "granularity bits", 17, new byte[] { 40 } },
        { "unknown flag", 12, new byte[] { 0, 0, 0, 4 } },
        { "reserved flags", 12, new byte[] { 0, 0, 0, 8 } },
        { "table unaligned", 6, new byte[] { 0x10, 0x08 } },
        { "table size zero", 8, new byte[] { 0, 0, 0, 0 } },
    };

    /// <summary>An image with bitmaps whose directory has <paramref name="bytes"/> written at
    /// <paramref name="fieldOffset"/> of its first entry.</summary>
    private static string MakeImageWithDirectoryPatched(TempDir dir, int fieldOffset, byte[] bytes)
    {
        string path = MakeImage(dir);
        long dirOffset;
        using (var img = (Qcow2Image)ImageOpener.Open(path))
            dirOffset = (long)BitmapsExtension.Parse(img.Extras.Find(Qcow2ExtensionType.Bitmaps)!.Data).DirectoryOffset;
        using (var f = File.OpenWrite(path))
        {
            f.Position = dirOffset + fieldOffset;
            f.Write(bytes);
        }
        return path;
    }

    [Theory]
    [MemberData(nameof(ConstraintViolations))]
    public void EntriesBreakingQemusConstraintsMakeTheOpenFailInEveryMode(string what, int fieldOffset, byte[] bytes)
    {
        using var dir = new TempDir();
        string path = MakeImageWithDirectoryPatched(dir, fieldOffset, bytes);
        foreach (bool readOnly in new[] { true, false })
        {
            var e = Assert.Throws<BlockException>(() => ImageOpener.Open(path, readOnly: readOnly));
            Assert.True(e.Message.EndsWith("doesn't satisfy the constraints", StringComparison.Ordinal), $"{what}: {e.Message}");
        }
    }

    [Theory]
    [MemberData(nameof(Corruptions))]
    public void CorruptDirectoriesAreReportedAndTheDataStaysReadable(string what, int fieldOffset, byte[] bytes)
    {
        using var dir = new TempDir();
        string path = MakeImageWithDirectoryPatched(dir, fieldOffset, bytes);
        using (var ro = (Qcow2Image)ImageOpener.Open(path))
        {
            Assert.NotEmpty(ro.BitmapLoadErrors);
            var buf = new byte[20000];
            ro.Read(0, buf);
            Assert.All(buf, b => Assert.Equal(0xab, b));
            var report = ro.Check(RepairMode.None);
            Assert.True(report.Corruptions > 0, what);
            Assert.Contains(report.Messages, m => m.Contains("bitmap", StringComparison.OrdinalIgnoreCase));
        }
        var e = Assert.Throws<BlockException>(() => ImageOpener.Open(path, readOnly: false));
        Assert.Contains("bitmap", e.Message, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public void TooManyBitmapsInTheExtensionIsRefused()
    {
        using var dir = new TempDir();
        string path = MakeImage(dir);
        using (var img = (Qcow2Image)ImageOpener.Open(path))
        {
            var bx = BitmapsExtension.Parse(img.Extras.Find(Qcow2ExtensionType.Bitmaps)!.Data);
            Assert.Equal(2u, bx.NbBitmaps);
        }
        // nb_bitmaps lives in the extension data right after its 8-byte head at offset 112 + the other extensions.
        var raw = File.ReadAllBytes(path);
        int pos = 112;
        while (BinaryPrimitives.ReadUInt32BigEndian(raw.AsSpan(pos)) != (uint)Qcow2ExtensionType.Bitmaps)
            pos += 8 + ((int)BinaryPrimitives.ReadUInt32BigEndian(raw.AsSpan(pos + 4)) + 7 & ~7);
        BinaryPrimitives.WriteUInt32BigEndian(raw.AsSpan(pos + 8), 70000);
        File.WriteAllBytes(path, raw);
        using var ro = (Qcow2Image)ImageOpener.Open(path);
        Assert.Contains(ro.BitmapLoadErrors, m => m.Contains("number of bitmaps"));
    }
}
