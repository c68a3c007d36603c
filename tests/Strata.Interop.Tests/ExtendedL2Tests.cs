using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// qcow2 images with extended L2 entries (32 subclusters per cluster): what real qemu-io writes at subcluster
/// granularity strata reads, maps and checks as qemu-img does; what strata writes real qemu-img checks clean and
/// compares identical to the same writes on a raw file.
/// </summary>
public class ExtendedL2Tests
{
    /// <summary>Guest writes at subcluster granularity (64 KiB clusters: 2 KiB subclusters), over a backing file
    /// where one is given: partial and whole subclusters, across clusters, zeroing, unmapping, discarding, and
    /// compressed clusters later written into in part.</summary>
    private static readonly string[] SubclusterWorkload =
    [
        "write -P 0x11 0 1k",            // head of subcluster 0
        "write -P 0x12 3k 512",           // middle of subcluster 1
        "write -P 0x13 5k 1k",            // tail of subcluster 2
        "write -P 0x14 14k 4k",           // subclusters 7-8, whole
        "write -P 0x15 63k 4k",           // across clusters 0 and 1
        "write -z 2k 2k",                 // zero subcluster 1
        "write -z -u 128k 64k",           // zero + unmap cluster 2
        "write -P 0x16 192k 64k",         // whole cluster 3 ...
        "write -z 200k 6k",               // ... then zero subclusters 4-6 of it
        "write -z 257k 3k",               // partial zero inside cluster 4
        "write -c -P 0x17 320k 64k",      // compressed cluster 5 ...
        "write -P 0x18 330k 1k",          // ... rewritten in part
        "write -c -P 0x19 384k 64k",      // compressed cluster 6 ...
        "write -z 400k 8k",               // ... zeroed in part
        "write -P 0x1a 448k 64k",         // cluster 7 ...
        "discard 448k 64k",               // ... discarded whole
        "write -P 0x1b 600k 70k",         // unaligned, across clusters 9-10
        "write -z 700k 100k",             // unaligned zero run over several clusters
    ];

    private static void MakeBase(TempDir t, string size = "1M")
    {
        QemuImg("create", "-q", "-f", "raw", t["base.raw"], size).Ok();
        QemuIo(t["base.raw"], [$"write -P 0xee 0 {size}"], "raw");
    }

    /// <summary>The raw image the workload must read as: the backing content (or zeros), then the same writes.</summary>
    private static string Reference(TempDir t, bool backing, IEnumerable<string> workload, string size = "1M")
    {
        string raw = t["reference.raw"];
        if (backing) File.Copy(t["base.raw"], raw, overwrite: true);
        else QemuImg("create", "-q", "-f", "raw", raw, size).Ok();
        // raw has no compressed writes; discard on a raw file reads back as zeros, which is what qcow2 must show
        // without a backing file; with one the discarded cluster reads as zeros too (QEMU sets its zero bits).
        QemuIo(raw, workload.Select(c => c.Replace("write -c ", "write ").Replace("discard ", "write -z ")), "raw");
        return raw;
    }

