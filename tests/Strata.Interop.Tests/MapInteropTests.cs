using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>Requirement 3 (map): `strata img map --output=json` equals `qemu-img map --output=json` on the same image.</summary>
public class MapInteropTests
{
    public enum Case { DataZeroDiscard, Chain3, Compressed, RawWithData, Cluster512, Cluster2M, Compat010, OverlayOnRaw, LargerOverlay }

    private static (string Path, string Format) Build(TempDir t, Case c)
    {
        switch (c)
        {
            case Case.DataZeroDiscard:
                Workloads.QemuQcow2(t["m.qcow2"], "64M", Workloads.Mixed);
                return (t["m.qcow2"], "qcow2");
            case Case.Chain3:
                Chains.BuildQemuChain(t);
                return (t["c2.qcow2"], "qcow2");
            case Case.Compressed:
                Workloads.QemuQcow2(t["p.qcow2"], "64M", Workloads.Mixed);
                QemuImg("convert", "-c", "-O", "qcow2", t["p.qcow2"], t["m.qcow2"]).Ok();
                QemuIo(t["m.qcow2"], ["write -P 0x67 0 64k", "write -z 20M 64k"], "qcow2");
                return (t["m.qcow2"], "qcow2");
            case Case.RawWithData:
                QemuImg("create", "-q", "-f", "raw", t["m.raw"], "64M").Ok();
                QemuIo(t["m.raw"], ["write -P 0x11 0 1M", "write -P 0x12 8M 64k", "write -P 0x13 63M 1M"], "raw");
                return (t["m.raw"], "raw");
            case Case.Cluster512:
                Workloads.QemuQcow2(t["m.qcow2"], "64M", Workloads.Mixed, "-o", "cluster_size=512");
                return (t["m.qcow2"], "qcow2");
            case Case.Cluster2M:
                Workloads.QemuQcow2(t["m.qcow2"], "64M", Workloads.Mixed, "-o", "cluster_size=2M");
                return (t["m.qcow2"], "qcow2");
            case Case.Compat010:
                Workloads.QemuQcow2(t["m.qcow2"], "64M", Workloads.Mixed, "-o", "compat=0.10");
                return (t["m.qcow2"], "qcow2");
            case Case.OverlayOnRaw:
                QemuImg("create", "-q", "-f", "raw", t["b.raw"], "64M").Ok();
                QemuIo(t["b.raw"], ["write -P 0x11 0 2M", "write -P 0x12 10M 64k"], "raw");
                QemuImg("create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", t["m.qcow2"]).Ok();
                QemuIo(t["m.qcow2"], ["write -P 0x21 1M 64k", "write -z 10M 64k"], "qcow2");
                return (t["m.qcow2"], "qcow2");
            case Case.LargerOverlay:
                Workloads.QemuQcow2(t["b.qcow2"], "32M", ["write -P 0x11 0 2M", "write -P 0x12 31M 1M"]);
                QemuImg("create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", t["m.qcow2"], "64M").Ok();
                QemuIo(t["m.qcow2"], ["write -P 0x21 1M 64k", "write -P 0x22 40M 64k"], "qcow2");
                return (t["m.qcow2"], "qcow2");
        }
        throw new ArgumentOutOfRangeException(nameof(c));
    }

    public static TheoryData<Case> Cases => new(Enum.GetValues<Case>());

    [Theory]
    [MemberData(nameof(Cases))]
    public void MapJson_EqualsQemu(Case c)
    {
        using var t = new TempDir();
        var (img, fmt) = Build(t, c);
        var q = QemuImg("map", "--output=json", "-f", fmt, img).Ok();
        var s = StrataCmd("img", "map", "--output=json", "-f", fmt, img).Ok();
        Maps.AssertEqual(q.Json(), s.Json(), $"map --output=json ({c})");
    }

    [Theory]
    [InlineData(Case.DataZeroDiscard, "2M", "9M")]
    [InlineData(Case.Chain3, "1000000", "40000000")]
    public void MapJson_WithRange_EqualsQemu(Case c, string start, string length)
    {
        using var t = new TempDir();
        var (img, fmt) = Build(t, c);
        var q = QemuImg("map", "--output=json", "--start-offset", start, "--max-length", length, img).Ok();
        var s = StrataCmd("img", "map", "--output=json", "--start-offset", start, "--max-length", length, img).Ok();
        Maps.AssertEqual(q.Json(), s.Json(), $"map --output=json --start-offset {start} --max-length {length} ({c})");
        _ = fmt;
    }

    [Theory]
    [InlineData(Case.DataZeroDiscard)]
    [InlineData(Case.Chain3)]
    [InlineData(Case.RawWithData)]
    [InlineData(Case.Compressed)]
    public void MapHuman_EqualsQemu(Case c)
    {
        using var t = new TempDir();
        var (img, fmt) = Build(t, c);
        var q = QemuImg("map", "-f", fmt, img);
        var s = StrataCmd("img", "map", "-f", fmt, img);
        Assert.True(q.Exit == s.Exit, $"exit codes differ\n{q}\n{s}");
        Assert.Equal(q.Stdout, s.Stdout);
        Assert.Equal(InfoInteropTests.NormalizeErrorPrefix(q.Stderr), InfoInteropTests.NormalizeErrorPrefix(s.Stderr));
    }
}
