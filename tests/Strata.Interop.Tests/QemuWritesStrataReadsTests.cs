using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Requirement 2: Strata reads what QEMU wrote. `strata img compare` against QEMU's raw export says identical (exit 0),
/// and `strata img convert -O raw` is byte-identical to `qemu-img convert -O raw`.
/// </summary>
public class QemuWritesStrataReadsTests
{
    public enum Kind { Plain, Compressed, CompressedZstd, Zstd, Cluster512, Cluster2M, Compat010, Chain3, RawFile, Refcount8Lazy }

    /// <summary>Builds the QEMU-written image of the given kind; returns (path, format).</summary>
    internal static (string Path, string Format) Build(TempDir t, Kind kind)
    {
        string src = t["src.qcow2"];
        switch (kind)
        {
            case Kind.Plain:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed);
                return (src, "qcow2");
            case Kind.Compressed:
            case Kind.CompressedZstd:
                Workloads.QemuQcow2(t["plain.qcow2"], "64M", Workloads.Mixed);
                string[] o = kind == Kind.CompressedZstd ? ["-o", "compression_type=zstd"] : [];
                QemuImg(["convert", "-c", "-O", "qcow2", .. o, t["plain.qcow2"], src]).Ok();
                // plus clusters compressed by qemu-io and ordinary writes on top of a compressed image
                QemuIo(src, ["write -c -P 0x66 48M 64k", "write -P 0x67 0 4k", "write -z 20M 64k"], "qcow2");
                return (src, "qcow2");
            case Kind.Zstd:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed, "-o", "compression_type=zstd");
                QemuIo(src, ["write -c -P 0x66 48M 64k"], "qcow2");
                return (src, "qcow2");
            case Kind.Cluster512:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed, "-o", "cluster_size=512");
                return (src, "qcow2");
            case Kind.Cluster2M:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed, "-o", "cluster_size=2M");
                return (src, "qcow2");
            case Kind.Compat010:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed, "-o", "compat=0.10");
                return (src, "qcow2");
            case Kind.Chain3:
                Chains.BuildQemuChain(t);
                return (t["c2.qcow2"], "qcow2");
            case Kind.RawFile:
                QemuImg("create", "-q", "-f", "raw", t["src.raw"], "64M").Ok();
                QemuIo(t["src.raw"], Workloads.Mixed, "raw");
                return (t["src.raw"], "raw");
            case Kind.Refcount8Lazy:
                Workloads.QemuQcow2(src, "64M", Workloads.Mixed, "-o", "refcount_bits=8,lazy_refcounts=on");
                return (src, "qcow2");
        }
        throw new ArgumentOutOfRangeException(nameof(kind));
    }

    public static TheoryData<Kind> Kinds => new(Enum.GetValues<Kind>());

    [Theory]
    [MemberData(nameof(Kinds))]
    public void StrataCompare_QemuImage_IdenticalToQemuRawExport(Kind kind)
    {
        using var t = new TempDir();
        var (src, fmt) = Build(t, kind);
        QemuImg("convert", "-f", fmt, "-O", "raw", src, t["qemu.raw"]).Ok();
        var r = StrataCmd("img", "compare", src, t["qemu.raw"]);
        Assert.True(r.Exit == 0 && r.Stdout == "Images are identical.\n", "strata img compare vs QEMU raw export:\n" + r);
        var r2 = StrataCmd("img", "compare", "-f", fmt, "-F", "raw", src, t["qemu.raw"]);
        Assert.True(r2.Exit == 0, "strata img compare with explicit formats:\n" + r2);
    }

    [Theory]
    [MemberData(nameof(Kinds))]
    public void StrataConvertToRaw_QemuImage_ByteIdenticalToQemuConvert(Kind kind)
    {
        using var t = new TempDir();
        var (src, fmt) = Build(t, kind);
        QemuImg("convert", "-f", fmt, "-O", "raw", src, t["qemu.raw"]).Ok();
        StrataCmd("img", "convert", "-f", fmt, "-O", "raw", src, t["strata.raw"]).Ok();
        byte[] a = File.ReadAllBytes(t["qemu.raw"]), b = File.ReadAllBytes(t["strata.raw"]);
        Assert.Equal(a.Length, b.Length);
        int mismatch = a.AsSpan().CommonPrefixLength(b);
        Assert.True(mismatch == a.Length, $"strata convert -O raw differs from qemu-img convert -O raw at byte {mismatch} (qemu 0x{(mismatch < a.Length ? a[mismatch] : 0):x2}, strata 0x{(mismatch < b.Length ? b[mismatch] : 0):x2})");
    }

    [Fact]
    public void StrataIoRead_QemuImage_VerifiesPatterns()
    {
        using var t = new TempDir();
        var (src, _) = Build(t, Kind.Chain3);
        var r = StrataCmd("io", "-r", "-c", "read -P 0x10 0 1M", "-c", "read -P 0x20 1M 512k", "-c", "read -P 0x30 1536k 64k",
            "-c", "read -P 0x20 1600k 448k", "-c", "read -P 0x10 2M 2M", "-c", "read -P 0 32M 64k", "-c", "read -P 0x11 33619968 983040",
            "-c", "read -P 0x31 40M 4k", "-c", "read -P 0x21 41947136 126976", "-c", "read -P 0x32 60M 64k", "-c", "read -P 0 61M 3M", src);
        Assert.True(r.Exit == 0 && r.Stderr.Length == 0, r.ToString());
    }
}
