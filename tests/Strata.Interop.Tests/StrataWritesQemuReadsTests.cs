using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Requirement 1: images Strata creates, writes, converts, commits, rebases and resizes pass `qemu-img check`
/// and read back identical (`qemu-img compare`) to a reference QEMU builds from the same operations.
/// </summary>
public class StrataWritesQemuReadsTests
{
    public static TheoryData<string[]> CreateOptions => new()
    {
        Array.Empty<string>(),
        new[] { "-o", "cluster_size=512" },
        new[] { "-o", "cluster_size=2M" },
        new[] { "-o", "compression_type=zstd" },
    };

    [Theory]
    [MemberData(nameof(CreateOptions))]
    public void Qcow2_CreatedAndWrittenByStrata_IsCleanAndMatchesQemu(string[] createOptions)
    {
        using var t = new TempDir();
        string mine = t["strata.qcow2"], theirs = t["qemu.qcow2"];
        Workloads.StrataQcow2(mine, "64M", Workloads.Mixed, createOptions);
        Workloads.QemuQcow2(theirs, "64M", Workloads.Mixed, createOptions);
        AssertQemuCheckClean(mine);
        AssertQemuIdentical(mine, theirs);
        var a = QemuImg("info", "--output=json", mine).Ok().Json();
        var b = QemuImg("info", "--output=json", theirs).Ok().Json();
        Assert.Equal(b.GetProperty("virtual-size").GetInt64(), a.GetProperty("virtual-size").GetInt64());
        Assert.Equal(b.GetProperty("cluster-size").GetInt64(), a.GetProperty("cluster-size").GetInt64());
        Assert.Equal(b.GetProperty("format-specific").GetRawText(), a.GetProperty("format-specific").GetRawText());
    }

    public static TheoryData<QemuWritesStrataReadsTests.Kind> QemuKinds => new(Enum.GetValues<QemuWritesStrataReadsTests.Kind>());

    /// <summary>Strata io writing into images QEMU made (compressed, zstd, v2, refcount_bits=8, chains, ...).</summary>
    [Theory]
    [MemberData(nameof(QemuKinds))]
    public void StrataIo_IntoQemuImage_IsCleanAndMatchesQemuIo(QemuWritesStrataReadsTests.Kind kind)
    {
        using var t = new TempDir();
        var (src, fmt) = QemuWritesStrataReadsTests.Build(t, kind);
        // a copy of the whole folder so backing files are private to each side
        string other = Path.Combine(t.Path, "q");
        Directory.CreateDirectory(other);
        foreach (var f in Directory.GetFiles(t.Path)) File.Copy(f, Path.Combine(other, Path.GetFileName(f)));
        string theirs = Path.Combine(other, Path.GetFileName(src));
        var writes = new[]
        {
            "write -P 0xe1 0 4k", "write -P 0xe2 65000 70000", "write -z 1M 128k", "discard 2M 64k", "write -P 0xe3 10M 1M",
            "write -z -u 20M 64k", "write -P 0xe4 48M 64k", "write -P 0xe5 63M 1M",
        };
        StrataIo(src, writes, fmt);
        QemuIo(theirs, writes, fmt);
        if (fmt == "qcow2") AssertQemuCheckClean(src);
        AssertQemuIdentical(src, theirs, "-f", fmt, "-F", fmt);
    }

    [Fact]
    public void Qcow2_FreshlyCreatedByStrata_IsClean()
    {
        using var t = new TempDir();
        StrataCmd("img", "create", "-f", "qcow2", t["e.qcow2"], "64M").Ok();
        AssertQemuCheckClean(t["e.qcow2"]);
        QemuImg("create", "-q", "-f", "qcow2", t["q.qcow2"], "64M").Ok();
        AssertQemuIdentical(t["e.qcow2"], t["q.qcow2"], "-s");
    }

    [Fact]
    public void Raw_CreatedAndWrittenByStrata_MatchesQemuByteForByte()
    {
        using var t = new TempDir();
        StrataCmd("img", "create", "-f", "raw", t["s.raw"], "64M").Ok();
        StrataIo(t["s.raw"], Workloads.Mixed, "raw");
        QemuImg("create", "-q", "-f", "raw", t["q.raw"], "64M").Ok();
        QemuIo(t["q.raw"], Workloads.Mixed, "raw");
        AssertQemuIdentical(t["s.raw"], t["q.raw"], "-f", "raw", "-F", "raw");
        Assert.True(File.ReadAllBytes(t["s.raw"]).AsSpan().SequenceEqual(File.ReadAllBytes(t["q.raw"])), "raw files differ");
    }

