using System.Buffers.Binary;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>qcow2 feature bits the reader does not know, against qemu-img: unknown incompatible bits are refused with
/// the names the image's own feature table gives them; unknown autoclear bits are cleared by a read-write open.</summary>
public class FeatureBitsTests : ScratchDirTest
{
    private static void SetHeaderWord(string path, int offset, ulong value)
    {
        using var f = File.Open(path, FileMode.Open, FileAccess.ReadWrite);
        var b = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        f.Position = offset;
        f.Write(b);
    }

    private static ulong HeaderWord(string path, int offset)
    {
        using var f = File.OpenRead(path);
        var b = new byte[8];
        f.Position = offset;
        f.ReadExactly(b);
        return BinaryPrimitives.ReadUInt64BigEndian(b);
    }

    [Fact]
    public void UnknownIncompatibleBitsAreNamedFromTheImagesFeatureTable()
    {
        var answers = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = P($"{tool}.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
            // qemu-img's own feature table names bits 0-4; bit 3 is known, bits 62 and 63 are not named at all.
            SetHeaderWord(img, 72, (1UL << 62) | (1UL << 63));
            var r = tool == "qemu" ? Tools.QemuImg("info", img) : Tools.StrataCmd("img", "info", img);
            answers.Add($"{r.Exit} {r.Stderr.Replace(img, "IMG").Replace("qemu-img:", "").Replace("strata img:", "").Trim()}");
        }
        Assert.Equal(answers[0], answers[1]);
        Assert.Contains("Unknown incompatible feature: c000000000000000", answers[1]);
    }

    [Fact]
    public void AReadWriteOpenClearsUnknownAutoclearBitsAsQemuDoes()
    {
        var words = new List<ulong>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = P($"{tool}.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
            SetHeaderWord(img, 88, 1UL << 63);
            var r = tool == "qemu" ? Tools.QemuImg("check", "-r", "all", img) : Tools.StrataCmd("img", "check", "-r", "all", img);
            Assert.Equal(0, r.Exit);
            words.Add(HeaderWord(img, 88));
        }
        Assert.Equal(words[0], words[1]);
        Assert.Equal(0UL, words[1]);
    }
}
