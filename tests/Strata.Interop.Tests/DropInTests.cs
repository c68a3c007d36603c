using Tools = Strata.Interop.Tests.Infra.Tools;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Reached through a link named after one of QEMU's tools, `strata` is that tool: the same command line without a
/// subcommand word, and messages with the tool's own prefix — compared with the real tool byte for byte.
/// </summary>
public class DropInTests : ScratchDirTest
{
    /// <summary>A link named <paramref name="tool"/> to the strata executable, in a folder of its own.</summary>
    private string Link(string tool)
    {
        string dir = Directory.CreateDirectory(P("bin")).FullName;
        string link = Path.Combine(dir, tool);
        if (!File.Exists(link)) File.CreateSymbolicLink(link, Tools.StrataExecutable);
        return link;
    }

    [Theory]
    [InlineData("info", "MISSING")]
    [InlineData("check", "MISSING")]
    [InlineData("create", "-f", "qcow2", "IMG", "1M")]
    [InlineData("create", "-f", "qcow2", "IMG", "1X")]
    [InlineData("info", "IMG")]
    [InlineData("map", "--output=json", "IMG")]
    [InlineData("resize", "IMG", "-f", "qcow2", "+1M")]
    public void QemuImgThroughALinkAnswersAsQemuImg(params string[] command)
    {
        var answers = new List<string>();
        foreach (var tool in new[] { "qemu-img", Link("qemu-img") })
        {
            string img = P("a.qcow2");
            File.Delete(img);
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
            var r = Tools.Run(tool, [.. command.Select(a => a.Replace("IMG", img).Replace("MISSING", P("missing")))]);
            answers.Add($"exit {r.Exit}\n{r.Stdout}\n{r.Stderr}");
        }
        Assert.Equal(answers[0], answers[1]);
    }

    [Fact]
    public void QemuIoThroughALinkNamesItselfQemuIo()
    {
        var r = Tools.Run(Link("qemu-io"), "-c", "read 0 512", P("missing"));
        var q = Tools.Run("qemu-io", "-c", "read 0 512", P("missing"));
        Assert.Equal(q.Stderr, r.Stderr);
        Assert.Equal(q.Exit, r.Exit);
    }

    /// <summary>`--daemonize` through the link: the parent returns once the daemon serves, the pid file names it.</summary>
    [Fact]
    public async Task QemuStorageDaemonThroughALinkDaemonizes()
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("d.qcow2"), "1M").Ok();
        string qmpPath = P("qsd.qmp"), pidFile = P("qsd.pid");
        var r = Tools.Run(Link("qemu-storage-daemon"), "--blockdev", $"driver=file,node-name=f,filename={P("d.qcow2")}",
            "--blockdev", "driver=qcow2,node-name=n,file=f", "--chardev", $"socket,id=m,path={qmpPath},server=on,wait=off",
            "--monitor", "chardev=m", "--daemonize", "--pidfile", pidFile);
        Assert.True(r.Exit == 0, r.ToString());
        int pid = int.Parse(File.ReadAllText(pidFile).Trim());
        using var daemon = System.Diagnostics.Process.GetProcessById(pid);
        try
        {
            await using var qmp = await QmpClient.ConnectUnixAsync(qmpPath);
            var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
            Assert.Contains(nodes, n => n!["node-name"]!.GetValue<string>() == "n");
            await qmp.ExecuteAsync("quit");
            Assert.True(daemon.WaitForExit(10_000));
        }
        finally
        {
            if (!daemon.HasExited) daemon.Kill();
        }
    }
}
