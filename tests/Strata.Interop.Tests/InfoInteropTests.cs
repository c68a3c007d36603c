using System.Text.Json;
using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>Requirement 3 (info): `strata img info` agrees with `qemu-img info` in JSON (field by field) and human form.</summary>
public class InfoInteropTests
{
    public enum Case { Fresh, Plain, Overlay, OverlayAbsoluteBacking, OverlayOnRaw, Chain3, Zstd, Compressed, Compat010, Cluster512, Refcount8Lazy, Dirty, Raw, Resized }

    private static string Build(TempDir t, Case c)
    {
        switch (c)
        {
            case Case.Fresh:
                QemuImg("create", "-q", "-f", "qcow2", t["a.qcow2"], "64M").Ok();
                return t["a.qcow2"];
            case Case.Plain:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", Workloads.Mixed);
                return t["a.qcow2"];
            case Case.Overlay:
                Workloads.QemuQcow2(t["base.qcow2"], "64M", ["write -P 0x11 0 2M"]);
                QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", t["top.qcow2"], "128M").Ok();
                return t["top.qcow2"];
            case Case.OverlayAbsoluteBacking:
                Workloads.QemuQcow2(t["base.qcow2"], "64M", ["write -P 0x11 0 2M"]);
                QemuImg("create", "-q", "-f", "qcow2", "-b", t["base.qcow2"], "-F", "qcow2", t["top.qcow2"]).Ok();
                return t["top.qcow2"];
            case Case.OverlayOnRaw:
                QemuImg("create", "-q", "-f", "raw", t["base.raw"], "32M").Ok();
                QemuImg("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", t["top.qcow2"]).Ok();
                return t["top.qcow2"];
            case Case.Chain3:
                Chains.BuildQemuChain(t);
                return t["c2.qcow2"];
            case Case.Zstd:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -c -P 0x11 0 64k"], "-o", "compression_type=zstd");
                return t["a.qcow2"];
            case Case.Compressed:
                Workloads.QemuQcow2(t["p.qcow2"], "64M", Workloads.Mixed);
                QemuImg("convert", "-c", "-O", "qcow2", t["p.qcow2"], t["a.qcow2"]).Ok();
                return t["a.qcow2"];
            case Case.Compat010:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -P 0x11 0 1M"], "-o", "compat=0.10");
                return t["a.qcow2"];
            case Case.Cluster512:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -P 0x11 0 1M"], "-o", "cluster_size=512");
                return t["a.qcow2"];
            case Case.Refcount8Lazy:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -P 0x11 0 1M"], "-o", "refcount_bits=8,lazy_refcounts=on");
                return t["a.qcow2"];
            case Case.Dirty:
                // lazy refcounts image with the dirty bit (incompatible feature bit 0) set, as after a crash
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -P 0x11 0 1M"], "-o", "lazy_refcounts=on");
                Qcow2Edit.WriteU64(t["a.qcow2"], 72, Qcow2Edit.ReadU64(t["a.qcow2"], 72) | 1);
                return t["a.qcow2"];
            case Case.Raw:
                QemuImg("create", "-q", "-f", "raw", t["a.raw"], "64M").Ok();
                QemuIo(t["a.raw"], ["write -P 0x11 0 1M"], "raw");
                return t["a.raw"];
            case Case.Resized:
                Workloads.QemuQcow2(t["a.qcow2"], "64M", ["write -P 0x11 0 1M"]);
                QemuImg("resize", t["a.qcow2"], "100000256").Ok();
                return t["a.qcow2"];
        }
        throw new ArgumentOutOfRangeException(nameof(c));
    }

    public static TheoryData<Case> Cases => new(Enum.GetValues<Case>());

    private static readonly string[] TopLevelFields =
        ["virtual-size", "format", "cluster-size", "backing-filename", "full-backing-filename", "backing-filename-format", "dirty-flag", "filename"];

