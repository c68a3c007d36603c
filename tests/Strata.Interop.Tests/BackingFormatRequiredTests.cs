using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>qemu-img 7.2 writes a backing file into a header only with its format; strata img refuses as it does.</summary>
public class BackingFormatRequiredTests : ScratchDirTest
{
    private void AssertSameRefusal(string[] qemuArgs, string[] strataArgs, string message)
    {
        var q = Tools.QemuImg(qemuArgs);
        var s = Tools.StrataCmd(["img", .. strataArgs]);
        Assert.Equal(1, q.Exit);
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal($"qemu-img: {message}\n", q.Stderr);
        Assert.Equal(q.Stderr.Replace("qemu-img: ", ""), s.Stderr.Replace("strata img: ", ""));
    }

    [Theory]
    [InlineData("-B")]
    [InlineData("-o")]
    public void Convert_with_a_backing_file_but_no_format_is_refused(string how)
    {
        string base_ = P("base.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", base_, "1M").Ok();
        string[] Args(string target) => how == "-B"
            ? ["convert", "-O", "qcow2", "-B", base_, base_, target]
            : ["convert", "-O", "qcow2", "-o", "backing_file=" + base_, base_, target];
        AssertSameRefusal(Args(P("theirs.qcow2")), Args(P("ours.qcow2")), "Use of backing file requires explicit backing format");
        Assert.False(File.Exists(P("ours.qcow2")));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void Rebase_onto_a_backing_file_without_its_format_is_refused_and_the_header_kept(bool unsafeMode)
    {
        string base_ = P("base.qcow2"), ours = P("ours.qcow2"), theirs = P("theirs.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", base_, "1M").Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", ours, "1M").Ok();
        File.Copy(ours, theirs);
        var before = File.ReadAllBytes(ours);
        string[] Args(string image) => unsafeMode ? ["rebase", "-u", "-b", base_, image] : ["rebase", "-b", base_, image];
        AssertSameRefusal(Args(theirs), Args(ours), $"Could not change the backing file to '{base_}': backing format must be specified");
        Assert.Equal(before, File.ReadAllBytes(ours));
    }
}
