using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Block;

/// <summary>
/// Property tests: random writes, zero writes and discards through the qcow2 driver, checked against a plain
/// byte array after every step batch and after reopening; the driver's own check must find the image clean.
/// </summary>
public class Qcow2ModelTests
{
    public static TheoryData<int, int, int> Cases => new()
    {
        { 512, 1, 4 << 20 },
        { 4096, 2, 8 << 20 },
        { 65536, 3, 16 << 20 },
        { 2 << 20, 4, 16 << 20 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void RandomOperationsMatchAByteArray(int clusterSize, int seed, int size)
    {
        using var dir = new TempDir();
        var model = new byte[size];
        var rng = new Random(seed);
        string path = dir["a.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }).Dispose();
        for (int round = 0; round < 3; round++)
        {
            using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
            {
                for (int op = 0; op < 60; op++)
                {
                    long off = rng.NextInt64(size / 512) * 512;
                    int len = (int)Math.Min(size - off, rng.Next(1, 1 + 3 * clusterSize / 512 + 16) * 512);
                    switch (rng.Next(6))
                    {
                        case 0:
                            img.WriteZeroes(off, len, mayUnmap: rng.Next(2) == 0);
                            Array.Clear(model, (int)off, len);
                            break;
                        case 1:
                            img.Discard(off, len);
                            // Discard of whole clusters reads back as zeros (no backing); partial ones are advisory.
                            long first = (off + clusterSize - 1) / clusterSize * clusterSize;
                            long end = off + len == size ? size : (off + len) / clusterSize * clusterSize;
                            if (end > first) Array.Clear(model, (int)first, (int)(end - first));
                            break;
                        default:
                            var data = new byte[len];
                            rng.NextBytes(data);
                            img.Write(off, data);
                            data.CopyTo(model, off);
                            break;
                    }
                    if (op % 20 == 19) img.Flush();
                }
                AssertReads(img, model);
            }
            using var check = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true);
            AssertReads(check, model);
            var report = check.Check(RepairMode.None);
            Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
        }
    }

    private static void AssertReads(BlockImage img, byte[] model)
    {
        var buf = new byte[model.Length];
        img.Read(0, buf);
        int diff = buf.AsSpan().CommonPrefixLength(model);
        Assert.True(diff == model.Length, $"first difference at byte {diff}");
    }

    [Fact]
    public void TheRefcountCacheStaysWithinItsBoundOverALargeImage()
    {
        using var dir = new TempDir();
        string path = dir["big.qcow2"];
        const int cluster = 512; // one refcount block covers 256 clusters: 8 MiB of data needs over 64 of them
        const long size = 8 << 20;
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = cluster }).Dispose();
        var options = new Qcow2OpenOptions { L2CacheBytes = 16 << 10 }; // room for 8 refcount blocks
        int most = 0;
        var data = new byte[64 << 10];
        using (var img = Qcow2Image.Open(HostFile.Open(path, readOnly: false), options))
        {
            for (long pos = 0; pos < size; pos += data.Length)
            {
                data.AsSpan().Fill((byte)(pos >> 16));
                img.Write(pos, data);
                if ((pos >> 16) % 4 == 3) img.Flush();
                most = Math.Max(most, img.CachedRefcountBlocks);
            }
            Assert.True(most <= 16, $"the refcount cache grew to {most} blocks");
        }
        using var check = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true);
        var read = new byte[data.Length];
        for (long pos = 0; pos < size; pos += read.Length)
        {
            check.Read(pos, read);
            Assert.All(read, b => Assert.Equal((byte)(pos >> 16), b));
        }
        var report = check.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void GrowsTheRefcountTableWhenTheImageOutgrowsIt()
    {
        // 512-byte clusters: one refcount table cluster covers 64 blocks of 256 clusters = 8 MiB of file.
        using var dir = new TempDir();
        string path = dir["grow.qcow2"];
        long size = 32 << 20;
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = 512 }))
        {
            var data = new byte[1 << 20];
            for (long off = 0; off < size; off += data.Length)
            {
                data.AsSpan().Fill((byte)(off >> 20));
                img.Write(off, data);
            }
            Assert.True(img.Header.RefcountTableClusters > 1);
        }
        using var ro = (Qcow2Image)ImageOpener.Open(path, "qcow2");
        var report = ro.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
        var buf = new byte[512];
        ro.Read(31L << 20, buf);
        Assert.All(buf, b => Assert.Equal(31, b));
    }

    [Fact]
    public void BackingChainReadsFallThroughAndPartialWritesCopyOnWrite()
    {
        using var dir = new TempDir();
        Qcow2Image.Create(dir["base.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = 4096 }).Dispose();
        using (var b = ImageOpener.Open(dir["base.qcow2"], readOnly: false))
            b.Write(0, Enumerable.Repeat((byte)0x11, 1 << 20).ToArray());
        Qcow2Image.Create(dir["mid.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = 4096, BackingFile = "base.qcow2", BackingFormat = "qcow2" }).Dispose();
        using (var m = ImageOpener.Open(dir["mid.qcow2"], readOnly: false))
            m.Write(8192, new byte[] { 0x22, 0x22 });
        Qcow2Image.Create(dir["top.qcow2"], new Qcow2CreateOptions { Size = 2 << 20, ClusterSize = 65536, BackingFile = "mid.qcow2", BackingFormat = "qcow2" }).Dispose();
        using var top = ImageOpener.Open(dir["top.qcow2"], readOnly: false);
        top.Write(100, new byte[] { 0x33 });
        var buf = new byte[2 << 20];
        top.Read(0, buf);
        Assert.Equal(0x11, buf[0]);
        Assert.Equal(0x33, buf[100]);
        Assert.Equal(0x22, buf[8193]);
        Assert.Equal(0x11, buf[8194]);
        Assert.Equal(0x11, buf[(1 << 20) - 1]);
        Assert.Equal(0, buf[1 << 20]); // past the end of the shorter backing file
        var ext = ChainStatus.Get(top, 8192, 4096);
        Assert.Equal(0, ext.Depth); // the top's cluster 0 covers it now (copy-on-write)
        var deep = ChainStatus.Get(top, 65536 + 8192, 4096);
        Assert.Equal(2, deep.Depth);
    }

    [Fact]
    public void RefusesBackingLoops()
    {
        using var dir = new TempDir();
        Qcow2Image.Create(dir["a.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, BackingFile = "b.qcow2", BackingFormat = "qcow2" }).Dispose();
        Qcow2Image.Create(dir["b.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, BackingFile = "a.qcow2", BackingFormat = "qcow2" }).Dispose();
        var e = Assert.Throws<BackingChainException>(() => ImageOpener.Open(dir["a.qcow2"]));
        Assert.Contains("loop", e.Message);
    }

    [Fact]
    public void CompressedClustersRoundTripWithBothCodecs()
    {
        foreach (var type in new[] { Qcow2CompressionType.Deflate, Qcow2CompressionType.Zstd })
        {
            using var dir = new TempDir();
            string path = dir["c.qcow2"];
            var content = new byte[4 << 16];
            for (int i = 0; i < content.Length; i++) content[i] = (byte)(i / 1000);
            using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = content.Length, CompressionType = type }))
                for (int c = 0; c < 4; c++) img.WriteCompressed(c << 16, content.AsSpan(c << 16, 1 << 16));
            using var ro = (Qcow2Image)ImageOpener.Open(path);
            var buf = new byte[content.Length];
            ro.Read(0, buf);
            Assert.Equal(content, buf);
            var report = ro.Check(RepairMode.None);
            Assert.Equal(4, report.CompressedClusters);
            Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
        }
    }

    [Fact]
    public void ResizeGrowsTheL1AndShrinkFreesClusters()
    {
        using var dir = new TempDir();
        string path = dir["r.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 1 << 20, ClusterSize = 512 }))
        {
            img.Write(0, new byte[1 << 20]);
            img.Write(0, Enumerable.Repeat((byte)7, 1 << 20).ToArray());
            img.Resize(64 << 20);
            img.Write((64 << 20) - 512, Enumerable.Repeat((byte)9, 512).ToArray());
            img.Resize(512 << 10);
        }
        using var ro = (Qcow2Image)ImageOpener.Open(path);
        Assert.Equal(512 << 10, ro.Size);
        var report = ro.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }
}

public class Qcow2ConcurrencyTests
{
    [Fact]
    public void ParallelWritersSharingClustersLoseNothing()
    {
        // Four threads write disjoint sectors that share clusters, so allocations of the same cluster race.
        using var dir = new TempDir();
        const int size = 8 << 20, sector = 512;
        using (var img = Qcow2Image.Create(dir["p.qcow2"], new Qcow2CreateOptions { Size = size, ClusterSize = 4096 }))
        {
            var threads = Enumerable.Range(0, 4).Select(t => new Thread(() =>
            {
                var rng = new Random(t);
                var order = Enumerable.Range(0, size / sector).Where(s => s % 4 == t).OrderBy(_ => rng.Next()).ToArray();
                var buf = new byte[sector];
                foreach (int s in order)
                {
                    buf.AsSpan().Fill((byte)(s % 251 + 1));
                    img.Write((long)s * sector, buf);
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
        }
        using var ro = (Qcow2Image)ImageOpener.Open(dir["p.qcow2"]);
        var all = new byte[size];
        ro.Read(0, all);
        for (int s = 0; s < size / sector; s++)
            Assert.True(all.AsSpan(s * sector, sector).IndexOfAnyExcept((byte)(s % 251 + 1)) < 0, $"sector {s}");
        var report = ro.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }
}
