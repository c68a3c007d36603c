using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>Internal snapshots, version-2 images, lazy refcounts and preallocation, checked against the real
/// qemu-img/qemu-io in both directions.</summary>
public class SnapshotInteropTests
{
    /// <summary>The guest data of one snapshot, as QEMU reads it.</summary>
    private static string QemuSnapshotRaw(TempDir t, string image, string name)
    {
        string raw = t[$"{name}.raw"];
        QemuImg("convert", "-l", $"snapshot.name={name}", "-O", "raw", image, raw).Ok();
        return raw;
    }

    private static string QemuActiveRaw(TempDir t, string image, string name)
    {
        string raw = t[name];
        QemuImg("convert", "-O", "raw", image, raw).Ok();
        return raw;
    }

    [Fact]
    public void StrataSnapshotsAreWhatQemuSees()
    {
        using var t = new TempDir();
        string img = t["a.qcow2"];
        Workloads.QemuQcow2(img, "64M", ["write -P 0x11 0 192k", "write -P 0x22 5M 64k", "write -c -P 0x33 8M 64k"]);
        string before = QemuActiveRaw(t, img, "before.raw");

        StrataCmd("img", "snapshot", "-c", "s1", img).Ok();
        AssertQemuCheckClean(img);
        // Partial writes into clusters (and an L2 table) shared with the snapshot, a zeroing, a discard.
        StrataIo(img, ["write -P 0x44 4k 8k", "write -P 0x55 130k 64k", "write -z 5M 64k", "discard 8M 64k", "write -P 0x66 40M 4k"]);
        AssertQemuCheckClean(img);
        string after = QemuActiveRaw(t, img, "after.raw");
        Assert.Equal(Sha256(before), Sha256(QemuSnapshotRaw(t, img, "s1")));
        QemuIo(img, ["read -P 0x44 4k 8k", "read -P 0x11 12k 118k", "read -P 0x55 130k 62k", "read -P 0 5M 64k", "read -P 0 8M 64k"]);

        StrataCmd("img", "snapshot", "-c", "s2", img).Ok();
        Assert.Equal(QemuImg("snapshot", "-l", img).Ok().Stdout, StrataCmd("img", "snapshot", "-l", img).Ok().Stdout);

        StrataCmd("img", "snapshot", "-a", "s1", img).Ok();
        AssertQemuCheckClean(img);
        Assert.Equal(Sha256(before), Sha256(QemuActiveRaw(t, img, "applied.raw")));

        StrataCmd("img", "snapshot", "-d", "s1", img).Ok();
        AssertQemuCheckClean(img);
        Assert.Equal(Sha256(after), Sha256(QemuSnapshotRaw(t, img, "s2")));
        StrataCmd("img", "snapshot", "-d", "s2", img).Ok();
        AssertQemuCheckClean(img);
        Assert.Equal("", QemuImg("snapshot", "-l", img).Ok().Stdout);
        Assert.Equal(Sha256(before), Sha256(QemuActiveRaw(t, img, "final.raw")));
    }

    [Fact]
    public void QemuSnapshotsAreCheckedAppliedAndDeletedByStrata()
    {
        using var t = new TempDir();
        string img = t["q.qcow2"];
        Workloads.QemuQcow2(img, "64M", ["write -P 0x11 0 1M"]);
        string first = QemuActiveRaw(t, img, "first.raw");
        QemuImg("snapshot", "-c", "one", img).Ok();
        QemuIo(img, ["write -P 0x22 512k 1M", "write -P 0x23 30M 64k"]);
        string second = QemuActiveRaw(t, img, "second.raw");
        QemuImg("snapshot", "-c", "two", img).Ok();
        QemuIo(img, ["write -P 0x33 0 64k"]);

        // No false leaks: check counts the snapshots' trees, and says what qemu-img says.
        var strataCheck = StrataCmd("img", "check", img).Ok();
        Assert.Equal(QemuImg("check", img).Ok().Stdout, strataCheck.Stdout);
        Assert.Equal(QemuImg("snapshot", "-l", img).Ok().Stdout, StrataCmd("img", "snapshot", "-l", img).Ok().Stdout);
        string qemuInfo = QemuImg("info", img).Ok().Stdout;
        string strataInfo = StrataCmd("img", "info", img).Ok().Stdout;
        Assert.Equal(qemuInfo[qemuInfo.IndexOf("Snapshot list:", StringComparison.Ordinal)..],
                     strataInfo[strataInfo.IndexOf("Snapshot list:", StringComparison.Ordinal)..]);
        var json = StrataCmd("img", "info", "--output=json", img).Ok().Json();
        Assert.Equal(2, json.GetProperty("snapshots").GetArrayLength());
        Assert.Equal("two", json.GetProperty("snapshots")[1].GetProperty("name").GetString());

        StrataIo(img, ["write -P 0x44 100k 8k"]);
        AssertQemuCheckClean(img);
        Assert.Equal(Sha256(first), Sha256(QemuSnapshotRaw(t, img, "one")));
        Assert.Equal(Sha256(second), Sha256(QemuSnapshotRaw(t, img, "two")));

        StrataCmd("img", "snapshot", "-a", "one", img).Ok();
        AssertQemuCheckClean(img);
        Assert.Equal(Sha256(first), Sha256(QemuActiveRaw(t, img, "applied.raw")));
        StrataCmd("img", "snapshot", "-d", "two", img).Ok();
        AssertQemuCheckClean(img);
        QemuImg("snapshot", "-d", "one", img).Ok();
        AssertQemuCheckClean(img);
        Assert.Equal(Sha256(first), Sha256(QemuActiveRaw(t, img, "end.raw")));
    }

