using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Host I/O errors under strata daemon's NBD server: its node is an nbd client of nbdkit's memory plugin behind the
/// error filter, so every request fails with EIO while the filter's file exists. Clients of the daemon's export
/// get EIO replies, never a hang or a dropped connection, and I/O works again once the file is gone.
/// </summary>
public class NbdErrorTests : ScratchDirTest
{
    private Process StartNbdkit(string socket, string injectFile)
    {
        // Run under sh, not as this process's own child: started directly, nbdkit sometimes shut itself down in the
        // middle of the second test of this class (exit 0, its connections closed) — never under sh or strace.
        // Its stderr, a line per injected error, goes to a file rather than a pipe nobody reads.
        var psi = new ProcessStartInfo("sh") { UseShellExecute = false, RedirectStandardError = true };
        psi.ArgumentList.Add("-c");
        psi.ArgumentList.Add("nbdkit \"$@\" 2>>" + P("nbdkit.log"));
        psi.ArgumentList.Add("nbdkit");
        foreach (var a in new[] { "-f", "-U", socket, "--filter=error", "memory", "64M",
                     "error-rate=100%", "error=EIO", $"error-file={injectFile}" })
            psi.ArgumentList.Add(a);
        var p = Process.Start(psi)!;
        Listening.WaitForProcess(p, "nbdkit", 15000, socket);
        return p;
    }

    private StrataDaemonProcess StartDaemon(string nbdkitSocket) => new(Dir, "d", [
        "--blockdev", $"driver=nbd,node-name=remote,server.type=unix,server.path={nbdkitSocket}",
        "--nbd-server", $"addr.type=unix,addr.path={P("d.nbd")}",
        "--export", "type=nbd,id=e,node-name=remote,name=e,writable=on",
    ]);

    private string Uri => $"nbd+unix:///e?socket={P("d.nbd")}";

