using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// A push from a QEMU of 6.0 or later asks the job for copy offload (x-perf.use-copy-range): chunks copied by
/// copy_file_range(2) inside the kernel rather than read into QEMU's buffers and written out. Seen in
/// qemu-storage-daemon's own trace events, with every point restored and compared with a copy of the disk.
/// </summary>
public class PushCopyOffloadTests : ScratchDirTest
{
    private const string CopyRangeTried = "bdrv_co_copy_range_from";
    private const string CopyRangeFailed = "block_copy_copy_range_fail";

    private static string[] Traced => ["--trace", CopyRangeTried, "--trace", CopyRangeFailed];

    private static JsonElement PushOne(string socket, string repo, string level) =>
        Tools.StrataCmd("backup", "run", "--socket", socket, "--disk", "vda", "--level", level, "--json", repo).Ok().Json().EnumerateArray().Single();

    /// <summary>With the repository on the source's filesystem the kernel copies (no chunk falls back); on another
    /// filesystem it refuses (EXDEV: tmpfs against the scratch folder's) and QEMU reads and writes instead.</summary>
    [Fact]
    public async Task APushCopiesByCopyRangeAndFallsBackToReadAndWriteWhereTheKernelRefuses()
    {
        string elsewhere = Path.Combine("/dev/shm", $"strata-it-{Guid.NewGuid():N}");
        Directory.CreateDirectory(elsewhere);
        try
        {
            Assert.NotEqual(Tools.Run("stat", "-c", "%d", Dir).Ok().Stdout.Trim(), Tools.Run("stat", "-c", "%d", elsewhere).Ok().Stdout.Trim());
            Assert.True(Strata.Backup.CopyOffload.Copies(Dir) && Strata.Backup.CopyOffload.Copies(elsewhere),
                "copy offload is asked for only on ext2/3/4, tmpfs and f2fs: this test needs its scratch folder on one");
            // (A kernel from before 5.19 copies across filesystems through splice instead of refusing: the second half
            // below would then see no fallback. The kernels this project runs on refuse.)
            using var src = new BackupSourceProcess("qsd", Dir, ["vda"], daemonOptions: Traced);
            string repo = P("repo"), other = Path.Combine(elsewhere, "repo");
            Tools.StrataCmd("backup", "init", repo).Ok();
            Tools.StrataCmd("backup", "init", other).Ok();
            int seen = 0;
            string NewLog()
            {
                string log = src.Log;
                string added = log[seen..];
                seen = log.Length;
                return added;
            }

            var points = new List<(string Repo, string Id, string Copy)>();
            for (int round = 0; round < 2; round++)
            {
                if (round > 0) await src.GuestWritesAsync("vda", seed: 40 + round);
                string copy = P($"vda-{round}.raw");
                await src.CopyAsync("vda", copy);
                string level = round == 0 ? "full" : "inc";

                points.Add((repo, PushOne(src.QmpPath, repo, level).GetProperty("id").GetString()!, copy));
                string log = NewLog();
                Assert.Contains(CopyRangeTried, log);
                Assert.DoesNotContain(CopyRangeFailed, log);

                points.Add((other, PushOne(src.QmpPath, other, level).GetProperty("id").GetString()!, copy));
                log = NewLog();
                Assert.Contains(CopyRangeFailed, log);
                Assert.Contains("ret -18", log);
            }
            foreach (var (r, id, copy) in points) RepositoryAsserts.AssertRestores(r, "vda", id, copy);
            Tools.StrataCmd("backup", "verify", repo).Ok();
            Tools.StrataCmd("backup", "verify", other).Ok();
        }
        finally
        {
            Directory.Delete(elsewhere, recursive: true);
        }
    }

