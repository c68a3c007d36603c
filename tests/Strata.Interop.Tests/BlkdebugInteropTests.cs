using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// Errors blkdebug injects at the qcow2 driver's own events (and at guest writes under a commit), with strata run
/// as qemu-img next to the real one on copies of the same images: the same messages, and images the real qemu-img
/// check finds in the same state afterwards (leaks at worst, or a dirty image QEMU repairs on open).
/// </summary>
public class BlkdebugInteropTests : ScratchDirTest
{
    private string StrataAsQemuImg()
    {
        string dir = Directory.CreateDirectory(P("bin")).FullName;
        string link = Path.Combine(dir, "qemu-img");
        if (!File.Exists(link)) File.CreateSymbolicLink(link, Tools.StrataExecutable);
        return link;
    }

    /// <summary>Runs <paramref name="scenario"/> in a folder of its own with the real qemu-img and then with strata
    /// as qemu-img; the scenario returns what it saw, with its folder written as DIR.</summary>
    private (string Qemu, string Strata) Both(Func<string, string, string> scenario)
    {
        var answers = new List<string>();
        foreach (var (exe, sub) in new[] { ("qemu-img", "q"), (StrataAsQemuImg(), "s") })
        {
            string dir = Directory.CreateDirectory(P(sub)).FullName;
            answers.Add(scenario(exe, dir).Replace(dir, "DIR"));
        }
        return (answers[0], answers[1]);
    }

    private static string Show(ToolResult r) => $"exit {r.Exit}\n{r.Stdout}{r.Stderr}";

    [Fact]
    public void CommitIntoABaseWhoseWritesFailReportsTheJobError()
    {
        var (qemu, strata) = Both((exe, dir) =>
        {
            string b = Path.Combine(dir, "b.qcow2"), top = Path.Combine(dir, "t.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", b, "1M").Ok();
            string backing = $"json:{{'driver':'qcow2','file':{{'driver':'blkdebug','inject-error':[{{'event':'write_aio','errno':28,'once':true}}],'image':{{'driver':'file','filename':'{b}'}}}}}}";
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, top).Ok();
            Tools.QemuIo(top, ["write -P 0x5a 0 64k"], "qcow2");
            var commit = Tools.Run(exe, "commit", top);
            var check = Tools.QemuImg("check", b);
            return Show(commit) + Show(check);
        });
        Assert.Contains("Block job failed: No space left on device", strata);
        Assert.Equal(qemu, strata);
    }

    [Theory]
    [InlineData("l1_update")]
    [InlineData("empty_image_prepare")]
    [InlineData("reftable_update")]
    [InlineData("refblock_alloc")]
    public void EmptyingTheTopAfterCommitFailsAtEachStepAsQemuAndLeavesWhatQemuRepairs(string step)
    {
        var (qemu, strata) = Both((exe, dir) =>
        {
            string b = Path.Combine(dir, "b.qcow2"), top = Path.Combine(dir, "t.qcow2"), conf = Path.Combine(dir, "blkdebug.conf");
            Tools.QemuImg("create", "-q", "-f", "qcow2", b, "64M").Ok();
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, top, "64M").Ok();
            Tools.QemuIo(top, ["write -P 0x5a 0 64k"], "qcow2");
            File.WriteAllText(conf, $"[inject-error]\nevent = \"{step}\"\n");
            var commit = Tools.Run(exe, "commit", $"blkdebug:{conf}:{top}");
            // The real qemu-io opens the top as QEMU would after such a failure (repairing a dirty image).
            var reopen = Tools.Run("qemu-io", "-c", "close", top);
            var check = Tools.QemuImg("check", top);
            var data = Tools.Run("qemu-io", "-c", "read -P 0x5a 0 64k", b);
            return Show(commit) + Show(reopen) + Show(check) + $"exit {data.Exit}\n";
        });
        Assert.Contains("Failed to empty blkdebug:DIR/blkdebug.conf:DIR/t.qcow2: Input/output error", strata);
        Assert.Equal(qemu, strata);
    }

    [Fact]
    public void EmptyingTheTopWithoutFaultsLeavesAFreshImage()
    {
        var (qemu, strata) = Both((exe, dir) =>
        {
            string b = Path.Combine(dir, "b.qcow2"), top = Path.Combine(dir, "t.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", b, "64M").Ok();
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", b, top, "64M").Ok();
            Tools.QemuIo(top, ["write -P 0x5a 0 64k", "write -P 0x5b 32M 64k"], "qcow2");
            var commit = Tools.Run(exe, "commit", top);
            var check = Tools.QemuImg("check", top);
            var read = Tools.Run("qemu-io", "-c", "read -P 0x5a 0 64k", "-c", "read -P 0x5b 32M 64k", top);
            return Show(commit) + Show(check) + $"exit {read.Exit} size {new FileInfo(top).Length}\n";
        });
        Assert.Equal(qemu, strata);
    }

    [Fact]
    public void ClusterFreeErrorDuringSnapshotDeletionLeavesTheSameLeaks()
    {
        var (qemu, strata) = Both((exe, dir) =>
        {
            string img = Path.Combine(dir, "t.qcow2"), conf = Path.Combine(dir, "blkdebug.conf");
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "64M").Ok();
            Tools.QemuIo(img, ["write -P 0x5a 0 64k"], "qcow2");
            Tools.QemuImg("snapshot", "-c", "foo", img).Ok();
            File.WriteAllText(conf, "[inject-error]\nevent = \"cluster_free\"\nerrno = \"5\"\n");
            var delete = Tools.Run(exe, "snapshot", "-d", "foo", $"blkdebug:{conf}:{img}");
            var list = Tools.QemuImg("snapshot", "-l", img);
            var check = Tools.QemuImg("check", img);
            var read = Tools.Run("qemu-io", "-c", "read -P 0x5a 0 64k", img);
            return Show(delete) + Show(list) + Show(check) + $"exit {read.Exit}\n";
        });
        Assert.Contains("Could not delete snapshot 'foo': Failed to free the cluster and L1 table: Input/output error", strata);
        Assert.Contains("Leaked cluster 7 refcount=1 reference=0", strata);
        Assert.Equal(qemu, strata);
    }
}