    [Fact]
    public async Task HostIoErrorsReachTheClientAsEioAndTheExportRecovers()
    {
        string inject = P("inject");
        using var nbdkit = StartNbdkit(P("kit.sock"), inject);
        try
        {
            using var daemon = StartDaemon(P("kit.sock"));
            Tools.QemuIo(Uri, ["write -P 0x5a 0 1M"], "raw");

            File.WriteAllText(inject, "");
            // qemu-io (structured replies) and nbdcopy see EIO; every request is answered, so nothing times out.
            var io = Tools.Run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 64k", "-c", "write -P 0x11 64k 64k", "-c", "write -z 1M 64k", Uri);
            Assert.Equal(3, CountOf(io.Stdout + io.Stderr, "Input/output error"));
            var copy = Tools.Run("nbdcopy", Uri, P("copy.raw"));
            Assert.NotEqual(0, copy.Exit);
            Assert.Contains("Input/output error", copy.Stderr);

            // Our client, 64 requests at once on one connection, then more on the same connection once it recovers.
            await using var client = await NbdClient.ConnectUnixAsync(P("d.nbd"), "e");
            var buffers = Enumerable.Range(0, 64).Select(_ => new byte[65536]).ToArray();
            var failing = buffers.Select((b, i) => i % 2 == 0 ? client.ReadAsync(i * 65536L, b) : client.WriteAsync(i * 65536L, b)).ToArray();
            foreach (var t in failing)
            {
                var e = await Assert.ThrowsAsync<NbdException>(() => t.WaitAsync(TimeSpan.FromSeconds(30)));
                Assert.Equal(NbdErrno.EIO, e.Errno);
            }

            File.Delete(inject);
            var back = new byte[1 << 20];
            await client.ReadAsync(0, back).WaitAsync(TimeSpan.FromSeconds(30));
            Assert.All(back, b => Assert.Equal(0x5a, b));
            await client.WriteAsync(2 << 20, Enumerable.Repeat((byte)0x77, 65536).ToArray()).WaitAsync(TimeSpan.FromSeconds(30));
            Tools.QemuIo(Uri, ["read -P 0x5a 0 1M", "read -P 0x77 2M 64k"], "raw");
            Assert.Equal(0, Tools.Run("nbdcopy", Uri, P("copy.raw")).Exit);

            await using (var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
                await qmp.ExecuteAsync("quit");
            Assert.Equal(0, daemon.WaitForExit());
            // Host errors are expected failures: answered, not logged as a bug.
            string stderr = daemon.Process.StandardError.ReadToEnd();
            Assert.DoesNotContain("unexpected", stderr);
        }
        finally
        {
            nbdkit.Kill(entireProcessTree: true);
            nbdkit.WaitForExit();
        }
    }

    /// <summary>A burst of failing requests from many connections at once, each with a full queue: every one is
    /// answered with EIO within a bounded time, and the daemon still serves afterwards.</summary>
    [Fact]
    public async Task ManyConnectionsOfFailingRequestsAreAllAnswered()
    {
        string inject = P("inject");
        using var nbdkit = StartNbdkit(P("kit.sock"), inject);
        try
        {
            using var daemon = StartDaemon(P("kit.sock"));
            File.WriteAllText(inject, "");
            var clients = new List<NbdClient>();
            for (int i = 0; i < 8; i++) clients.Add(await NbdClient.ConnectUnixAsync(P("d.nbd"), "e"));
            var requests = clients.SelectMany((c, k) => Enumerable.Range(0, 32).Select(i => c.ReadAsync((k * 32 + i) * 4096L, new byte[4096]))).ToArray();
            var sw = Stopwatch.StartNew();
            foreach (var t in requests)
            {
                var e = await Assert.ThrowsAsync<NbdException>(() => t.WaitAsync(TimeSpan.FromSeconds(60)));
                Assert.Equal(NbdErrno.EIO, e.Errno);
            }
            Assert.True(sw.Elapsed < TimeSpan.FromSeconds(60));
            File.Delete(inject);
            foreach (var c in clients)
            {
                await c.ReadAsync(0, new byte[4096]).WaitAsync(TimeSpan.FromSeconds(30));
                await c.DisposeAsync();
            }
            // nbdinfo, a new connection: the handshake and a read work.
            var info = Tools.Run("nbdinfo", "--size", Uri);
            Assert.True(info.Exit == 0 && info.Stdout.Trim() == (64L << 20).ToString(), info.ToString());
        }
        finally
        {
            nbdkit.Kill(entireProcessTree: true);
            nbdkit.WaitForExit();
        }
    }

    /// <summary>The daemon's node loses its server altogether (nbdkit killed): requests in flight and after are
    /// answered EIO — before, the lost connection's IOException was taken for our own client leaving, and the
    /// request was never answered.</summary>
    [Fact]
    public async Task WhenTheNodesServerDiesEveryRequestIsAnsweredWithEio()
    {
        using var nbdkit = StartNbdkit(P("kit.sock"), P("inject"));
        using var daemon = StartDaemon(P("kit.sock"));
        await using var client = await NbdClient.ConnectUnixAsync(P("d.nbd"), "e");
        await client.WriteAsync(0, new byte[65536]).WaitAsync(TimeSpan.FromSeconds(30));
        nbdkit.Kill(entireProcessTree: true);
        nbdkit.WaitForExit();
        var requests = Enumerable.Range(0, 32).Select(i => i % 2 == 0 ? client.ReadAsync(i * 4096L, new byte[4096]) : client.WriteAsync(i * 4096L, new byte[4096])).ToList();
        requests.Add(client.FlushAsync());
        foreach (var t in requests)
        {
            var e = await Assert.ThrowsAsync<NbdException>(() => t.WaitAsync(TimeSpan.FromSeconds(30)));
            Assert.Equal(NbdErrno.EIO, e.Errno);
        }
        var io = Tools.Run("qemu-io", "-f", "raw", "-c", "read 0 64k", Uri);
        Assert.Contains("Input/output error", io.Stdout + io.Stderr);
        await using (var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
            await qmp.ExecuteAsync("quit");
        Assert.Equal(0, daemon.WaitForExit());
    }

    private static int CountOf(string text, string what)
    {
        int n = 0;
        for (int i = text.IndexOf(what, StringComparison.Ordinal); i >= 0; i = text.IndexOf(what, i + what.Length, StringComparison.Ordinal)) n++;
        return n;
    }
}