    private static void AssertInfoObjectsAgree(JsonElement qemu, JsonElement strata, string context)
    {
        foreach (var f in TopLevelFields)
        {
            bool qh = qemu.TryGetProperty(f, out var qv);
            bool sh = strata.TryGetProperty(f, out var sv);
            Assert.True(qh == sh, $"{context}: field '{f}' present in qemu-img: {qh} ({(qh ? qv.GetRawText() : "")}), in strata: {sh} ({(sh ? sv.GetRawText() : "")})");
            if (qh) Assert.True(qv.GetRawText() == sv.GetRawText(), $"{context}: field '{f}': qemu-img {qv.GetRawText()}, strata {sv.GetRawText()}");
        }
        bool qfs = qemu.TryGetProperty("format-specific", out var qf);
        bool sfs = strata.TryGetProperty("format-specific", out var sf);
        Assert.True(qfs == sfs, $"{context}: format-specific present in qemu-img: {qfs}, in strata: {sfs}");
        if (!qfs) return;
        Assert.Equal(qf.GetProperty("type").GetString(), sf.GetProperty("type").GetString());
        var qd = qf.GetProperty("data").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetRawText());
        var sd = sf.GetProperty("data").EnumerateObject().ToDictionary(p => p.Name, p => p.Value.GetRawText());
        foreach (var (k, v) in qd)
            Assert.True(sd.TryGetValue(k, out var s) && s == v, $"{context}: format-specific.data.{k}: qemu-img {v}, strata {(sd.TryGetValue(k, out var s2) ? s2 : "<missing>")}");
        foreach (var k in sd.Keys)
            Assert.True(qd.ContainsKey(k), $"{context}: format-specific.data.{k} present in strata only");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void InfoJson_AgreesWithQemu(Case c)
    {
        using var t = new TempDir();
        string img = Build(t, c);
        var q = QemuImg("info", "--output=json", img).Ok();
        var s = StrataCmd("img", "info", "--output=json", img).Ok();
        AssertInfoObjectsAgree(q.Json(), s.Json(), $"info --output=json ({c})");
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void InfoJsonBackingChain_AgreesWithQemu(Case c)
    {
        using var t = new TempDir();
        string img = Build(t, c);
        var q = QemuImg("info", "--output=json", "--backing-chain", img).Ok().Json();
        var s = StrataCmd("img", "info", "--output=json", "--backing-chain", img).Ok().Json();
        Assert.Equal(JsonValueKind.Array, s.ValueKind);
        Assert.Equal(q.GetArrayLength(), s.GetArrayLength());
        for (int i = 0; i < q.GetArrayLength(); i++)
            AssertInfoObjectsAgree(q[i], s[i], $"info --output=json --backing-chain ({c}) layer {i}");
    }

    private static string WithoutDiskSize(string text) =>
        string.Join("\n", text.Split('\n').Where(l => !l.StartsWith("disk size:", StringComparison.Ordinal)));

    [Theory]
    [MemberData(nameof(Cases))]
    public void InfoHuman_EqualsQemuExceptDiskSize(Case c)
    {
        using var t = new TempDir();
        string img = Build(t, c);
        foreach (var extra in new[] { Array.Empty<string>(), new[] { "--backing-chain" } })
        {
            var q = QemuImg(["info", .. extra, img]).Ok();
            var s = StrataCmd(["img", "info", .. extra, img]).Ok();
            Assert.Equal(WithoutDiskSize(q.Stdout), WithoutDiskSize(s.Stdout));
            Assert.Contains("\ndisk size: ", s.Stdout);
        }
    }

    internal static string NormalizeErrorPrefix(string stderr) =>
        System.Text.RegularExpressions.Regex.Replace(stderr, @"^(strata img|strata io|qemu-img|qemu-io):", "PROG:", System.Text.RegularExpressions.RegexOptions.Multiline);

    public enum BadCase { Nonexistent, Truncated50, UnknownIncompatibleBit, UnalignedL1, LoopInfo, LoopInfoChain, LoopInfoChainJson, Directory, EmptyFileAsQcow2 }

    [Theory]
    [InlineData(BadCase.Nonexistent)]
    [InlineData(BadCase.Truncated50)]
    [InlineData(BadCase.UnknownIncompatibleBit)]
    [InlineData(BadCase.UnalignedL1)]
    [InlineData(BadCase.LoopInfo)]
    [InlineData(BadCase.LoopInfoChain)]
    [InlineData(BadCase.LoopInfoChainJson)]
    [InlineData(BadCase.Directory)]
    [InlineData(BadCase.EmptyFileAsQcow2)]
    public void InfoOnBadInput_SameOutputAsQemuExceptPrefix(BadCase c)
    {
        using var t = new TempDir();
        string[] args;
        switch (c)
        {
            case BadCase.Nonexistent:
                args = [t["nonexist.qcow2"]];
                break;
            case BadCase.Truncated50:
                Workloads.QemuQcow2(t["d.qcow2"], "64M", ["write -P 0xab 0 1M"]);
                File.WriteAllBytes(t["t.qcow2"], File.ReadAllBytes(t["d.qcow2"])[..50]);
                args = [t["t.qcow2"]];
                break;
            case BadCase.UnknownIncompatibleBit:
                Workloads.QemuQcow2(t["d.qcow2"], "64M", ["write -P 0xab 0 1M"]);
                Qcow2Edit.WriteU64(t["d.qcow2"], 72, Qcow2Edit.ReadU64(t["d.qcow2"], 72) | (1UL << 20));
                args = [t["d.qcow2"]];
                break;
            case BadCase.UnalignedL1:
                Workloads.QemuQcow2(t["d.qcow2"], "64M", ["write -P 0xab 0 1M"]);
                Qcow2Edit.WriteU64(t["d.qcow2"], 40, 0x12345);
                args = [t["d.qcow2"]];
                break;
            case BadCase.LoopInfo or BadCase.LoopInfoChain or BadCase.LoopInfoChainJson:
                BuildLoop(t);
                args = c switch
                {
                    BadCase.LoopInfo => [t["la.qcow2"]],
                    BadCase.LoopInfoChain => ["--backing-chain", t["la.qcow2"]],
                    _ => ["--backing-chain", "--output=json", t["la.qcow2"]],
                };
                break;
            case BadCase.Directory:
                args = [t.Path];
                break;
            case BadCase.EmptyFileAsQcow2:
                File.WriteAllBytes(t["empty.img"], []);
                args = ["-f", "qcow2", t["empty.img"]];
                break;
            default:
                throw new ArgumentOutOfRangeException(nameof(c));
        }
        var q = QemuImg(["info", .. args]);
        var s = StrataCmd(["img", "info", .. args]);
        Assert.True(q.Exit == s.Exit, $"exit codes differ: qemu-img {q.Exit}, strata {s.Exit}\n{q}\n{s}");
        Assert.Equal(WithoutDiskSize(q.Stdout), WithoutDiskSize(s.Stdout));
        Assert.Equal(NormalizeErrorPrefix(q.Stderr), NormalizeErrorPrefix(s.Stderr));
    }

    /// <summary>la.qcow2 and lb.qcow2 backed by each other (qemu-img rebase -u).</summary>
    internal static void BuildLoop(TempDir t)
    {
        QemuImg("create", "-q", "-f", "qcow2", t["la.qcow2"], "64M").Ok();
        QemuImg("create", "-q", "-f", "qcow2", "-b", "la.qcow2", "-F", "qcow2", t["lb.qcow2"]).Ok();
        QemuImg("rebase", "-u", "-b", "lb.qcow2", "-F", "qcow2", t["la.qcow2"]).Ok();
    }
}
