using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>Refcounts at their width's limit and <c>amend -o refcount_bits</c>, against the real qemu-img.</summary>
public class RefcountWidthInteropTests
{
    private static void Poke(string path, long offset, byte[] bytes)
    {
        using var f = File.OpenWrite(path);
        f.Position = offset;
        f.Write(bytes);
    }

    [Fact]
    public void SnapshotOnAMaximal64BitRefcountFailsAsQemuAndLeavesTheSameLeaks()
    {
        using var t = new TempDir();
        string strata = t["s.qcow2"], qemu = t["q.qcow2"];
        Workloads.QemuQcow2(strata, "64M", ["write 0 512"], "-o", "refcount_bits=64");
        // Refcount of the data cluster (cluster 5) at 2^64-1, and its L2 entry without QCOW_OFLAG_COPIED.
        Poke(strata, 0x20028, [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        Poke(strata, 0x40000, [0, 0, 0, 0, 0, 5, 0, 0]);
        File.Copy(strata, qemu);

        var ours = StrataCmd("img", "snapshot", "-c", "foo", strata);
        var theirs = QemuImg("snapshot", "-c", "foo", qemu);
        Assert.Equal((theirs.Exit, theirs.Stderr), (ours.Exit, ours.Stderr.Replace("strata img", "qemu-img")));
        Assert.Contains("Could not create snapshot 'foo': -22 (Invalid argument)", ours.Stderr);

        var checkOurs = QemuImg("check", strata);
        var checkTheirs = QemuImg("check", qemu);
        Assert.Equal(3, checkOurs.Exit); // leaks only
        Assert.Equal(checkTheirs.Stdout, checkOurs.Stdout);
        Assert.Equal(checkTheirs.Stderr, checkOurs.Stderr);
        Assert.Contains("Leaked cluster 5 refcount=18446744073709551615 reference=1", checkOurs.Stderr + checkOurs.Stdout);
    }

    [Fact]
    public void TwoBitRefcountsAllowThreeSnapshotsAndRefuseTheFourthAsQemu()
    {
        using var t = new TempDir();
        string strata = t["s.qcow2"], qemu = t["q.qcow2"];
        Workloads.QemuQcow2(strata, "64M", ["write 0 512"], "-o", "refcount_bits=2");
        File.Copy(strata, qemu);
        foreach (var name in new[] { "foo", "bar" })
        {
            StrataCmd("img", "snapshot", "-c", name, strata).Ok();
            QemuImg("snapshot", "-c", name, qemu).Ok();
        }
        var ours = StrataCmd("img", "snapshot", "-c", "baz", strata);
        var theirs = QemuImg("snapshot", "-c", "baz", qemu);
        Assert.Equal(1, ours.Exit);
        Assert.Equal(theirs.Stderr, ours.Stderr.Replace("strata img", "qemu-img"));
        Assert.Equal(QemuImg("check", qemu).Stdout, QemuImg("check", strata).Stdout);
    }

    [Theory]
    [InlineData("1")]
    [InlineData("2")]
    [InlineData("64")]
    public void AmendedWidthIsCleanForQemuAndKeepsEveryByte(string bits)
    {
        using var t = new TempDir();
        string img = t["a.qcow2"];
        Workloads.QemuQcow2(img, "64M", ["write -P 0x11 16M 8M", "write -c -P 0x22 40M 64k"]);
        if (bits != "1") QemuImg("snapshot", "-c", "s", img).Ok();
        QemuIo(img, ["write -P 0x33 17M 1M"]);
        string before = t["before.raw"];
        QemuImg("convert", "-O", "raw", img, before).Ok();

        StrataCmd("img", "amend", "-o", $"refcount_bits={bits}", img).Ok();

        AssertQemuCheckClean(img);
        Assert.Contains($"refcount bits: {bits}", QemuImg("info", img).Ok().Stdout);
        string after = t["after.raw"];
        QemuImg("convert", "-O", "raw", img, after).Ok();
        Assert.Equal(Sha256(before), Sha256(after));
        if (bits != "1")
        {
            string snap = t["snap.raw"];
            QemuImg("convert", "-l", "snapshot.name=s", "-O", "raw", img, snap).Ok();
            QemuIo(snap, ["read -P 0x11 16M 8M"], "raw");
        }
        // And back to the default width: QEMU keeps working with it as before.
        StrataCmd("img", "amend", "-o", "refcount_bits=16", img).Ok();
        AssertQemuCheckClean(img);
        QemuIo(img, ["write -P 0x44 30M 64k", "read -P 0x33 17M 1M"]);
        AssertQemuCheckClean(img);
    }

    [Fact]
    public void AmendThatNeedsSeveralWalksReportsProgressAsQemu()
    {
        using var t = new TempDir();
        string strata = t["s.qcow2"], qemu = t["q.qcow2"];
        // 63 clusters in use of 512 bytes: at 64 bits the first new refcount block has exactly one free entry.
        Workloads.QemuQcow2(strata, "64k", [$"write 0 {58 * 512}"], "-o", "refcount_bits=1,cluster_size=512");
        File.Copy(strata, qemu);

        var ours = StrataCmd("img", "amend", "-p", "-o", "refcount_bits=64", strata).Ok();
        var theirs = QemuImg("amend", "-p", "-o", "refcount_bits=64", qemu).Ok();
        Assert.Equal(theirs.Stdout, ours.Stdout);
        Assert.Contains("(50.00/100%)", ours.Stdout);
        AssertQemuCheckClean(strata);
        Assert.Equal(QemuImg("check", "--output=json", qemu).Ok().Stdout.Replace(qemu, "IMG"),
                     QemuImg("check", "--output=json", strata).Ok().Stdout.Replace(strata, "IMG"));
        AssertQemuIdentical(qemu, strata);
    }

    [Fact]
    public void AmendMessagesAreQemus()
    {
        using var t = new TempDir();
        string img = t["a.qcow2"];
        Workloads.QemuQcow2(img, "64M", ["write 0 64k"]);
        QemuImg("snapshot", "-c", "s", img).Ok();
        foreach (var opts in new[] { "refcount_bits=1", "refcount_bits=3", "refcount_bits=32,compat=0.10" })
        {
            var ours = StrataCmd("img", "amend", "-o", opts, img);
            var theirs = QemuImg("amend", "-o", opts, img);
            Assert.Equal(1, ours.Exit);
            Assert.Equal(theirs.Exit, ours.Exit);
            Assert.Equal(theirs.Stderr, ours.Stderr.Replace("strata img", "qemu-img"));
        }
        AssertQemuCheckClean(img);
        Assert.Contains("refcount bits: 16", QemuImg("info", img).Ok().Stdout);
    }
}
