using System.Diagnostics;
using System.Net.Sockets;
using System.Text;

namespace Strata.Interop.Tests;

/// <summary>QMP monitors on chardevs other than a listening socket, against qemu-storage-daemon: the daemon's own
/// stdin/stdout (`--chardev stdio`, as scripts and QEMU's iotests drive it) and a socket the daemon connects to
/// (`server=off`, a management tool that listens).</summary>
public class MonitorChardevTests : ScratchDirTest
{
    private static Process Start(string kind, IEnumerable<string> args)
    {
        var psi = kind == "qsd" ? new ProcessStartInfo("qemu-storage-daemon")
            : Infra.Tools.StrataStartInfo("daemon");
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.RedirectStandardInput = psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        return Process.Start(psi)!;
    }

    /// <summary>The greeting's version differs by design; everything after it must be the same.</summary>
    private static string WithoutGreeting(string transcript) => string.Join("\n", transcript.Split('\n').Where(l => !l.StartsWith("{\"QMP\"")));

    [Fact]
    public void AStdioMonitorAnswersLikeQemuStorageDaemon()
    {
        Infra.Tools.QemuImg("create", "-q", "-f", "qcow2", P("d.qcow2"), "1M").Ok();
        var outputs = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            using var p = Start(kind, ["--chardev", "stdio,id=stdio", "--monitor", "chardev=stdio",
                "--blockdev", $"node-name=file0,driver=file,filename={P("d.qcow2")}", "--blockdev", "node-name=fmt0,driver=qcow2,file=file0"]);
            p.StandardInput.Write("""
                {"execute":"qmp_capabilities"}
                {"execute":"block-dirty-bitmap-add","arguments":{"node":"fmt0","name":"b"}}
                {"execute":"block-dirty-bitmap-add","arguments":{"node":"fmt0","name":"b"}}
                {"execute":"nonsense"}
                {"execute":"quit"}

                """);
            p.StandardInput.Close();
            string stdout = p.StandardOutput.ReadToEnd();
            Assert.True(p.WaitForExit(20_000), kind + " did not quit");
            Assert.Equal(0, p.ExitCode);
            outputs.Add(WithoutGreeting(stdout));
        }
        Assert.Equal(outputs[0], outputs[1]);
        Assert.Contains("Bitmap already exists: b", outputs[1]);
    }

    [Fact]
    public async Task AClientModeMonitorCallsTheListenerAndServesItLikeQemuStorageDaemon()
    {
        var transcripts = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            string path = P(kind + ".sock");
            using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            listener.Bind(new UnixDomainSocketEndPoint(path));
            listener.Listen(1);
            using var p = Start(kind, ["--chardev", $"socket,id=m,path={path},server=off", "--monitor", "chardev=m"]);
            using var conn = await listener.AcceptAsync().WaitAsync(TimeSpan.FromSeconds(20));
            await using var stream = new NetworkStream(conn);
            using var reader = new StreamReader(stream, Encoding.UTF8);
            var log = new StringBuilder();
            log.AppendLine(await reader.ReadLineAsync());
            foreach (var command in new[] { "{\"execute\":\"qmp_capabilities\"}", "{\"execute\":\"query-named-block-nodes\"}", "{\"execute\":\"quit\"}" })
            {
                await stream.WriteAsync(Encoding.UTF8.GetBytes(command + "\n"));
                log.AppendLine(await reader.ReadLineAsync());
            }
            Assert.True(p.WaitForExit(20_000), kind + " did not quit");
            transcripts.Add(WithoutGreeting(log.ToString()));
        }
        Assert.Equal(transcripts[0], transcripts[1]);
    }

    [Theory]
    [InlineData("socket,id=m,path=DIR/nobody-listens.sock,server=off")]
    [InlineData("socket,id=m,host=127.0.0.1,port=1,server=off")]
    public void AClientModeMonitorWithNobodyListeningFailsAsQemuStorageDaemon(string chardev)
    {
        var answers = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            using var p = Start(kind, ["--chardev", chardev.Replace("DIR", Dir), "--monitor", "chardev=m"]);
            string stderr = p.StandardError.ReadToEnd();
            Assert.True(p.WaitForExit(20_000));
            answers.Add($"exit {p.ExitCode}: {stderr.Replace("qemu-storage-daemon:", "DAEMON:").Replace("strata daemon:", "DAEMON:")}");
        }
        Assert.Equal(answers[0], answers[1]);
    }
}