    private static void CreateWithQemu(TempDir t, string img, bool backing)
    {
        if (backing) QemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", t["base.raw"], "-F", "raw", img, "1M").Ok();
        else QemuImg("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, "1M").Ok();
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void QemuSubclusterWrites_StrataReadsMapsAndChecksAsQemu(bool backing)
    {
        using var t = new TempDir();
        MakeBase(t);
        string img = t["ext.qcow2"];
        CreateWithQemu(t, img, backing);
        QemuIo(img, SubclusterWorkload, "qcow2");
        string raw = Reference(t, backing, SubclusterWorkload);
        AssertQemuIdentical(img, raw); // the reference is right

        var cmp = StrataCmd("img", "compare", img, raw);
        Assert.True(cmp.Exit == 0 && cmp.Stdout == "Images are identical.\n", "strata compare:\n" + cmp);
        StrataCmd("img", "convert", "-O", "raw", img, t["strata.raw"]).Ok();
        Assert.Equal(Sha256(raw), Sha256(t["strata.raw"]));

        Maps.AssertEqual(QemuImg("map", "--output=json", img).Ok().Json(), StrataCmd("img", "map", "--output=json", img).Ok().Json(), "map");
        var check = StrataCmd("img", "check", img);
        Assert.True(check.Exit == 0 && check.Stdout.Contains("No errors were found on the image."), "strata check:\n" + check);
    }

    [Theory]
    [InlineData(false, "1M")]
    [InlineData(true, "1M")]
    [InlineData(true, "1059k")] // the last cluster is short, and ends inside a subcluster
    [InlineData(false, "1059k")]
    public void StrataSubclusterWrites_QemuChecksCleanAndReadsTheData(bool backing, string size)
    {
        using var t = new TempDir();
        MakeBase(t, size);
        string img = t["ext.qcow2"];
        if (backing) StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", t["base.raw"], "-F", "raw", img, size).Ok();
        else StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", img, size).Ok();
        string[] workload = size == "1M" ? SubclusterWorkload
            : [.. SubclusterWorkload, "write -P 0x1c 1025k 3k", "write -z 1050k 9k", "write -P 0x1d 1057k 2k"];
        StrataIo(img, workload, "qcow2");
        string raw = Reference(t, backing, workload, size);

        AssertQemuCheckClean(img);
        AssertQemuIdentical(img, raw);
        // And one more round of partial writes on top of what strata allocated, through both tools' eyes.
        string[] more = ["write -P 0x21 1k 3k", "write -P 0x22 199k 4k", "write -z 330k 2k", "write -P 0x23 1023k 1k", "write -z 1k 1022k"];
        StrataIo(img, more, "qcow2");
        QemuIo(raw, more, "raw");
        AssertQemuCheckClean(img);
        AssertQemuIdentical(img, raw);
    }

    [Fact]
    public void StrataWritesIntoSnapshotSharedClusters_CopyEverySubcluster()
    {
        using var t = new TempDir();
        MakeBase(t);
        string img = t["ext.qcow2"];
        CreateWithQemu(t, img, backing: true);
        string[] before = ["write -P 0x31 2k 2k", "write -z 6k 2k", "write -P 0x32 64k 8k"];
        QemuIo(img, before, "qcow2");
        StrataCmd("img", "snapshot", "-c", "snap1", img).Ok();
        string[] after = ["write -P 0x33 3k 512", "write -P 0x34 66k 1k", "write -z 68k 2k"];
        StrataIo(img, after, "qcow2");
        string raw = Reference(t, backing: true, [.. before, .. after]);
        AssertQemuCheckClean(img);
        AssertQemuIdentical(img, raw);
        // The snapshot still reads as it was taken.
        QemuImg("snapshot", "-a", "snap1", img).Ok();
        AssertQemuIdentical(img, Reference(t, backing: true, before));
    }

    [Fact]
    public void StrataConvert_IntoExtendedL2Target_QemuReadsItIdentically()
    {
        using var t = new TempDir();
        MakeBase(t);
        string src = t["src.qcow2"];
        CreateWithQemu(t, src, backing: false);
        QemuIo(src, SubclusterWorkload, "qcow2");
        StrataCmd("img", "convert", "-O", "qcow2", "-o", "extended_l2=on", src, t["dst.qcow2"]).Ok();
        AssertQemuCheckClean(t["dst.qcow2"]);
        AssertQemuIdentical(src, t["dst.qcow2"]);
        Assert.Contains("\"extended-l2\": true", QemuImg("info", "--output=json", t["dst.qcow2"]).Ok().Stdout);
    }

    [Theory]
    [InlineData("extended_l2=on,cluster_size=8k")]
    [InlineData("extended_l2=on,compat=0.10")]
    [InlineData("extended_l2=maybe")]
    public void Create_BadCombinations_FailAsQemuImg(string options)
    {
        using var t = new TempDir();
        var q = QemuImg("create", "-f", "qcow2", "-o", options, t["q.qcow2"], "1M");
        var s = StrataCmd("img", "create", "-f", "qcow2", "-o", options, t["q.qcow2"], "1M");
        Assert.Equal(q.Exit, s.Exit);
        Assert.NotEqual(0, s.Exit);
        Assert.EndsWith(LastLine(q.Stderr)["qemu-img: ".Length..], LastLine(s.Stderr));
    }

    /// <summary>Growing with preallocation over a longer backing file: the new range must read as zeros, the old one
    /// keep reading from the backing file; qemu-img's own resize of the same image is the reference.</summary>
    [Theory]
    [InlineData("on", "metadata")]
    [InlineData("on", "falloc")]
    [InlineData("on", "full")]
    [InlineData("off", "metadata")]
    [InlineData("off", "full")]
    public void Resize_GrowWithPreallocationOverLongerBacking_ReadsAsQemuResize(string extendedL2, string mode)
    {
        using var t = new TempDir();
        MakeBase(t);
        foreach (var name in new[] { "q.qcow2", "s.qcow2" })
        {
            QemuImg("create", "-q", "-f", "qcow2", "-o", $"extended_l2={extendedL2}", "-b", t["base.raw"], "-F", "raw", t[name], "503k").Ok();
            QemuIo(t[name], ["write -P 0x41 100k 3k"], "qcow2");
        }
        QemuImg("resize", $"--preallocation={mode}", t["q.qcow2"], "1013k").Ok();
        var r = StrataCmd("img", "resize", $"--preallocation={mode}", t["s.qcow2"], "1013k").Ok();
        Assert.Equal("Image resized.\n", r.Stdout);
        AssertQemuCheckClean(t["s.qcow2"]);
        QemuIo(t["s.qcow2"], ["read -q -P 0xee 0 100k", "read -q -P 0x41 100k 3k", "read -q -P 0xee 103k 400k", "read -q -P 0 503k 510k"], "qcow2");
        AssertQemuIdentical(t["q.qcow2"], t["s.qcow2"]);
    }

    [Theory]
    [InlineData("--preallocation=bogus", "2M")]
    [InlineData("--preallocation=full", "100k")]
    public void Resize_BadPreallocation_FailsAsQemuImg(string option, string size)
    {
        using var t = new TempDir();
        QemuImg("create", "-q", "-f", "qcow2", t["q.qcow2"], "1M").Ok();
        var q = QemuImg("resize", "--shrink", option, t["q.qcow2"], size);
        var s = StrataCmd("img", "resize", "--shrink", option, t["q.qcow2"], size);
        Assert.Equal(q.Exit, s.Exit);
        Assert.NotEqual(0, s.Exit);
        Assert.EndsWith(LastLine(q.Stderr)["qemu-img: ".Length..], LastLine(s.Stderr));
    }

    [Theory]
    [InlineData("512M", "extended_l2=on")]
    [InlineData("64G", "cluster_size=16k,extended_l2=on")]
    [InlineData("1M", "cluster_size=8k,extended_l2=on")]
    [InlineData("1024T", "extended_l2=on")]
    [InlineData("1025T", "extended_l2=on")]
    [InlineData("2049T", "extended_l2=off")]
    public void Measure_ExtendedL2_AsQemuImg(string size, string options)
    {
        var q = QemuImg("measure", "--size", size, "-O", "qcow2", "-o", options);
        var s = StrataCmd("img", "measure", "--size", size, "-O", "qcow2", "-o", options);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(q.Stdout, s.Stdout);
        if (q.Exit != 0) Assert.EndsWith(LastLine(q.Stderr)["qemu-img: ".Length..], LastLine(s.Stderr));
    }

    private static string LastLine(string text) => text.TrimEnd('\n').Split('\n')[^1];

    /// <summary>Bitmaps QEMU's check flags: a compressed cluster with a bitmap (not counted, so also a leak), a
    /// subcluster both allocated and zero, allocated subclusters without a host cluster.</summary>
    [Theory]
    [InlineData(0x40008, new byte[] { 0, 0, 0, 1, 0x80, 0, 0, 0 })]
    [InlineData(0x40018, new byte[] { 0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff })]
    [InlineData(0x40028, new byte[] { 0, 0, 0, 0, 0, 0, 0, 1 })]
    public void Check_CorruptSubclusterBitmaps_ReportedAsQemuImg(long at, byte[] bitmap)
    {
        using var t = new TempDir();
        string img = t["ext.qcow2"];
        CreateWithQemu(t, img, backing: false);
        QemuIo(img, ["write -q -c 0 64k", "write -q 64k 32k", "write -q 256k 1k"], "qcow2");
        using (var f = File.OpenWrite(img))
        {
            f.Position = at;
            f.Write(bitmap);
        }
        var q = QemuImg("check", img);
        var s = StrataCmd("img", "check", img);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(q.Stdout, s.Stdout);
        Assert.Equal(q.Stderr, s.Stderr);
    }

    [Fact]
    public void Read_SubclusterBothAllocatedAndZero_IsAnErrorNotData()
    {
        using var t = new TempDir();
        string img = t["ext.qcow2"];
        CreateWithQemu(t, img, backing: false);
        QemuIo(img, ["write -q 32k 128k"], "qcow2");
        using (var f = File.OpenWrite(img))
        {
            f.Position = 0x40018;
            f.Write(new byte[] { 0, 0, 0, 1 });
        }
        var s = StrataCmd("io", "-c", "read 0 192k", img);
        Assert.True(s.Stdout.Contains("read failed: Input/output error") && !LooksLikeCrash(s.Stderr), s.ToString());
        // The image is marked corrupt, as QEMU marks it.
        Assert.Contains("\"corrupt\": true", QemuImg("info", "--output=json", img).Ok().Stdout);
    }
}