    [Fact]
    public void Overlay_CreatedAndWrittenByStrata_IsCleanAndMatchesQemu()
    {
        using var t = new TempDir();
        foreach (var (who, prefix) in new[] { ("strata", "s"), ("qemu", "q") })
        {
            string b = t[prefix + "-base.qcow2"], o = t[prefix + "-top.qcow2"];
            var baseWrites = new[] { "write -P 0x01 0 2M", "write -P 0x02 8M 1M" };
            var topWrites = new[] { "write -P 0x03 1M 64k", "write -z 8M 64k", "write -P 0x04 9M 4k", "discard 0 64k" };
            if (who == "strata")
            {
                Workloads.StrataQcow2(b, "64M", baseWrites);
                StrataCmd("img", "create", "-q", "-f", "qcow2", "-b", prefix + "-base.qcow2", "-F", "qcow2", o).Ok();
                StrataIo(o, topWrites, "qcow2");
            }
            else
            {
                Workloads.QemuQcow2(b, "64M", baseWrites);
                QemuImg("create", "-q", "-f", "qcow2", "-b", prefix + "-base.qcow2", "-F", "qcow2", o).Ok();
                QemuIo(o, topWrites, "qcow2");
            }
        }
        AssertQemuCheckClean(t["s-base.qcow2"]);
        AssertQemuCheckClean(t["s-top.qcow2"]);
        AssertQemuIdentical(t["s-top.qcow2"], t["q-top.qcow2"]);
        AssertMapsEqualIgnoringOffsets(t["s-top.qcow2"], t["q-top.qcow2"]);
    }

    public static TheoryData<string, string[]> ConvertCases => new()
    {
        { "qcow2", new[] { "-O", "qcow2" } },
        { "qcow2", new[] { "-O", "raw" } },
        { "raw", new[] { "-O", "qcow2" } },
        { "qcow2", new[] { "-O", "qcow2", "-c" } },
        { "qcow2", new[] { "-O", "qcow2", "-c", "-o", "compression_type=zstd" } },
        { "qcow2", new[] { "-O", "qcow2", "-o", "compression_type=zstd" } },
        { "qcow2", new[] { "-O", "qcow2", "-o", "cluster_size=512" } },
        { "qcow2", new[] { "-O", "qcow2", "-o", "cluster_size=2M" } },
        { "qcow2", new[] { "-O", "qcow2", "-o", "cluster_size=64k" } },
        { "raw", new[] { "-O", "qcow2", "-c", "-o", "cluster_size=2M" } },
    };

    [Theory]
    [MemberData(nameof(ConvertCases))]
    public void Convert_ByStrata_IsCleanAndMatchesQemuConvert(string sourceFormat, string[] options)
    {
        using var t = new TempDir();
        string src = t["src.qcow2"];
        Workloads.QemuQcow2(src, "64M", Workloads.Mixed);
        if (sourceFormat == "raw")
        {
            QemuImg("convert", "-O", "raw", src, t["src.raw"]).Ok();
            src = t["src.raw"];
        }
        string outFormat = options[Array.IndexOf(options, "-O") + 1];
        string mine = t["strata.out"], theirs = t["qemu.out"];
        StrataCmd(["img", "convert", "-f", sourceFormat, .. options, src, mine]).Ok();
        QemuImg(["convert", "-f", sourceFormat, .. options, src, theirs]).Ok();
        if (outFormat == "qcow2") AssertQemuCheckClean(mine);
        AssertQemuIdentical(mine, theirs, "-f", outFormat, "-F", outFormat);
        AssertQemuIdentical(src, mine, "-f", sourceFormat, "-F", outFormat);
        if (outFormat == "raw")
            Assert.True(File.ReadAllBytes(mine).AsSpan().SequenceEqual(File.ReadAllBytes(theirs)), "raw output differs from qemu-img convert -O raw");
        if (outFormat == "qcow2")
        {
            var a = QemuImg("info", "--output=json", mine).Ok().Json();
            var b = QemuImg("info", "--output=json", theirs).Ok().Json();
            Assert.Equal(b.GetProperty("cluster-size").GetInt64(), a.GetProperty("cluster-size").GetInt64());
            Assert.Equal(b.GetProperty("virtual-size").GetInt64(), a.GetProperty("virtual-size").GetInt64());
            Assert.Equal(b.GetProperty("format-specific").GetRawText(), a.GetProperty("format-specific").GetRawText());
            if (options.Contains("-c"))
            {
                var ca = QemuImg("check", "--output=json", mine).Ok().Json();
                Assert.True(ca.TryGetProperty("compressed-clusters", out var cc) && cc.GetInt64() > 0,
                    "strata convert -c produced no compressed clusters: " + ca.GetRawText());
            }
        }
    }

