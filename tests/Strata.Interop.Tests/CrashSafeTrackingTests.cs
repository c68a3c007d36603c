using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Protocol.Qmp;
using Xunit.Abstractions;

namespace Strata.Interop.Tests;

/// <summary>
/// Crash-safe tracking of persistent bitmaps (issue 14): `strata daemon` killed under writes keeps a bitmap the next
/// backup can use as an incremental; power-loss states rebuilt from recorded writes and fsyncs keep every
/// acknowledged write in the bitmap and stay clean for qemu-img check; and QEMU never sees a wrong clean bitmap.
/// </summary>
public class CrashSafeTrackingTests : ScratchDirTest
{
    private const long Granule = 65536;
    private readonly ITestOutputHelper _output;

    public CrashSafeTrackingTests(ITestOutputHelper output) => _output = output;

    private string Repo => P("repo");

    private static JsonElement RunBackup(BackupSourceProcess src, string repo, params string[] more)
    {
        var args = new List<string> { "backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json" };
        args.AddRange(more);
        args.Add(repo);
        return Tools.StrataCmd([.. args]).Ok().Json().EnumerateArray().Single();
    }

    private static async Task<JsonObject> BitmapAsync(string qmpPath, string node, string name)
    {
        await using var qmp = await QmpClient.ConnectUnixAsync(qmpPath);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        var bitmaps = nodes.Single(n => n!["node-name"]!.GetValue<string>() == node)!["dirty-bitmaps"]?.AsArray() ?? [];
        return bitmaps.Single(b => b!["name"]?.GetValue<string>() == name)!.AsObject();
    }

    [Fact]
    public async Task KilledUnderWritesFiftyTimesEveryNextBackupIsACorrectIncremental()
    {
        const int Rounds = 50;
        const long Size = 64L << 20;
        using var src = new BackupSourceProcess("strata", Dir, ["vda"], size: "64M");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        Assert.Equal("full", RunBackup(src, Repo).GetProperty("level").GetString());
        var rng = new Random(1414);
        long overCopied = 0, written = 0;
        for (int round = 0; round < Rounds; round++)
        {
            // Writers over NBD: 4 KiB–64 KiB writes in a few hot 2 MiB areas (a guest's working set), until the kill.
            var dirty = new HashSet<long>();
            using var stop = new CancellationTokenSource();
            var hot = Enumerable.Range(0, 3).Select(_ => rng.NextInt64(Size / (2 << 20)) * (2 << 20)).ToArray();
            var writers = Enumerable.Range(0, 3).Select(w => Task.Run(async () =>
            {
                var wr = new Random(round * 31 + w);
                var data = new byte[65536];
                try
                {
                    await using var nbd = await src.ConnectAsync("vda");
                    while (!stop.IsCancellationRequested)
                    {
                        int length = wr.Next(1, 17) * 4096;
                        long offset = hot[wr.Next(hot.Length)] + wr.Next(0, (2 << 20) - length) / 4096 * 4096L;
                        wr.NextBytes(data.AsSpan(0, length));
                        lock (dirty)
                            for (long g = offset / Granule; g <= (offset + length - 1) / Granule; g++) dirty.Add(g);
                        await nbd.WriteAsync(offset, data.AsMemory(0, length));
                    }
                }
                catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or ObjectDisposedException or InvalidOperationException or Strata.Protocol.Nbd.NbdException)
                {
                    // The daemon died under us: writes in flight are uncertain, which the comparison below allows
                    // (the disk is copied after the restart).
                }
            })).ToArray();
            await Task.Delay(rng.Next(20, 400));
            src.Kill();
            stop.Cancel();
            await Task.WhenAll(writers);
            src.Start();
            await src.CopyAsync("vda", P("now.raw"));

            var made = RunBackup(src, Repo, "--level", "auto");
            Assert.Equal("inc", made.GetProperty("level").GetString());
            Assert.False(made.TryGetProperty("note", out var note) && note.GetString()!.Contains("differential"), $"round {round}: {note}");
            long copied = made.GetProperty("copied-bytes").GetInt64();
            long truly = dirty.Count * Granule;
            written += truly;
            overCopied += Math.Max(0, copied - truly);
            Infra.RepositoryAsserts.AssertRestores(Repo, "vda", made.GetProperty("id").GetString()!, P("now.raw"));
        }
        _output.WriteLine($"{Rounds} kills: {written >> 20} MiB written in granules, over-copy {overCopied >> 20} MiB " +
            $"({100.0 * overCopied / (Rounds * Size):F2} % of the disk per round)");
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    [Fact]
    public async Task QemuSeesAStrataCrashedImageAsInconsistentAndItsWritesVoidTheRecord()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"], size: "64M");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        RunBackup(src, Repo);
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", $"nbd+unix:///vda?socket={src.NbdPath}").Exit);
        src.Kill();
        string image = src.Image("vda");

