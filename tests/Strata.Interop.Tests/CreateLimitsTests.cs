using System.Buffers.Binary;
using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>qcow2 creation at QEMU's limits, and images QEMU refuses to open, compared with the real qemu-img.</summary>
public class CreateLimitsTests : ScratchDirTest
{
    private static long VirtualSize(string path) =>
        Tools.QemuImg("info", "--output=json", path).Ok().Json().GetProperty("virtual-size").GetInt64();

    [Theory]
    [InlineData("2G")]
    [InlineData("16G")]
    [InlineData("128G")] // the largest image a 32 MiB L1 table maps with 512-byte clusters
    public void Small_clusters_work_up_to_QEMUs_limit(string size)
    {
        string ours = P("ours.qcow2"), theirs = P("theirs.qcow2");
        Tools.StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", ours, size).Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", theirs, size).Ok();
        Tools.AssertQemuCheckClean(ours);
        Assert.Equal(VirtualSize(theirs), VirtualSize(ours));
        // It takes writes at both ends, as QEMU's image does.
        string[] writes = ["write -P 0x5a 0 64k", $"write -P 0x6b {VirtualSize(ours) - 65536} 64k"];
        Tools.StrataIo(ours, writes);
        Tools.QemuIo(theirs, writes);
        Tools.AssertQemuCheckClean(ours);
        Tools.AssertQemuIdentical(ours, theirs);
    }

    [Fact]
    public void One_sector_past_the_limit_is_refused_with_qemu_imgs_message()
    {
        string size = ((128L << 30) + 512).ToString();
        var q = Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512", P("theirs.qcow2"), size);
        var s = Tools.StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", P("ours.qcow2"), size);
        Assert.Equal(1, q.Exit);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(q.Stderr.Replace(P("theirs.qcow2"), "X").Replace("qemu-img: ", ""), s.Stderr.Replace(P("ours.qcow2"), "X").Replace("strata img: ", ""));
        Assert.Contains("The image size is too large for file format 'qcow2' (try using a larger cluster size)", s.Stderr);
    }

    [Theory]
    [InlineData("qcow2")]
    [InlineData("raw")]
    public void A_size_that_is_not_whole_sectors_is_rounded_up_as_qemu_img_does(string format)
    {
        string ours = P("ours." + format), theirs = P("theirs." + format);
        var s = Tools.StrataCmd("img", "create", "-f", format, ours, "4097").Ok();
        var q = Tools.QemuImg("create", "-f", format, theirs, "4097").Ok();
        Assert.Equal(4608, VirtualSize(theirs));
        Assert.Equal(VirtualSize(theirs), VirtualSize(ours));
        // The Formatting line still shows the size as given.
        Assert.Contains("size=4097", s.Stdout);
        Assert.Contains("size=4097", q.Stdout);
    }

    [Fact]
    public void An_unknown_bitmap_flag_makes_the_image_unopenable_as_in_qemu()
    {
        string path = P("t.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", path, "1M").Ok();
        Tools.QemuImg("bitmap", "--add", path, "bitmap-0").Ok();
        long dirOffset = BitmapDirectoryOffset(File.ReadAllBytes(path));
        using (var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = dirOffset + 15;
            int flags = f.ReadByte();
            f.Position = dirOffset + 15;
            f.WriteByte((byte)(flags | 4));
        }

        var q = Tools.QemuImg("info", path);
        var s = Tools.StrataCmd("img", "info", path);

        Assert.Equal(1, q.Exit);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal($"qemu-img: Could not open '{path}': Bitmap 'bitmap-0' doesn't satisfy the constraints\n", q.Stderr);
        Assert.Equal(q.Stderr.Replace("qemu-img: ", ""), s.Stderr.Replace("strata img: ", ""));
    }

    /// <summary>Walks the header extensions to the bitmaps extension and returns its directory offset.</summary>
    private static long BitmapDirectoryOffset(byte[] raw)
    {
        int pos = (int)BinaryPrimitives.ReadUInt32BigEndian(raw.AsSpan(100));
        while (BinaryPrimitives.ReadUInt32BigEndian(raw.AsSpan(pos)) != 0x23852875)
            pos += 8 + (((int)BinaryPrimitives.ReadUInt32BigEndian(raw.AsSpan(pos + 4)) + 7) & ~7);
        return (long)BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(pos + 24));
    }
}