    [Fact]
    public void Convert_ByStrata_FlattensThreeDeepChain()
    {
        using var t = new TempDir();
        Chains.BuildQemuChain(t);
        StrataCmd("img", "convert", "-O", "qcow2", t["c2.qcow2"], t["flat.qcow2"]).Ok();
        AssertQemuCheckClean(t["flat.qcow2"]);
        AssertQemuIdentical(t["flat.qcow2"], t["c2.qcow2"]);
        var info = QemuImg("info", "--output=json", t["flat.qcow2"]).Ok().Json();
        Assert.False(info.TryGetProperty("backing-filename", out _), "flattened image still has a backing file");
    }

    [Fact]
    public void Commit_ByStrata_IsCleanAndMatchesQemuCommit()
    {
        using var t = new TempDir();
        var baseWrites = new[] { "write -P 0x01 0 2M", "write -P 0x02 8M 1M" };
        var topWrites = new[] { "write -P 0x03 1M 64k", "write -z 8M 64k", "write -P 0x04 9M 4k", "write -P 0x05 30M 1M" };
        foreach (var p in new[] { "s", "q" })
        {
            Workloads.QemuQcow2(t[p + "b.qcow2"], "64M", baseWrites);
            QemuImg("create", "-q", "-f", "qcow2", "-b", p + "b.qcow2", "-F", "qcow2", t[p + "t.qcow2"]).Ok();
            QemuIo(t[p + "t.qcow2"], topWrites, "qcow2");
        }
        StrataCmd("img", "commit", t["st.qcow2"]).Ok();
        QemuImg("commit", t["qt.qcow2"]).Ok();
        AssertQemuCheckClean(t["sb.qcow2"]);
        AssertQemuCheckClean(t["st.qcow2"]);
        AssertQemuIdentical(t["sb.qcow2"], t["qb.qcow2"]);
        AssertQemuIdentical(t["st.qcow2"], t["qt.qcow2"]);
        AssertMapsEqualIgnoringOffsets(t["st.qcow2"], t["qt.qcow2"]);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Rebase_ByStrata_IsCleanAndMatchesQemuRebase(bool unsafeMode)
    {
        using var t = new TempDir();
        foreach (var p in new[] { "s", "q" })
        {
            Workloads.QemuQcow2(t[p + "old.qcow2"], "64M", ["write -P 0x01 0 2M", "write -P 0x02 8M 1M", "write -P 0x06 40M 64k"]);
            Workloads.QemuQcow2(t[p + "new.qcow2"], "64M", ["write -P 0x07 1M 2M", "write -P 0x02 8M 512k", "write -P 0x08 50M 64k"]);
            QemuImg("create", "-q", "-f", "qcow2", "-b", p + "old.qcow2", "-F", "qcow2", t[p + "top.qcow2"]).Ok();
            QemuIo(t[p + "top.qcow2"], ["write -P 0x03 1M 64k", "write -z 8M 64k", "write -P 0x04 9M 4k"], "qcow2");
        }
        QemuImg("convert", "-O", "raw", t["stop.qcow2"], t["before.raw"]).Ok();
        string[] mode = unsafeMode ? ["-u"] : [];
        StrataCmd(["img", "rebase", .. mode, "-b", "snew.qcow2", "-F", "qcow2", t["stop.qcow2"]]).Ok();
        QemuImg(["rebase", .. mode, "-b", "qnew.qcow2", "-F", "qcow2", t["qtop.qcow2"]]).Ok();
        AssertQemuCheckClean(t["stop.qcow2"]);
        AssertQemuIdentical(t["stop.qcow2"], t["qtop.qcow2"]);
        if (!unsafeMode) AssertQemuIdentical(t["stop.qcow2"], t["before.raw"], "-F", "raw");
        var info = QemuImg("info", "--output=json", t["stop.qcow2"]).Ok().Json();
        Assert.Equal("snew.qcow2", info.GetProperty("backing-filename").GetString());
        Assert.Equal("qcow2", info.GetProperty("backing-filename-format").GetString());
    }

    [Fact]
    public void Rebase_ByStrata_OntoNothing_FlattensLikeQemu()
    {
        using var t = new TempDir();
        foreach (var p in new[] { "s", "q" })
        {
            Workloads.QemuQcow2(t[p + "old.qcow2"], "64M", ["write -P 0x01 0 2M", "write -P 0x02 8M 1M"]);
            QemuImg("create", "-q", "-f", "qcow2", "-b", p + "old.qcow2", "-F", "qcow2", t[p + "top.qcow2"]).Ok();
            QemuIo(t[p + "top.qcow2"], ["write -P 0x03 1M 64k"], "qcow2");
        }
        QemuImg("convert", "-O", "raw", t["stop.qcow2"], t["before.raw"]).Ok();
        StrataCmd("img", "rebase", "-b", "", t["stop.qcow2"]).Ok();
        QemuImg("rebase", "-b", "", t["qtop.qcow2"]).Ok();
        AssertQemuCheckClean(t["stop.qcow2"]);
        AssertQemuIdentical(t["stop.qcow2"], t["qtop.qcow2"]);
        AssertQemuIdentical(t["stop.qcow2"], t["before.raw"], "-F", "raw");
        Assert.False(QemuImg("info", "--output=json", t["stop.qcow2"]).Ok().Json().TryGetProperty("backing-filename", out _));
    }

    public static TheoryData<string, string, string[]> ResizeCases => new()
    {
        { "qcow2", "96M", Array.Empty<string>() },
        { "qcow2", "+10M", Array.Empty<string>() },
        { "qcow2", "32M", new[] { "--shrink" } },
        { "qcow2", "20004864", new[] { "--shrink" } },
        { "raw", "80M", Array.Empty<string>() },
        { "raw", "32M", new[] { "--shrink" } },
    };

    [Theory]
    [MemberData(nameof(ResizeCases))]
    public void Resize_ByStrata_IsCleanAndMatchesQemuResize(string format, string size, string[] options)
    {
        using var t = new TempDir();
        foreach (var p in new[] { "s", "q" })
        {
            QemuImg("create", "-q", "-f", format, t[p + ".img"], "64M").Ok();
            QemuIo(t[p + ".img"], Workloads.Mixed, format);
        }
        StrataCmd(["img", "resize", "-f", format, .. options, t["s.img"], size]).Ok();
        QemuImg(["resize", "-f", format, .. options, t["q.img"], size]).Ok();
        if (format == "qcow2") AssertQemuCheckClean(t["s.img"]);
        AssertQemuIdentical(t["s.img"], t["q.img"], "-s", "-f", format, "-F", format);
        var a = QemuImg("info", "--output=json", "-f", format, t["s.img"]).Ok().Json();
        var b = QemuImg("info", "--output=json", "-f", format, t["q.img"]).Ok().Json();
        Assert.Equal(b.GetProperty("virtual-size").GetInt64(), a.GetProperty("virtual-size").GetInt64());
        // the grown area must read as zeros and further writes there must work
        if (format == "qcow2")
        {
            long vs = a.GetProperty("virtual-size").GetInt64();
            var more = new[] { $"write -P 0x77 {vs - 65536} 65536" };
            StrataIo(t["s.img"], more, format);
            QemuIo(t["q.img"], more, format);
            AssertQemuCheckClean(t["s.img"]);
            AssertQemuIdentical(t["s.img"], t["q.img"]);
        }
    }

    /// <summary>qemu-img map --output=json of two images, equal except host offsets.</summary>
    internal static void AssertMapsEqualIgnoringOffsets(string a, string b)
    {
        var ma = QemuImg("map", "--output=json", a).Ok().Json();
        var mb = QemuImg("map", "--output=json", b).Ok().Json();
        Assert.Equal(Maps.Merged(mb), Maps.Merged(ma));
    }
}