        var check = Tools.Run("qemu-img", "check", image);
        Assert.True(check.Exit == 0, check.Stdout + check.Stderr);
        Assert.Contains("in-use", Tools.Run("qemu-img", "info", "-U", image).Stdout);

        // qemu-storage-daemon opens it read-write: QEMU's rule (inconsistent), and its open clears our autoclear bit.
        using (var qsd = new BackupSourceProcess("qsd", Dir, ["vda"], createImages: false))
        {
            var bitmap = await BitmapAsync(qsd.QmpPath, "vda", BitmapOf(Repo));
            Assert.True(bitmap["inconsistent"]?.GetValue<bool>(), bitmap.ToJsonString());
            Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 8 20M 64k", $"nbd+unix:///vda?socket={qsd.NbdPath}").Exit);
            qsd.Kill();
        }
        // QEMU wrote where the record knows nothing of: Strata must not trust it now.
        src.Start();
        var after = await BitmapAsync(src.QmpPath, "vda", BitmapOf(Repo));
        Assert.True(after["inconsistent"]?.GetValue<bool>(), after.ToJsonString());
        await src.CopyAsync("vda", P("now.raw"));
        var made = RunBackup(src, Repo, "--nbd", src.NbdPath);
        Assert.Contains("differential by comparison", made.GetProperty("note").GetString());
        Infra.RepositoryAsserts.AssertRestores(Repo, "vda", made.GetProperty("id").GetString()!, P("now.raw"));
    }

    [Fact]
    public async Task AStrataCrashedImageReopenedByStrataIsConsistentAndSaysCrashSafe()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"], size: "64M");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        RunBackup(src, Repo);
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", "-c", "write -P 9 40M 4k", $"nbd+unix:///vda?socket={src.NbdPath}").Exit);
        src.Kill();
        src.Start();
        var bitmap = await BitmapAsync(src.QmpPath, "vda", BitmapOf(Repo));
        Assert.Null(bitmap["inconsistent"]);
        Assert.True(bitmap["crash-safe"]!.GetValue<bool>());
        // Two 1 MiB regions recorded since the last checkpoint.
        Assert.Equal(2L << 20, bitmap["count"]!.GetValue<long>());
    }

    [Fact]
    public async Task AQemuCrashedImageFollowsQemusRuleInStrata()
    {
        string image = P("vda.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, "stored").Exit);
        using var qsd = new BackupSourceProcess("qsd", Dir, ["vda"], createImages: false);
        await using (var qmp = await QmpClient.ConnectUnixAsync(qsd.QmpPath))
            await qmp.ExecuteAsync("block-dirty-bitmap-add", JsonNode.Parse("""{"node":"vda","name":"added","persistent":true}""")!.AsObject());
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 7 1M 64k", $"nbd+unix:///vda?socket={qsd.NbdPath}").Exit);
        qsd.Kill();

        using var strata = new BackupSourceProcess("strata", Dir, ["vda"], createImages: false);
        await using var qmp2 = await QmpClient.ConnectUnixAsync(strata.QmpPath);
        var nodes = (await qmp2.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        var bitmaps = nodes.Single(n => n!["node-name"]!.GetValue<string>() == "vda")!["dirty-bitmaps"]!.AsArray();
        // The bitmap QEMU had loaded was in_use when it died: inconsistent, as QEMU itself would load it. The one it
        // added was never stored (QEMU stores persistent bitmaps at close): gone, as in QEMU.
        var stored = Assert.Single(bitmaps)!;
        Assert.Equal("stored", stored["name"]!.GetValue<string>());
        Assert.True(stored["inconsistent"]!.GetValue<bool>());
    }

    /// <summary>The bitmap the repository's last point rotated in.</summary>
    private static string BitmapOf(string repo)
    {
        var points = Tools.StrataCmd("backup", "list", "--json", repo).Ok().Json().EnumerateArray().ToArray();
        return points[^1].GetProperty("bitmap").GetString()!;
    }

    // ------------------------------------------------------------------ power loss

    /// <summary>Every change to the image file and every fsync, in issue order, with the guest's acknowledgements
    /// between them.</summary>
    private sealed class WriteLog : IHostFileRecorder
    {
        public abstract record Event;
        public sealed record Write(long Offset, byte[] Data) : Event;
        public sealed record Length(long Value) : Event;
        public sealed record Hole(long Offset, long Count) : Event;
        public sealed record Fsync : Event;
        public sealed record Acked(long Offset, long Count) : Event;

        public List<Event> Events { get; } = [];
        void IHostFileRecorder.Write(long offset, ReadOnlySpan<byte> data) { lock (Events) Events.Add(new Write(offset, data.ToArray())); }
        void IHostFileRecorder.SetLength(long length) { lock (Events) Events.Add(new Length(length)); }
        void IHostFileRecorder.PunchHole(long offset, long length) { lock (Events) Events.Add(new Hole(offset, length)); }
        void IHostFileRecorder.Flushed() { lock (Events) Events.Add(new Fsync()); }
        public void Ack(long offset, long length) { lock (Events) Events.Add(new Acked(offset, length)); }
    }

    private static void Apply(FileStream file, WriteLog.Event e)
    {
        switch (e)
        {
            case WriteLog.Write w:
                file.Position = w.Offset;
                file.Write(w.Data);
                break;
            case WriteLog.Length l:
                file.SetLength(l.Value);
                break;
            case WriteLog.Hole h:
                long end = Math.Min(h.Offset + h.Count, file.Length);
                if (end > h.Offset)
                {
                    file.Position = h.Offset;
                    file.Write(new byte[end - h.Offset]);
                }
                break;
        }
    }

    [Fact]
    public void PowerLossStatesKeepEveryAcknowledgedWriteAndStayClean()
    {
        const long Size = 64L << 20;
        string image = P("disk.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, Size.ToString()).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", image, "b0").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 1 0 3M", image).Exit);
        byte[] initial = File.ReadAllBytes(image);

        var log = new WriteLog();
        var host = HostFile.Open(image, readOnly: false);
        host.Recorder = log;
        var rng = new Random(2718);
        using (var disk = Qcow2Image.Open(host, new Qcow2OpenOptions { CrashSafeBitmaps = true }))
        {
            var data = new byte[128 << 10];
            for (int i = 0; i < 50; i++)
            {
                long length = rng.Next(1, 33) * 4096L;
                long offset = rng.NextInt64(0, (Size - length) / 4096) * 4096;
                switch (rng.Next(10))
                {
                    case 0: disk.WriteZeroes(offset, length, mayUnmap: true); break;
                    case 1: disk.Discard(offset, length); break;
                    case 2: disk.Flush(); continue;
                    case 3: disk.CheckpointBitmaps(); continue;
                    default:
                        rng.NextBytes(data.AsSpan(0, (int)length));
                        disk.Write(offset, data.AsSpan(0, (int)length));
                        break;
                }
                log.Ack(offset, length);
            }
            // The states are built from the log; the image is then closed (its close is not part of them).
            host.Recorder = null;
        }

        var events = log.Events;
        var fsyncs = Enumerable.Range(0, events.Count).Where(i => events[i] is WriteLog.Fsync).ToList();
        int states = 0;
        string state = P("state.qcow2");
        foreach (int boundary in fsyncs.Prepend(-1))
        {
            int next = fsyncs.FirstOrDefault(f => f > boundary, events.Count);
            // The state right at the fsync, and random subsets of what was issued after it (up to a random crash point).
            for (int variant = 0; variant < 2; variant++)
            {
                int crashAt = variant == 0 ? boundary + 1 : rng.Next(boundary + 1, next + 1);
                File.WriteAllBytes(state, initial);
                using (var file = new FileStream(state, FileMode.Open, FileAccess.ReadWrite))
                {
                    for (int i = 0; i <= boundary; i++) Apply(file, events[i]);
                    for (int i = boundary + 1; i < crashAt; i++)
                        if (variant > 0 && rng.Next(2) == 0) Apply(file, events[i]);
                }
                states++;
                var check = Tools.Run("qemu-img", "check", "--output=json", state);
                Assert.True(check.Exit is 0 or 3, $"state {boundary}+{crashAt}: qemu-img check exit {check.Exit}: {check.Stdout}{check.Stderr}");
                Assert.DoesNotContain("\"corruptions\"", check.Stdout);

                using var reopened = Qcow2Image.Open(HostFile.Open(state, readOnly: false), new Qcow2OpenOptions { CrashSafeBitmaps = true });
                var bitmap = reopened.Bitmaps.Get("b0");
                Assert.False(bitmap.Inconsistent, $"state {boundary}+{crashAt}: the bitmap loaded inconsistent");
                foreach (var acked in events.Take(crashAt).OfType<WriteLog.Acked>())
                    for (long g = acked.Offset / Granule; g <= (acked.Offset + acked.Count - 1) / Granule; g++)
                        Assert.True(bitmap.Bits.Get(g), $"state {boundary}+{crashAt}: granule {g} of an acknowledged write is missing");
            }
        }
        _output.WriteLine($"{states} crash states from {events.Count} recorded events ({fsyncs.Count} fsyncs)");
        Assert.True(states > 50, $"only {states} crash states");
    }
}
