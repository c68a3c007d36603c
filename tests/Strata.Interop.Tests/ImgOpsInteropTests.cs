using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata img` convert / resize / commit / rebase / map against real qemu-img: each scenario is built twice from the
/// same qemu-io writes, once finished by qemu-img and once by strata, and the results must read the same (qemu-img
/// compare) and, where the layout is part of the contract, map the same.
/// </summary>
public class ImgOpsInteropTests
{
    /// <summary>Two folders with the same file names: "q" finished by qemu-img, "s" by strata.</summary>
    private sealed class Twin : IDisposable
    {
        private readonly TempDir _dir = new();
        public string Q(string name) => Path.Combine(Directory.CreateDirectory(_dir["q"]).FullName, name);
        public string S(string name) => Path.Combine(Directory.CreateDirectory(_dir["s"]).FullName, name);

        /// <summary>Runs a set-up step in both folders.</summary>
        public void Both(Action<Func<string, string>> step)
        {
            step(Q);
            step(S);
        }

        public void Dispose() => _dir.Dispose();
    }

    /// <summary>Where the result is allocated and how it reads, as qemu-img map shows it; host offsets left out
    /// (the drivers place metadata differently).</summary>
    private static void AssertMapsEqual(string qemuResult, string strataResult, string context)
    {
        var q = Maps.Merged(QemuImg("map", "--output=json", qemuResult).Ok().Json());
        var s = Maps.Merged(QemuImg("map", "--output=json", strataResult).Ok().Json());
        Assert.True(q.SequenceEqual(s), $"{context}: map differs\nqemu-img:\n  {string.Join("\n  ", q)}\nstrata:\n  {string.Join("\n  ", s)}");
    }

    /// <summary>iotest 122's regression: zeros the overlay holds (written as data or as zero clusters) must stay
    /// zeros in a compressed target whose backing file has data there.</summary>
    [Theory]
    [InlineData("write -P 0 0 3M")]
    [InlineData("write -z 0 3M")]
    public void ConvertCompressedOntoBacking_KeepsTheSourceZeros(string zeroWrite)
    {
        using var t = new Twin();
        t.Both(p =>
        {
            QemuImg("create", "-q", "-f", "qcow2", p("base.qcow2"), "16M").Ok();
            QemuIo(p("base.qcow2"), ["write -P 0x11 0 16M"]);
            QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2")).Ok();
            QemuIo(p("top.qcow2"), [zeroWrite, "write -P 0x22 5M 64k"]);
        });
        QemuImg("convert", "-O", "qcow2", "-c", "-B", "base.qcow2", "-F", "qcow2", t.Q("top.qcow2"), t.Q("out.qcow2")).Ok();
        StrataCmd("img", "convert", "-O", "qcow2", "-c", "-B", "base.qcow2", "-F", "qcow2", t.S("top.qcow2"), t.S("out.qcow2")).Ok();
        AssertQemuIdentical(t.Q("out.qcow2"), t.S("out.qcow2"));
        AssertQemuIdentical(t.S("top.qcow2"), t.S("out.qcow2"));
        AssertQemuCheckClean(t.S("out.qcow2"));
    }

    /// <summary>-S 0 allocates everything, -S 4k leaves runs of 4 KiB of zeros as holes: the same clusters as qemu-img.</summary>
    [Theory]
    [InlineData("0")]
    [InlineData("4k")]
    [InlineData("8k")]
    public void ConvertSparseSize_AllocatesAsQemu(string sparse)
    {
        using var t = new Twin();
        t.Both(p =>
        {
            QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=1k", p("src.qcow2"), "4M").Ok();
            QemuIo(p("src.qcow2"), ["write -P 0 0 64k", "write 0 1k", "write 8k 1k", "write 17k 1k", "write -P 0x33 1M 3k"]);
        });
        QemuImg("convert", "-O", "qcow2", "-o", "cluster_size=1k", "-S", sparse, t.Q("src.qcow2"), t.Q("out.qcow2")).Ok();
        StrataCmd("img", "convert", "-O", "qcow2", "-o", "cluster_size=1k", "-S", sparse, t.S("src.qcow2"), t.S("out.qcow2")).Ok();
        AssertQemuIdentical(t.Q("out.qcow2"), t.S("out.qcow2"));
        AssertMapsEqual(t.Q("out.qcow2"), t.S("out.qcow2"), $"convert -S {sparse}");
    }

    /// <summary>iotest 292's regression: shrinking an overlay into the middle of a cluster and growing it again must
    /// not bring back the old data of that cluster, nor show the longer backing file.</summary>
    [Fact]
    public void ResizeShrinkThenGrowOverlay_TailReadsZeros()
    {
        using var t = new Twin();
        t.Both(p =>
        {
            QemuImg("create", "-q", "-f", "qcow2", p("base.qcow2"), "1M").Ok();
            QemuIo(p("base.qcow2"), ["write -P 0x11 0 1M"]);
            QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2")).Ok();
            QemuIo(p("top.qcow2"), ["write -P 0x22 0 1M"]);
        });
        QemuImg("resize", "-q", "--shrink", t.Q("top.qcow2"), "520k").Ok();
        QemuImg("resize", "-q", t.Q("top.qcow2"), "567k").Ok();
        StrataCmd("img", "resize", "-q", "--shrink", t.S("top.qcow2"), "520k").Ok();
        StrataCmd("img", "resize", "-q", t.S("top.qcow2"), "567k").Ok();
        QemuIo(t.S("top.qcow2"), ["read -P 0x22 0 520k", "read -P 0 520k 47k"]);
        AssertQemuIdentical(t.Q("top.qcow2"), t.S("top.qcow2"));
        AssertMapsEqual(t.Q("top.qcow2"), t.S("top.qcow2"), "resize --shrink 520k, resize 567k");
        AssertQemuCheckClean(t.S("top.qcow2"));
    }

    /// <summary>Growing an overlay over a longer backing file: the new range reads zeros (unaligned old end included).</summary>
    [Theory]
    [InlineData("384k", "253k", "512k")]
    [InlineData("512k", "256k", "500k")]
    public void ResizeGrowOverLongerBacking_NewRangeReadsZeros(string baseSize, string oldSize, string newSize)
    {
        using var t = new Twin();
        t.Both(p =>
        {
            QemuImg("create", "-q", "-f", "qcow2", p("base.qcow2"), baseSize).Ok();
            QemuIo(p("base.qcow2"), [$"write -P 1 0 {baseSize}"]);
            QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("top.qcow2"), oldSize).Ok();
        });
        QemuImg("resize", "-q", t.Q("top.qcow2"), newSize).Ok();
        StrataCmd("img", "resize", "-q", t.S("top.qcow2"), newSize).Ok();
        AssertQemuIdentical(t.Q("top.qcow2"), t.S("top.qcow2"));
        AssertMapsEqual(t.Q("top.qcow2"), t.S("top.qcow2"), $"resize {oldSize} -> {newSize} over {baseSize}");
    }

    /// <summary>A chain base (2M, data) ← mid (1M) ← top (2M): what top reads past mid's end is zeros.</summary>
    private static void ShortMiddleChain(Func<string, string> p)
    {
        QemuImg("create", "-q", "-f", "qcow2", p("base.qcow2"), "2M").Ok();
        QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p("mid.qcow2"), "1M").Ok();
        QemuImg("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", p("top.qcow2"), "2M").Ok();
        QemuIo(p("base.qcow2"), ["write -P 1 0 2M"]);
        QemuIo(p("mid.qcow2"), ["write -P 2 64k 64k"]);
        QemuIo(p("top.qcow2"), ["write -P 3 128k 64k"]);
    }

    /// <summary>iotest 274's regression: committing into a shorter middle image grows it, and the grown range must
    /// read zeros as the top did, not the base's data.</summary>
    [Fact]
    public void CommitIntoShorterMiddle_GrownTailReadsZeros()
    {
        using var t = new Twin();
        t.Both(ShortMiddleChain);
        QemuImg("commit", "-q", t.Q("top.qcow2")).Ok();
        StrataCmd("img", "commit", "-q", t.S("top.qcow2")).Ok();
        QemuIo(t.S("mid.qcow2"), ["read -P 0 1M 1M", "read -P 3 128k 64k"]);
        AssertQemuIdentical(t.Q("mid.qcow2"), t.S("mid.qcow2"));
        AssertQemuIdentical(t.Q("top.qcow2"), t.S("top.qcow2"));
        AssertMapsEqual(t.Q("mid.qcow2"), t.S("mid.qcow2"), "commit top -> mid");
        AssertQemuCheckClean(t.S("mid.qcow2"));
    }

    /// <summary>commit -b: every layer above the base goes into it, including the zeros past a short middle layer;
    /// the top stays as it was (-b implies -d).</summary>
    [Fact]
    public void CommitToBaseThroughShorterMiddle_AsQemu()
    {
        using var t = new Twin();
        t.Both(ShortMiddleChain);
        QemuImg("commit", "-q", "-b", "base.qcow2", t.Q("top.qcow2")).Ok();
        StrataCmd("img", "commit", "-q", "-b", "base.qcow2", t.S("top.qcow2")).Ok();
        AssertQemuIdentical(t.Q("base.qcow2"), t.S("base.qcow2"));
        AssertMapsEqual(t.Q("base.qcow2"), t.S("base.qcow2"), "commit -b base");
        AssertMapsEqual(t.Q("top.qcow2"), t.S("top.qcow2"), "top after commit -b");
    }

    [Fact]
    public void CommitToLayerNotInChain_FailsAsQemu()
    {
        using var t = new Twin();
        t.Both(ShortMiddleChain);
        var q = QemuImg("commit", "-b", "nowhere.qcow2", t.Q("top.qcow2"));
        var s = StrataCmd("img", "commit", "-b", "nowhere.qcow2", t.S("top.qcow2"));
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(q.Stderr.Replace(t.Q(""), ""), s.Stderr.Replace(t.S(""), "").Replace("strata img", "qemu-img"));
    }

    /// <summary>A backing file named without its format is refused (convert -B / -o backing_file, rebase -u), as
    /// qemu-img 7.2 refuses it, and nothing is created.</summary>
    [Theory]
    [InlineData("convert", "-O", "qcow2", "-B", "base.qcow2", "top.qcow2", "out.qcow2")]
    [InlineData("convert", "-O", "qcow2", "-o", "backing_file=base.qcow2", "top.qcow2", "out.qcow2")]
    [InlineData("rebase", "-u", "-b", "base.qcow2", "top.qcow2")]
    public void BackingFileWithoutFormat_FailsAsQemu(params string[] args)
    {
        using var t = new Twin();
        t.Both(ShortMiddleChain);
        string[] Resolve(Func<string, string> p) => args.Select(a => a.EndsWith(".qcow2", StringComparison.Ordinal) && !a.Contains('=') && a != "base.qcow2" ? p(a) : a).ToArray();
        var q = QemuImg(Resolve(t.Q));
        var s = StrataCmd(["img", .. Resolve(t.S)]);
        Assert.Equal((q.Exit, q.Stdout, q.Stderr), (s.Exit, s.Stdout, s.Stderr.Replace("strata img", "qemu-img")));
        Assert.Equal(File.Exists(t.Q("out.qcow2")), File.Exists(t.S("out.qcow2")));
    }

    /// <summary>iotest 252's regression: rebasing from no backing file onto one with data must make the clusters
    /// the image did not have read zeros as before, as zero clusters (not zero data).</summary>
    [Fact]
    public void RebaseOntoLongerBacking_WritesZeroClusters()
    {
        using var t = new Twin();
        t.Both(p =>
        {
            QemuImg("create", "-q", "-f", "qcow2", p("img.qcow2"), "384k").Ok();
            QemuImg("create", "-q", "-f", "qcow2", p("new.qcow2"), "384k").Ok();
            QemuIo(p("img.qcow2"), ["write -P 0x22 0 128k", "write -P 0x11 128k 128k"]);
            QemuIo(p("new.qcow2"), ["write -P 0x11 0 64k", "write -P 0x11 128k 64k", "write -P 0x11 256k 64k"]);
        });
        QemuImg("rebase", "-b", "new.qcow2", "-F", "qcow2", t.Q("img.qcow2")).Ok();
        StrataCmd("img", "rebase", "-b", "new.qcow2", "-F", "qcow2", t.S("img.qcow2")).Ok();
        QemuIo(t.S("img.qcow2"), ["read -P 0x22 0 128k", "read -P 0x11 128k 128k", "read -P 0 256k 128k"]);
        AssertQemuIdentical(t.Q("img.qcow2"), t.S("img.qcow2"));
        AssertMapsEqual(t.Q("img.qcow2"), t.S("img.qcow2"), "rebase onto a longer backing file");
    }

    /// <summary>iotest 179's regression: zero clusters that keep a host cluster and zero clusters that do not are
    /// separate extents, as are zero clusters whose host clusters are not contiguous.</summary>
    [Fact]
    public void MapJson_ZeroExtentsWithAndWithoutHostOffset_AsQemu()
    {
        using var t = new TempDir();
        string img = t["z.qcow2"];
        QemuImg("create", "-q", "-f", "qcow2", img, "4M").Ok();
        QemuIo(img, ["write -P 1 0 128k", "write -P 1 512k 64k", "write -P 1 256k 64k", "write -z 0 64k", "write -z 64k 64k",
            "write -z 128k 128k", "write -z 256k 64k", "write -z 512k 64k", "write -z 320k 64k"]);
        var q = QemuImg("map", "--output=json", img).Ok();
        var s = StrataCmd("img", "map", "--output=json", img).Ok();
        Assert.Equal(Maps.Normalize(q.Json(), withOffsets: true), Maps.Normalize(s.Json(), withOffsets: true));
    }
}

/// <summary>`strata img measure` and `strata img dd` print and produce what qemu-img does.</summary>
public class MeasureDdInteropTests
{
    private static string Face(string text) => text.Replace("strata img", "qemu-img");

    [Theory]
    [InlineData("--size", "1G", "-O", "qcow2")]
    [InlineData("--size", "10M", "-O", "qcow2", "-o", "cluster_size=2M,refcount_bits=64")]
    [InlineData("--size", "3000k", "-O", "qcow2", "-o", "extended_l2=on", "--output=json")]
    [InlineData("--size", "3000k", "-O", "raw")]
    [InlineData("--size", "abc", "-O", "qcow2")]
    [InlineData("-O", "qcow2")]
    [InlineData("-f", "qcow2", "--size", "1M")]
    public void MeasureSize_PrintsAsQemu(params string[] args)
    {
        var q = QemuImg(["measure", .. args]);
        var s = StrataCmd(["img", "measure", .. args]);
        Assert.Equal((q.Exit, q.Stdout, q.Stderr), (s.Exit, s.Stdout, Face(s.Stderr)));
    }

    [Theory]
    [InlineData("qcow2", "human", "")]
    [InlineData("qcow2", "json", "cluster_size=2M")]
    [InlineData("qcow2", "human", "compat=0.10")]
    [InlineData("qcow2", "human", "backing_file=x.qcow2")]
    [InlineData("raw", "json", "")]
    public void MeasureImageWithDataAndBitmaps_PrintsAsQemu(string target, string output, string options)
    {
        using var t = new TempDir();
        string img = t["m.qcow2"];
        Workloads.QemuQcow2(img, "64M", Workloads.Mixed);
        QemuImg("bitmap", "--add", "-g", "512", img, "b1").Ok();
        QemuImg("bitmap", "--add", "-g", "2M", img, "bitmap-two").Ok();
        string[] args = ["measure", "--output=" + output, "-O", target, .. options.Length > 0 ? new[] { "-o", options } : [], img];
        var q = QemuImg(args).Ok();
        var s = StrataCmd(["img", .. args]).Ok();
        Assert.Equal(q.Stdout, s.Stdout);
    }

    [Theory]
    [InlineData("bs=512", "skip=1", "count=2")]
    [InlineData("bs=64k", "count=3")]
    [InlineData("bs=1M", "skip=2")]
    [InlineData("bs=4k", "skip=100000")]
    public void Dd_CopiesAsQemu(params string[] operands)
    {
        using var t = new TempDir();
        string src = t["in.qcow2"];
        Workloads.QemuQcow2(src, "8M", ["write -P 0x11 0 1M", "write -P 0x22 3M 64k", "write -z 4M 1M", "write -P 0x33 7M 1M"]);
        var q = QemuImg(["dd", "-f", "qcow2", "-O", "qcow2", .. operands, "if=" + src, "of=" + t["q.qcow2"]]);
        var s = StrataCmd(["img", "dd", "-f", "qcow2", "-O", "qcow2", .. operands, "if=" + src, "of=" + t["s.qcow2"]]);
        Assert.Equal((q.Exit, q.Stdout), (s.Exit, s.Stdout));
        Assert.Equal(q.Stderr, Face(s.Stderr));
        AssertQemuIdentical(t["q.qcow2"], t["s.qcow2"], "-s");
        AssertQemuCheckClean(t["s.qcow2"]);
    }

    [Theory]
    [InlineData("if=x")]
    [InlineData("bs=0", "if=x", "of=y")]
    [InlineData("foo=1", "if=x", "of=y")]
    [InlineData("count=-1", "if=x", "of=y")]
    public void DdBadOperands_FailAsQemu(params string[] operands)
    {
        var q = QemuImg(["dd", .. operands]);
        var s = StrataCmd(["img", "dd", .. operands]);
        Assert.Equal((q.Exit, q.Stdout, q.Stderr), (s.Exit, s.Stdout, Face(s.Stderr)));
    }
}