    /// <summary>Between the tool and the source, a QMP relay that can make the source look like an older QEMU
    /// (its greeting says 5.2.0) or like one that refuses x-perf as an unexpected parameter, as a QEMU without it
    /// does. The first gets no x-perf at all; the second's refused transaction (which did nothing) goes again
    /// without it. Both runs commit points that restore.</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task ASourceWithoutXPerfGetsTheSameBackupWithoutIt(bool refuse)
    {
        // Copy offload would be left out here anyway on a filesystem that clones: that would prove nothing.
        Assert.True(Strata.Backup.CopyOffload.Copies(Dir), "copy offload is asked for only on ext2/3/4, tmpfs and f2fs: this test needs its scratch folder on one");
        using var src = new BackupSourceProcess("qsd", Dir, ["vda"]);
        string repo = P("repo");
        Tools.StrataCmd("backup", "init", repo).Ok();
        await using var relay = new QmpRelay(src.QmpPath, P("relay.qmp"), oldGreeting: !refuse, refuseXPerf: refuse);
        var ids = new List<(string Id, string Copy)>();
        for (int round = 0; round < 2; round++)
        {
            if (round > 0) await src.GuestWritesAsync("vda", seed: 50 + round);
            string copy = P($"vda-{round}.raw");
            await src.CopyAsync("vda", copy);
            ids.Add((PushOne(relay.Path, repo, round == 0 ? "full" : "inc").GetProperty("id").GetString()!, copy));
        }
        var transactions = relay.Sent.Where(l => l.Contains("\"transaction\"")).ToList();
        if (refuse)
        {
            // Each run: one transaction with x-perf (refused here), then the same one without it.
            Assert.Equal(4, transactions.Count);
            Assert.True(transactions[0].Contains("x-perf") && transactions[2].Contains("x-perf"), string.Join("\n", transactions));
            Assert.True(!transactions[1].Contains("x-perf") && !transactions[3].Contains("x-perf"), string.Join("\n", transactions));
            Assert.Equal(2, relay.Refused);
        }
        else
        {
            Assert.Equal(2, transactions.Count);
            Assert.All(transactions, t => Assert.DoesNotContain("x-perf", t));
        }
        foreach (var (id, copy) in ids) RepositoryAsserts.AssertRestores(repo, "vda", id, copy);
        Tools.StrataCmd("backup", "verify", repo).Ok();
    }

    /// <summary>Relays QMP lines between one client at a time and the daemon's socket, keeping what the client sent.</summary>
    private sealed class QmpRelay : IAsyncDisposable
    {
        private readonly Socket _listener = new(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        private readonly Task _accepting;
        private readonly string _upstream;
        private readonly bool _oldGreeting, _refuseXPerf;
        private readonly List<string> _sent = [];
        private int _refused;

        public string Path { get; }
        public IReadOnlyList<string> Sent { get { lock (_sent) return [.. _sent]; } }
        public int Refused => Volatile.Read(ref _refused);

        public QmpRelay(string upstream, string path, bool oldGreeting, bool refuseXPerf)
        {
            (_upstream, Path, _oldGreeting, _refuseXPerf) = (upstream, path, oldGreeting, refuseXPerf);
            _listener.Bind(new UnixDomainSocketEndPoint(path));
            _listener.Listen(4);
            _accepting = Task.Run(AcceptLoopAsync);
        }

        private async Task AcceptLoopAsync()
        {
            try
            {
                while (true)
                {
                    using var client = await _listener.AcceptAsync();
                    await RelayAsync(client);
                }
            }
            catch (Exception e) when (e is SocketException or ObjectDisposedException) { }
        }

        private async Task RelayAsync(Socket client)
        {
            using var daemon = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await daemon.ConnectAsync(new UnixDomainSocketEndPoint(_upstream));
            await using var toClient = new NetworkStream(client, ownsSocket: false);
            await using var toDaemon = new NetworkStream(daemon, ownsSocket: false);
            var clientLock = new SemaphoreSlim(1, 1);
            async Task SendToClient(string line)
            {
                await clientLock.WaitAsync();
                try { await toClient.WriteAsync(Encoding.UTF8.GetBytes(line + "\n")); }
                finally { clientLock.Release(); }
            }
            var down = Task.Run(async () =>
            {
                using var reader = new StreamReader(new NetworkStream(daemon, ownsSocket: false));
                bool first = true;
                while (await reader.ReadLineAsync() is { } line)
                {
                    if (first && _oldGreeting)
                    {
                        var greeting = JsonNode.Parse(line)!;
                        greeting["QMP"]!["version"]!["qemu"] = new JsonObject { ["major"] = 5, ["minor"] = 2, ["micro"] = 0 };
                        line = greeting.ToJsonString();
                    }
                    first = false;
                    await SendToClient(line);
                }
                client.Shutdown(SocketShutdown.Send);
            });
            using (var reader = new StreamReader(new NetworkStream(client, ownsSocket: false)))
            {
                while (await reader.ReadLineAsync() is { } line)
                {
                    lock (_sent) _sent.Add(line);
                    if (_refuseXPerf && line.Contains("\"transaction\"") && line.Contains("x-perf"))
                    {
                        Interlocked.Increment(ref _refused);
                        var id = JsonNode.Parse(line)!["id"]?.DeepClone();
                        await SendToClient(new JsonObject { ["error"] = new JsonObject { ["class"] = "GenericError", ["desc"] = "Parameter 'x-perf' is unexpected" }, ["id"] = id }.ToJsonString());
                        continue;
                    }
                    await toDaemon.WriteAsync(Encoding.UTF8.GetBytes(line + "\n"));
                }
            }
            daemon.Shutdown(SocketShutdown.Send);
            await down;
        }

        public async ValueTask DisposeAsync()
        {
            _listener.Dispose();
            await _accepting;
        }
    }
}
