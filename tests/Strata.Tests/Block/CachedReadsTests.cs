using System.Runtime.InteropServices;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>
/// Cached-only reads: what is in memory (page cache, L2 cache) is read without waiting and reads right; whatever could
/// block — a cold L2 table, a page not in memory, a node that is no host file, a hook — gives up before it does
/// anything, and the normal read then works as ever.
/// </summary>
public partial class CachedReadsTests : IDisposable
{
    private const int Cluster = 65536;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static bool TryRead(BlockImage image, long offset, byte[] into) =>
        CachedReads.TryRun(image, (offset, into), static (i, a) => i.Read(a.offset, a.into));

    private string WrittenQcow2()
    {
        string path = _dir["d.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 16 * Cluster }).Dispose();
        using var image = ImageOpener.Open(path, "qcow2", readOnly: false);
        image.Write(3 * Cluster, MemoryImage.Filled(0x5a, Cluster));
        image.Flush();
        return path;
    }

    [Fact]
    public void WhatIsInMemoryIsReadAndAColdL2TableGivesUpUntilANormalReadLoadsIt()
    {
        string path = WrittenQcow2();
        using var image = ImageOpener.Open(path, "qcow2", readOnly: true);
        var buffer = new byte[Cluster];
        // Freshly opened: the L2 table is not in memory, and loading it could wait.
        Assert.False(TryRead(image, 3 * Cluster, buffer));
        Assert.Equal(new byte[Cluster], buffer);
        image.Read(3 * Cluster, buffer);
        Assert.Equal(MemoryImage.Filled(0x5a, Cluster), buffer);
        // Now it is, and the file's pages were just read: served from memory, the same bytes.
        Array.Clear(buffer);
        Assert.True(TryRead(image, 3 * Cluster, buffer));
        Assert.Equal(MemoryImage.Filled(0x5a, Cluster), buffer);
        // Unallocated clusters read as zeros without any host read.
        Assert.True(TryRead(image, 9 * Cluster, buffer));
        Assert.Equal(new byte[Cluster], buffer);
    }

    [Fact]
    public void APageNotInTheCacheGivesUp()
    {
        string path = _dir["d.raw"];
        using (var raw = RawImage.Create(path, 4 * Cluster))
        {
            raw.Write(Cluster, MemoryImage.Filled(0x33, Cluster));
            raw.Flush();
        }
        DropFromPageCache(path);
        using var image = ImageOpener.Open(path, "raw", readOnly: true);
        var buffer = new byte[Cluster];
        Assert.False(TryRead(image, Cluster, buffer));
        image.Read(Cluster, buffer);
        Assert.Equal(MemoryImage.Filled(0x33, Cluster), buffer);
        Assert.True(TryRead(image, Cluster, buffer));
        Assert.Equal(MemoryImage.Filled(0x33, Cluster), buffer);
    }

    [Fact]
    public void ANodeThatIsNoHostFileAndATestHookGiveUpWithoutRunning()
    {
        var memory = new MemoryImage(4 * Cluster);
        Assert.False(TryRead(memory, 0, new byte[4096]));

        string path = WrittenQcow2();
        using var image = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true);
        image.Read(3 * Cluster, new byte[Cluster]);
        int hooked = 0;
        image.File.BeforeDataIo = (_, _, _) => hooked++;
        Assert.False(TryRead(image, 3 * Cluster, new byte[Cluster]));
        Assert.Equal(0, hooked);
        image.Read(3 * Cluster, new byte[Cluster]);
        Assert.Equal(1, hooked);
    }

    [Fact]
    public void AWriteInsideACachedOnlyReadGivesUp()
    {
        using var raw = RawImage.Create(_dir["w.raw"], 4 * Cluster);
        Assert.False(CachedReads.TryRun(raw, 0, static (i, _) => i.Write(0, new byte[4096])));
        Assert.Equal(new byte[4096], Read(raw));
    }

    [Fact]
    public void CorruptionMetByACachedOnlyReadIsLeftToTheNormalReadWhichMarksTheImageOnDisk()
    {
        string path = WrittenQcow2();
        // Point the L2 entry of cluster 3 half a KiB past its cluster: an unaligned data offset, fatal corruption.
        using (var f = File.Open(path, FileMode.Open, FileAccess.ReadWrite))
        {
            var b8 = new byte[8];
            f.Position = 40; f.ReadExactly(b8);
            long l1 = (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b8);
            f.Position = l1; f.ReadExactly(b8);
            long l2 = (long)(System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b8) & 0x00fffffffffffe00UL);
            f.Position = l2 + 3 * 8; f.ReadExactly(b8);
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(b8, System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b8) + 512);
            f.Position = l2 + 3 * 8; f.Write(b8);
        }
        using (var image = ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            image.Read(5 * Cluster, new byte[Cluster]); // the L2 table is in memory now; cluster 5 is fine
            Assert.False(TryRead(image, 3 * Cluster, new byte[Cluster]));
            Assert.Throws<BlockIOException>(() => image.Read(3 * Cluster, new byte[Cluster]));
        }
        var header = File.ReadAllBytes(path).AsSpan(72, 8);
        Assert.Equal(2UL, System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(header) & 2); // incompatible: corrupt
    }

    private static byte[] Read(BlockImage image)
    {
        var b = new byte[4096];
        image.Read(0, b);
        return b;
    }

    /// <summary>fsync, then POSIX_FADV_DONTNEED: the kernel drops the file's clean pages.</summary>
    private static void DropFromPageCache(string path)
    {
        using var f = File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite);
        RandomAccess.FlushToDisk(f);
        Assert.Equal(0, posix_fadvise((int)f.DangerousGetHandle(), 0, 0, 4));
    }

    [LibraryImport("libc")]
    private static partial int posix_fadvise(int fd, long offset, long length, int advice);
}
