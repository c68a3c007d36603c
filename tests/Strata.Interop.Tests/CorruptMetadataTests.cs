using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// Metadata entries that cannot be right, met by the read-only tools (check, map, convert): strata img, run as its
/// own process, reports them as qemu-img does and never reads through them.
/// </summary>
public class CorruptMetadataTests : ScratchDirTest
{
    private static ToolResult StrataImg(params string[] args) =>
        Tools.StrataProcess(["img", .. args]);

    private static string[] Lines(string text) => text.Split('\n', StringSplitOptions.RemoveEmptyEntries);

    /// <summary>A 64 MiB image with 128 KiB of data (L2 table at 0x40000) and one byte changed.</summary>
    private string Image(long offset, byte value)
    {
        string path = P("t.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", path, "64M").Ok();
        Tools.QemuIo(path, ["write -P 0x11 0 128k"]);
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        f.Position = offset;
        f.WriteByte(value);
        return path;
    }

    [Fact]
    public void A_refcount_table_entry_with_reserved_bits_is_a_corruption_as_qemu_img_check_says()
    {
        string path = Image(0x10000 + 7, 0x01); // refcount table entry 0: 0x20000 | 1

        var q = Tools.QemuImg("check", path);
        var s = StrataImg("check", path);

        Assert.Equal(2, q.Exit);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(Lines(q.Stderr), Lines(s.Stderr));
        Assert.Contains("ERROR refcount table entry 0 has reserved bits set", s.Stderr);
        Assert.Equal(q.Stdout, s.Stdout);
    }

    [Theory]
    [InlineData("map")]
    [InlineData("convert")]
    public void An_L2_entry_with_an_unaligned_data_offset_makes_the_tools_fail_as_qemu_img_does(string command)
    {
        string path = Image(0x40000 + 6, 0x2a); // L2 entry 0: 0x52a00
        string[] args = command == "map" ? ["map", path] : ["convert", "-O", "raw", path, P("out.raw")];

        var q = Tools.QemuImg(args);
        var s = StrataImg(args);

        Assert.Equal(1, q.Exit);
        Assert.Equal(q.Exit, s.Exit);
        string message = "qcow2: Image is corrupt: Cluster allocation offset 0x52a00 unaligned (L2 offset: 0x40000, L2 index: 0); further non-fatal corruption events will be suppressed";
        Assert.Equal(message, Lines(q.Stderr)[0]);
        Assert.Equal(message, Lines(s.Stderr)[0]);
        // Read-only tools report the corruption but do not mark the image.
        Assert.False(Tools.QemuImg("info", "--output=json", path).Ok().Json().GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean());
    }
}
