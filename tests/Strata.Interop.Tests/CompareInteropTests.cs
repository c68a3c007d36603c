using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>Requirement 5: `strata img compare` prints and exits exactly like `qemu-img compare`.</summary>
public class CompareInteropTests
{
    /// <summary>Builds the named image (and what it depends on) in <paramref name="t"/>, QEMU only.</summary>
    private static void Need(TempDir t, string name)
    {
        if (File.Exists(t[name]) || name.StartsWith("nonexist", StringComparison.Ordinal)) return;
        switch (name)
        {
            case "c1.qcow2":
                Workloads.QemuQcow2(t[name], "64M", ["write -P 0x11 0 1M", "write -P 0x22 5M 512"]);
                break;
            case "c2.qcow2":
                Need(t, "c1.qcow2");
                QemuImg("convert", "-O", "qcow2", t["c1.qcow2"], t[name]).Ok();
                break;
            case "c1.raw":
                Need(t, "c1.qcow2");
                QemuImg("convert", "-O", "raw", t["c1.qcow2"], t[name]).Ok();
                break;
            case "c3.qcow2":
                Need(t, "c2.qcow2");
                File.Copy(t["c2.qcow2"], t[name]);
                QemuIo(t[name], ["write -P 0x33 5M 512", "write -P 0x44 7M 64k"], "qcow2");
                break;
            case "c4.qcow2":
                Need(t, "c2.qcow2");
                File.Copy(t["c2.qcow2"], t[name]);
                QemuIo(t[name], ["write -P 0x12 1000 1"], "qcow2");
                break;
            case "c5.qcow2":
                Need(t, "c2.qcow2");
                File.Copy(t["c2.qcow2"], t[name]);
                QemuIo(t[name], ["write -P 0x99 123456 1"], "qcow2");
                break;
            case "big.qcow2":
                Workloads.QemuQcow2(t[name], "128M", ["write -P 0x11 0 1M", "write -P 0x22 5M 512"]);
                break;
            case "big2.qcow2":
                Workloads.QemuQcow2(t[name], "128M", ["write -P 0x11 0 1M", "write -P 0x22 5M 512", "write -P 0x55 100M 64k"]);
                break;
            case "big.raw":
                Need(t, "big2.qcow2");
                QemuImg("convert", "-O", "raw", t["big2.qcow2"], t[name]).Ok();
                break;
            case "e1.qcow2":
                Workloads.QemuQcow2(t[name], "64M", ["write -P 0 1M 64k"]);
                break;
            case "e2.qcow2":
                Workloads.QemuQcow2(t[name], "64M", ["write -z 0 64k"]);
                break;
            case "z1.qcow2":
                // zero cluster vs unallocated vs discarded: all read as zeros
                Workloads.QemuQcow2(t[name], "64M", ["write -P 0x11 0 64k", "write -z 1M 64k", "discard 0 64k"]);
                break;
            case "top.qcow2":
                Need(t, "c1.qcow2");
                QemuImg("create", "-q", "-f", "qcow2", "-b", "c1.qcow2", "-F", "qcow2", t[name]).Ok();
                QemuIo(t[name], ["write -P 0x11 0 64k"], "qcow2");
                break;
            case "small.raw":
                QemuImg("create", "-q", "-f", "raw", t[name], "1000000").Ok();
                break;
            default:
                throw new ArgumentException(name);
        }
    }

    [Theory]
    [InlineData("c1.qcow2 c2.qcow2")]
    [InlineData("c1.qcow2 c1.raw")]
    [InlineData("-f qcow2 -F raw c1.qcow2 c1.raw")]
    [InlineData("-f raw -F raw c1.qcow2 c1.raw")]
    [InlineData("-f raw c1.raw c1.qcow2")]
    [InlineData("-q c1.qcow2 c2.qcow2")]
    [InlineData("c1.qcow2 c3.qcow2")]
    [InlineData("-q c1.qcow2 c3.qcow2")]
    [InlineData("c1.qcow2 c4.qcow2")]
    [InlineData("c1.qcow2 c5.qcow2")]
    [InlineData("c1.qcow2 big.qcow2")]
    [InlineData("big.qcow2 c1.qcow2")]
    [InlineData("-s c1.qcow2 big.qcow2")]
    [InlineData("-s big.qcow2 c1.qcow2")]
    [InlineData("-q -s c1.qcow2 big.qcow2")]
    [InlineData("c1.qcow2 big2.qcow2")]
    [InlineData("big2.qcow2 c1.qcow2")]
    [InlineData("c1.raw big.raw")]
    [InlineData("-s c1.qcow2 c2.qcow2")]
    [InlineData("-s c1.qcow2 c3.qcow2")]
    [InlineData("e1.qcow2 e2.qcow2")]
    [InlineData("-s e1.qcow2 e2.qcow2")]
    [InlineData("-s e2.qcow2 e1.qcow2")]
    [InlineData("e2.qcow2 z1.qcow2")]
    [InlineData("c1.qcow2 top.qcow2")]
    [InlineData("-s top.qcow2 c1.qcow2")]
    [InlineData("small.raw c1.qcow2")]
    [InlineData("c1.qcow2 nonexist.qcow2")]
    [InlineData("nonexist.qcow2 c1.qcow2")]
    [InlineData("c1.qcow2")]
    [InlineData("-f raw c1.qcow2 c2.qcow2")]
    [InlineData("-f foo c1.qcow2 c2.qcow2")]
    public void Compare_SameOutputAndExitAsQemu(string commandLine)
    {
        using var t = new TempDir();
        var args = commandLine.Split(' ').Select(a => a.Contains('.') ? t[a] : a).ToArray();
        foreach (var a in commandLine.Split(' ').Where(a => a.Contains('.'))) Need(t, a);
        var q = QemuImg(["compare", .. args]);
        var s = StrataCmd(["img", "compare", .. args]);
        Assert.False(LooksLikeCrash(s.Stderr), s.ToString());
        Assert.True(q.Exit == s.Exit, $"exit code qemu-img {q.Exit}, strata {s.Exit}\n{q}\n{s}");
        Assert.Equal(q.Stdout, s.Stdout);
        Assert.Equal(InfoInteropTests.NormalizeErrorPrefix(q.Stderr).Replace("qemu-img --help", "PROG --help"),
                     InfoInteropTests.NormalizeErrorPrefix(s.Stderr).Replace("strata img --help", "PROG --help"));
    }
}
