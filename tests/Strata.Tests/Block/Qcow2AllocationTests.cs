using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>The cluster allocator stays first fit while its search hint moves ahead: data goes right after what is
/// in use, and a cluster freed below the hint is the next one taken.</summary>
public class Qcow2AllocationTests
{
    private static long HostOf(BlockImage image, long guest) => image.GetLayerStatus(guest, 1).HostOffset;

    [Fact]
    public void WritesPackInOrderAndAFreedClusterIsTakenFirst()
    {
        using var dir = new TempDir();
        const int cluster = 65536;
        using var img = Qcow2Image.Create(dir["a.qcow2"], new Qcow2CreateOptions { Size = 64L << 20 });
        var data = Enumerable.Repeat((byte)0x5a, 2 * cluster).ToArray();
        // Two clusters per write, as a convert does in larger runs: each run lands right after the previous one.
        for (long g = 0; g < 40; g += 2) img.Write(g * cluster, data);
        long first = HostOf(img, 0);
        for (long g = 1; g < 40; g++) Assert.Equal(first + g * cluster, HostOf(img, g * cluster));

        // Freed below the hint (at the write-back that puts the new L2 entry on disk): first fit takes it before
        // anything past the end.
        img.Discard(7 * cluster, cluster);
        img.Flush();
        img.Write(100L * cluster, data.AsSpan(0, cluster));
        Assert.Equal(first + 7 * cluster, HostOf(img, 100L * cluster));
        img.Write(101L * cluster, data.AsSpan(0, cluster));
        Assert.Equal(first + 40 * cluster, HostOf(img, 101L * cluster));

        // A run larger than the hole left behind goes past it, and the hole is still found by a later single cluster.
        img.Discard(11 * cluster, cluster);
        img.Flush();
        img.Write(102L * cluster, data);
        Assert.Equal(first + 41 * cluster, HostOf(img, 102L * cluster));
        img.Write(104L * cluster, data.AsSpan(0, cluster));
        Assert.Equal(first + 11 * cluster, HostOf(img, 104L * cluster));

        var report = img.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }
}
