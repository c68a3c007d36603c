using Strata.Block;
using Strata.Block.Filters;

namespace Strata.Tests.Block;

/// <summary>
/// Fleecing through the copy-before-write filter node and snapshot-access, in process: guest writes through the filter
/// keep the snapshot reading the old data; the bitmap limits what is kept; on-cbw-error decides who wins when the temp
/// overlay fails.
/// </summary>
public class CopyBeforeWriteTests
{
    private const int Cluster = 65536;

    private static (MemoryImage Source, MemoryImage Temp) Disks()
    {
        var source = new MemoryImage(8 * Cluster, "source");
        for (int c = 0; c < 8; c++) source.Write(c * Cluster, MemoryImage.Filled((byte)(c + 1), Cluster));
        return (source, new MemoryImage(8 * Cluster, "temp"));
    }

    private static byte[] Read(BlockImage image, long offset, int length)
    {
        var buffer = new byte[length];
        image.Read(offset, buffer);
        return buffer;
    }

    [Fact]
    public void AGuestWriteDuringFleecingKeepsTheSnapshotReadingTheOldData()
    {
        var (source, temp) = Disks();
        using var filter = new CopyBeforeWriteImage(source, temp, bitmap: null);
        using var snapshot = new SnapshotAccessImage(filter);
        filter.Write(3 * Cluster + 4096, MemoryImage.Filled(0xaa, 8192));
        // The guest sees its write; the snapshot sees the disk as it was; the old cluster went to the temp overlay.
        Assert.Equal(MemoryImage.Filled(0xaa, 8192), Read(filter, 3 * Cluster + 4096, 8192));
        Assert.Equal(MemoryImage.Filled(4, Cluster), Read(snapshot, 3 * Cluster, Cluster));
        Assert.Equal(MemoryImage.Filled(4, Cluster), temp.Bytes(3 * Cluster, Cluster));
        // Untouched clusters are read from the source, and were not copied.
        Assert.Equal(MemoryImage.Filled(5, Cluster), Read(snapshot, 4 * Cluster, Cluster));
        Assert.Equal(MemoryImage.Filled(0, Cluster), temp.Bytes(4 * Cluster, Cluster));
        // A write straight to the source node (not through the filter) is caught as well: the hook is in its request path.
        source.Write(4 * Cluster, MemoryImage.Filled(0xbb, 512));
        Assert.Equal(MemoryImage.Filled(5, Cluster), Read(snapshot, 4 * Cluster, Cluster));
    }

    [Fact]
    public void TheBitmapLimitsWhatTheSnapshotKeeps()
    {
        var (source, temp) = Disks();
        var b = source.Bitmaps.Add("b");
        b.MarkDirty(2 * Cluster, Cluster);
        using var filter = new CopyBeforeWriteImage(source, temp, b);
        using var snapshot = new SnapshotAccessImage(filter);
        filter.Write(2 * Cluster, MemoryImage.Filled(0xaa, Cluster));
        filter.Write(6 * Cluster, MemoryImage.Filled(0xaa, Cluster));
        Assert.Equal(MemoryImage.Filled(3, Cluster), Read(snapshot, 2 * Cluster, Cluster));
        Assert.Equal(MemoryImage.Filled(0, Cluster), temp.Bytes(6 * Cluster, Cluster)); // outside the bitmap: not copied
        var e = Assert.Throws<BlockIOException>(() => Read(snapshot, 6 * Cluster, 512));
        Assert.Equal(13, e.Errno);
    }

    [Fact]
    public void ByDefaultAFailedCopyFailsTheGuestWriteAndTheSnapshotStays()
    {
        var (source, temp) = Disks();
        temp.FailWritesWith = 28;
        using var filter = new CopyBeforeWriteImage(source, temp, bitmap: null);
        using var snapshot = new SnapshotAccessImage(filter);
        var e = Assert.Throws<BlockIOException>(() => filter.Write(Cluster, MemoryImage.Filled(0xaa, 512)));
        Assert.Equal(28, e.Errno);
        Assert.Equal(MemoryImage.Filled(2, Cluster), Read(source, Cluster, Cluster));
        Assert.Equal(MemoryImage.Filled(2, Cluster), Read(snapshot, Cluster, Cluster));
        // Once the overlay works again, the same write copies and goes through.
        temp.FailWritesWith = null;
        filter.Write(Cluster, MemoryImage.Filled(0xaa, 512));
        Assert.Equal(MemoryImage.Filled(2, Cluster), Read(snapshot, Cluster, Cluster));
    }

    [Fact]
    public void WithBreakSnapshotAFailedCopyLetsTheGuestWriteThroughAndEndsTheSnapshot()
    {
        var (source, temp) = Disks();
        temp.FailWritesWith = 28;
        using var filter = new CopyBeforeWriteImage(source, temp, bitmap: null, breakSnapshot: true);
        using var snapshot = new SnapshotAccessImage(filter);
        filter.Write(Cluster, MemoryImage.Filled(0xaa, 512));
        Assert.Equal(MemoryImage.Filled(0xaa, 512), Read(source, Cluster, 512));
        var e = Assert.Throws<BlockIOException>(() => Read(snapshot, 0, 512));
        Assert.Equal(13, e.Errno);
    }

    [Fact]
    public void RemovingTheFilterTakesCopyBeforeWriteOutOfTheSourcesRequestPath()
    {
        var (source, temp) = Disks();
        var filter = new CopyBeforeWriteImage(source, temp, bitmap: null);
        filter.Dispose();
        source.Write(0, MemoryImage.Filled(0xaa, Cluster));
        Assert.Equal(0, temp.DriverWrites);
        Assert.Empty(temp.Parents);
    }
}
