namespace Strata.Interop.Tests.Infra;

/// <summary>Write sequences applied identically by qemu-io and strata io.</summary>
public static class Workloads
{
    /// <summary>Data, zero clusters (with and without unmap), a discard, unaligned writes and a partial overwrite.</summary>
    public static readonly string[] Mixed =
    [
        "write -P 0x5a 0 1M",
        "write -z 1M 64k",
        "write -P 0xbb 2M 256k",
        "discard 2M 64k",
        "write -z -u 3M 128k",
        "write -P 0xcc 10M 64k",
        "write -P 0x11 10M 4k",
        "write -P 0x22 12345 3000",
        "write -P 0x33 20M 100k",
        "write -P 0x44 63M 1M",
    ];

    /// <summary>Builds a qcow2 image with QEMU (qemu-img create + qemu-io).</summary>
    public static void QemuQcow2(string path, string size, IEnumerable<string> writes, params string[] createOptions)
    {
        Tools.QemuImg(["create", "-q", "-f", "qcow2", .. createOptions, path, size]).Ok();
        if (writes.Any()) Tools.QemuIo(path, writes, "qcow2");
    }

    /// <summary>Builds a qcow2 image with Strata (strata img create + strata io).</summary>
    public static void StrataQcow2(string path, string size, IEnumerable<string> writes, params string[] createOptions)
    {
        Tools.StrataCmd(["img", "create", "-q", "-f", "qcow2", .. createOptions, path, size]).Ok();
        if (writes.Any()) Tools.StrataIo(path, writes, "qcow2");
    }
}
