using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata img bitmap --rebuild NAME --from POINT DISK`: a bitmap rebuilt by comparing a disk with a backup point
/// marks exactly the granules that read differently, and qemu-storage-daemon's incremental backup with it, on top
/// of the point, reads back as the disk.
/// </summary>
public class BitmapRebuildTests : ScratchDirTest
{
    private const long Granule = 65536;

    /// <summary>A disk with data, a point copied from it, then writes of which only some change what it reads.</summary>
    private (string Disk, string Point) DiskMovedOnFromAPoint()
    {
        string disk = P("disk.qcow2"), point = P("point.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", disk, "64M").Ok();
        Tools.QemuIo(disk, ["write -P 1 0 1M", "write -P 2 10M 64k", "write -P 3 40M 2M"]);
        Tools.QemuImg("convert", "-O", "qcow2", disk, point).Ok();
        Tools.QemuIo(disk,
        [
            "write -P 1 0 64k",   // the same bytes again: no change
            "write -P 5 10M 4k",  // changes granule 10M
            "write -z 40M 64k",   // zeros over data: changes granule 40M
            "write -P 0 50M 64k", // zeros written over nothing: no change
            "write -z 20M 1M",    // zeroed where it read zeros: no change
            "write -P 7 63M 1",   // one byte: changes granule 63M
            "write -P 8 2M 128k", // new data at 2M: two granules
        ]);
        return (disk, point);
    }

    [Fact]
    public void ARebuiltBitmapHoldsExactlyTheGranulesThatReadDifferently()
    {
        var (disk, point) = DiskMovedOnFromAPoint();

        Tools.StrataCmd("img", "bitmap", "--rebuild", "since-point", "--from", point, disk).Ok();

        Tools.AssertQemuCheckClean(disk);
        using var qsd = new QsdProcess(disk, readOnly: true);
        var bitmap = Assert.Single(qsd.Bitmaps("disk0"));
        Assert.Equal("since-point", bitmap!["name"]!.GetValue<string>());
        Assert.Equal(Granule, bitmap["granularity"]!.GetValue<long>());
        Assert.Equal(5 * Granule, bitmap["count"]!.GetValue<long>());
        Assert.True(bitmap["persistent"]!.GetValue<bool>());
    }

    [Fact]
    public void AnInconsistentBitmapIsRebuiltInPlaceWithItsGranularity()
    {
        var (disk, point) = DiskMovedOnFromAPoint();
        Tools.QemuImg("bitmap", "--add", "-g", "128k", disk, "b").Ok();
        // qemu-img bitmap --add then a killed writer: QEMU's own way to an in_use (inconsistent) bitmap.
        using (var qsd = new QsdProcess(disk))
        {
            qsd.Execute("block-dirty-bitmap-add", new { node = "disk0", name = "other", persistent = true });
            qsd.Kill();
        }
        var refused = Tools.QemuImg("bitmap", "--clear", disk, "b");
        Assert.NotEqual(0, refused.Exit);

        Tools.StrataCmd("img", "bitmap", "--rebuild", "b", "--from", point, disk).Ok();

        Tools.AssertQemuCheckClean(disk);
        using var after = new QsdProcess(disk, readOnly: true);
        var rebuilt = after.Bitmaps("disk0").Single(b => b!["name"]!.GetValue<string>() == "b")!;
        Assert.Equal(128 * 1024, rebuilt["granularity"]!.GetValue<long>());
        Assert.False(rebuilt["inconsistent"]?.GetValue<bool>() ?? false);
        // Granules of 128 KiB: 0 (unchanged), 2M..2M+128k → 1, 10M → 1, 40M → 1, 63M → 1.
        Assert.Equal(4 * 128 * 1024, rebuilt["count"]!.GetValue<long>());
    }

    [Fact]
    public void QemusIncrementalWithTheRebuiltBitmapOnTopOfThePointIsTheDisk()
    {
        var (disk, point) = DiskMovedOnFromAPoint();
        Tools.StrataCmd("img", "bitmap", "--rebuild", "since-point", "--from", point, disk).Ok();
        string inc = P("inc.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", point, "-F", "qcow2", inc).Ok();

        using (var qsd = new QsdProcess(disk))
        {
            qsd.Execute("blockdev-add", new Dictionary<string, object>
            {
                ["driver"] = "qcow2", ["node-name"] = "inc",
                ["file"] = new Dictionary<string, object> { ["driver"] = "file", ["filename"] = inc },
            });
            qsd.Execute("blockdev-backup", new Dictionary<string, object>
            {
                ["job-id"] = "inc", ["device"] = "disk0", ["target"] = "inc", ["sync"] = "incremental", ["bitmap"] = "since-point",
            });
            var deadline = DateTime.UtcNow.AddSeconds(60);
            while (qsd.Execute("query-jobs")!.AsArray().Any(j => j!["status"]!.GetValue<string>() != "concluded"))
            {
                Assert.True(DateTime.UtcNow < deadline, "the incremental did not conclude");
                Thread.Sleep(50);
            }
            Assert.DoesNotContain(qsd.Execute("query-jobs")!.AsArray(), j => j!["error"] is not null);
            qsd.Quit();
        }

        Assert.Equal(0, Tools.QemuImg("compare", "-f", "qcow2", "-F", "qcow2", disk, inc).Exit);
        // Only the changed granules were copied into the incremental.
        var map = Tools.QemuImg("map", "--output=json", inc).Ok().Json();
        long copied = map.EnumerateArray().Where(e => e.GetProperty("depth").GetInt32() == 0 && e.GetProperty("present").GetBoolean())
            .Sum(e => e.GetProperty("length").GetInt64());
        Assert.Equal(5 * Granule, copied);
    }

    [Fact]
    public void RebuildNeedsAPointAndStandsAlone()
    {
        var (disk, point) = DiskMovedOnFromAPoint();
        var noPoint = Tools.StrataCmd("img", "bitmap", "--rebuild", "b", disk);
        Assert.Equal(1, noPoint.Exit);
        Assert.Contains("--rebuild needs --from", noPoint.Stderr);
        var combined = Tools.StrataCmd("img", "bitmap", "--add", "--rebuild", "b", "--from", point, disk);
        Assert.Equal(1, combined.Exit);
        Assert.Contains("cannot be combined", combined.Stderr);
        var noName = Tools.StrataCmd("img", "bitmap", "--add", disk);
        Assert.Equal(1, noName.Exit);
        Assert.Contains("Expecting filename and bitmap name", noName.Stderr);
    }
}