    [Fact]
    public void SnapshotErrorsAreQemuImgs()
    {
        using var t = new TempDir();
        string img = t["e.qcow2"];
        Workloads.QemuQcow2(img, "1M", []);
        foreach (var args in new[] { new[] { "-a", "nope" }, ["-d", "nope"], ["-l", "-c", "x"] })
        {
            var q = QemuImg(["snapshot", .. args, img]);
            var s = StrataCmd(["img", "snapshot", .. args, img]);
            Assert.Equal(q.Exit, s.Exit);
            Assert.Equal(q.Stderr.Split('\n')[0].Replace("qemu-img:", ""), s.Stderr.Split('\n')[0].Replace("strata img:", ""));
        }
    }

    [Fact]
    public void Version2ImagesAreWrittenAsQemuWritesThem()
    {
        using var t = new TempDir();
        string[] writes = ["write -P 0x5a 0 200k", "write -z 64k 64k", "discard 128k 64k", "write -P 0x11 1M 4k", "write -z 1M 512"];
        Workloads.StrataQcow2(t["s.qcow2"], "4M", writes, "-o", "compat=0.10");
        Workloads.QemuQcow2(t["q.qcow2"], "4M", writes, "-o", "compat=0.10");
        AssertQemuCheckClean(t["s.qcow2"]);
        Assert.Equal(2u, Qcow2Edit.ReadU32(t["s.qcow2"], 4));
        AssertQemuIdentical(t["q.qcow2"], t["s.qcow2"]);

        // Over a backing file, version 2 has no zero flag: zeroing must write real zeros, not expose the backing data.
        Workloads.QemuQcow2(t["base.qcow2"], "4M", ["write -P 0x77 0 4M"]);
        Workloads.StrataQcow2(t["top.qcow2"], "4M", ["write -z 0 128k", "write -P 0x12 1M 4k"],
            "-o", "compat=0.10", "-b", t["base.qcow2"], "-F", "qcow2");
        AssertQemuCheckClean(t["top.qcow2"]);
        QemuIo(t["top.qcow2"], ["read -P 0 0 128k", "read -P 0x77 128k 896k", "read -P 0x12 1M 4k"]);
    }

    [Fact]
    public void DirtyLazyRefcountImageIsRepairedWhenStrataOpensItForWriting()
    {
        using var t = new TempDir();
        string img = t["l.qcow2"];
        StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "64M").Ok();
        // QEMU killed after a write with lazy refcounts leaves the dirty bit and a refcount it never wrote.
        Run("qemu-io", "-c", "write -P 0x9 0 512", "-c", "sigraise 9", img);
        Assert.Equal(1ul, Qcow2Edit.ReadU64(img, 72) & 1);
        Assert.NotEqual(0, QemuImg("check", img).Exit);

        StrataIo(img, ["read -P 0x9 0 512", "write -P 0x8 64k 512"]);
        Assert.Equal(0ul, Qcow2Edit.ReadU64(img, 72) & 1);
        AssertQemuCheckClean(img);
        QemuIo(img, ["read -P 0x9 0 512", "read -P 0x8 64k 512"]);
    }

    [Theory]
    [InlineData("metadata")]
    [InlineData("falloc")]
    [InlineData("full")]
    public void PreallocationIsLaidOutAsQemuLaysItOut(string mode)
    {
        using var t = new TempDir();
        QemuImg("create", "-q", "-f", "qcow2", "-o", $"preallocation={mode},cluster_size=4k", t["q.qcow2"], "9M").Ok();
        StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", $"preallocation={mode},cluster_size=4k", t["s.qcow2"], "9M").Ok();
        AssertQemuCheckClean(t["s.qcow2"]);
        Assert.Equal(QemuImg("check", t["q.qcow2"]).Stdout, QemuImg("check", t["s.qcow2"]).Stdout);
        Assert.Equal(new FileInfo(t["q.qcow2"]).Length, new FileInfo(t["s.qcow2"]).Length);
        // falloc/full: QEMU grows the refcount structures first and puts the data in one run; Strata keeps each L2
        // table before its data, as for metadata. Same clusters, same file length, another order.
        if (mode == "metadata")
            Assert.Equal(QemuImg("map", "--output=json", t["q.qcow2"]).Stdout, QemuImg("map", "--output=json", t["s.qcow2"]).Stdout);
        AssertQemuIdentical(t["q.qcow2"], t["s.qcow2"]);
    }
}
