using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Push backups on strata daemon, judged by QEMU's tools: a full backup and incrementals restored with qemu-img
/// convert equal the disk at each backup; writes racing a running backup never leak into it; bad requests
/// change nothing.
/// </summary>
public class BackupTests : ScratchDirTest
{
    private StrataDaemonProcess Start(string image) => new(Dir, "d", [
        "--blockdev", $"driver=file,node-name=f0,filename={image}", "--blockdev", "driver=qcow2,node-name=drive0,file=f0",
        "--nbd-server", $"addr.type=unix,addr.path={P("d.nbd")}", "--export", "type=nbd,id=exp0,node-name=drive0,writable=on"]);

    private string Uri => $"nbd+unix:///drive0?socket={P("d.nbd")}";

    private void Write(params string[] commands)
    {
        var r = Tools.Run("qemu-io", ["-f", "raw", .. commands.SelectMany(c => new[] { "-c", c }), Uri]);
        Assert.True(r.Exit == 0 && !r.Stdout.Contains("fail", StringComparison.OrdinalIgnoreCase), r.Stdout + r.Stderr);
    }

    private void Snapshot(string name) => Assert.Equal(0, Tools.Run("nbdcopy", Uri, P(name)).Exit);

    private static async Task<JsonObject> WaitEvent(IAsyncEnumerator<JsonObject> events, string name, string device)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
        while (await events.MoveNextAsync().AsTask().WaitAsync(cts.Token))
        {
            var e = events.Current;
            if (e["event"]!.GetValue<string>() == name && e["data"]?["device"]?.GetValue<string>() == device) return e;
        }
        throw new TimeoutException(name);
    }

    [Fact]
    public async Task FullThenIncrementalsRestoreEachPointInTime()
    {
        string src = P("src.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", src, "64M").Exit);
        using var d = Start(src);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        var events = qmp.Events().GetAsyncEnumerator();
        Write("write -P 0x11 0 4M", "write -P 0x12 20M 1M", "write -z 30M 2M");
        Snapshot("t0.raw");
        // The seed talk's first example: a new bitmap and a full backup in one transaction.
        await qmp.ExecuteAsync("transaction", JsonNode.Parse($$$"""
            {"actions":[
              {"type":"block-dirty-bitmap-add","data":{"node":"drive0","name":"bitmap0"}},
              {"type":"drive-backup","data":{"job-id":"full","device":"drive0","target":"{{{P("full.qcow2")}}}","sync":"full","format":"qcow2"}}]}
            """));
        var done = await WaitEvent(events, "BLOCK_JOB_COMPLETED", "full");
        Assert.Null(done["data"]!["error"]);

        Write("write -P 0x21 1M 64k", "write -P 0x22 40M 3M", "discard 20M 1M");
        Snapshot("t1.raw");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", P("inc1.qcow2")).Exit);
        await qmp.ExecuteAsync("drive-backup", JsonNode.Parse($$$"""
            {"job-id":"inc1","device":"drive0","target":"{{{P("inc1.qcow2")}}}","sync":"incremental","bitmap":"bitmap0","mode":"existing","format":"qcow2"}
            """));
        Assert.Null((await WaitEvent(events, "BLOCK_JOB_COMPLETED", "inc1"))["data"]!["error"]);

        Write("write -P 0x31 2M 512", "write -P 0x32 63M 1M");
        Snapshot("t2.raw");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "inc1.qcow2", "-F", "qcow2", P("inc2.qcow2")).Exit);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver":"qcow2","node-name":"t2","file":{"driver":"file","filename":"{{{P("inc2.qcow2")}}}"},"backing":null}
            """));
        await qmp.ExecuteAsync("blockdev-backup", new Dictionary<string, string>
            { ["job-id"] = "inc2", ["device"] = "drive0", ["target"] = "t2", ["sync"] = "incremental", ["bitmap"] = "bitmap0" });
        Assert.Null((await WaitEvent(events, "BLOCK_JOB_COMPLETED", "inc2"))["data"]!["error"]);
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"t2"}"""));

        // The incrementals hold only what changed, and every point restores byte for byte.
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        var bitmap = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!["dirty-bitmaps"]![0]!;
        Assert.Equal(0, bitmap["count"]!.GetValue<long>());
        foreach (var (image, snapshot) in new[] { ("full.qcow2", "t0.raw"), ("inc1.qcow2", "t1.raw"), ("inc2.qcow2", "t2.raw") })
        {
            Assert.Equal(0, Tools.Run("qemu-img", "check", P(image)).Exit);
            Assert.Equal(0, Tools.Run("qemu-img", "convert", "-O", "raw", P(image), P(image + ".raw")).Exit);
            Assert.True(File.ReadAllBytes(P(image + ".raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P(snapshot))), $"{image} restores {snapshot}");
        }
        // A sparse disk gives a sparse full backup (5 MiB of data), and inc1 holds the 3 MiB + 64 KiB written since
        // the full backup (plus a little metadata), nothing else.
        Assert.InRange(new FileInfo(P("full.qcow2")).Length, 5L << 20, 6L << 20);
        long inc1Size = new FileInfo(P("inc1.qcow2")).Length;
        Assert.InRange(inc1Size, (3L << 20) + 65536, (3L << 20) + 65536 + (512L << 10));
    }

    /// <summary>compress=true to a target of 32 KiB clusters: a copy unit (64 KiB) is two target clusters, each
    /// written compressed. qemu-storage-daemon and strata daemon alike: the job completes, the file checks clean,
    /// holds compressed clusters and reads back as the disk.</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task ACompressedBackupToATargetOfSmallerClustersCompletesAndReadsBack(string kind)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["vda"]);
        await src.CopyAsync("vda", P("vda.raw"));
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=32768", P("c.qcow2"), "32M").Ok();
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = qmp.Events().GetAsyncEnumerator();
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver":"qcow2","node-name":"c","file":{"driver":"file","filename":"{{{P("c.qcow2")}}}"}}
            """));
        await qmp.ExecuteAsync("blockdev-backup", JsonNode.Parse("""{"job-id":"j","device":"vda","target":"c","sync":"full","compress":true}"""));
        Assert.Null((await WaitEvent(events, "BLOCK_JOB_COMPLETED", "j"))["data"]!["error"]);
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"c"}"""));
        Tools.AssertQemuCheckClean(P("c.qcow2"));
        // Compressed clusters have no host offset to map, and 7 MiB of repeated bytes take a few KiB.
        var map = Tools.QemuImg("map", "--output=json", P("c.qcow2")).Ok().Json().EnumerateArray().ToList();
        Assert.All(map.Where(e => e.GetProperty("data").GetBoolean()), e => Assert.False(e.TryGetProperty("offset", out _), e.ToString()));
        Assert.InRange(new FileInfo(P("c.qcow2")).Length, 1, 1L << 20);
        Tools.QemuImg("convert", "-O", "raw", P("c.qcow2"), P("c.raw")).Ok();
        Assert.True(File.ReadAllBytes(P("c.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("vda.raw"))));
    }

    [Fact]
    public async Task WritesRacingAFullBackupNeverLeakIntoIt()
    {
        string src = P("race.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", src, "32M").Exit);
        using var d = Start(src);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        var events = qmp.Events().GetAsyncEnumerator();
        Write("write -P 0x41 0 32M");
        Snapshot("before.raw");
        // Slow enough (8 MiB/s) that the writes below land while clusters are still to copy.
        await qmp.ExecuteAsync("drive-backup", JsonNode.Parse($$$"""
            {"job-id":"race","device":"drive0","target":"{{{P("race-backup.qcow2")}}}","sync":"full","format":"qcow2","speed":8388608}
            """));
        var rng = new Random(3);
        var writes = Enumerable.Range(0, 40).Select(i => $"write -P {i + 1} {rng.Next(0, 32 * 16) * 65536L + rng.Next(0, 64) * 512} {rng.Next(1, 64) * 512}").ToArray();
        Write(writes);
        Assert.Null((await WaitEvent(events, "BLOCK_JOB_COMPLETED", "race"))["data"]!["error"]);
        Assert.Equal(0, Tools.Run("qemu-img", "convert", "-O", "raw", P("race-backup.qcow2"), P("race-backup.raw")).Exit);
        Assert.True(File.ReadAllBytes(P("race-backup.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("before.raw"))), "the backup is the disk at job start");
    }

    [Fact]
    public async Task BadBackupRequestsChangeNothing()
    {
        string src = P("bad.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", src, "32M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("small.qcow2"), "16M").Exit);
        using var d = Start(src);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "b0" });
        Write("write -P 1 0 1M");
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""{"driver":"qcow2","node-name":"small","file":{"driver":"file","filename":"{{{P("small.qcow2")}}}"}}"""));
        async Task<string> Fails(string cmd, string args)
        {
            var e = await Assert.ThrowsAsync<QmpException>(() => qmp.ExecuteAsync(cmd, JsonNode.Parse(args)));
            return e.ErrorClass + ": " + e.Message;
        }
        Assert.Equal("GenericError: Bitmap 'nope' could not be found",
            await Fails("blockdev-backup", """{"job-id":"j","device":"drive0","target":"small","sync":"incremental","bitmap":"nope"}"""));
        Assert.Equal("GenericError: Source and target image have different sizes",
            await Fails("blockdev-backup", """{"job-id":"j","device":"drive0","target":"small","sync":"full"}"""));
        Assert.Equal("GenericError: Source and target cannot be the same",
            await Fails("blockdev-backup", """{"job-id":"j","device":"drive0","target":"drive0","sync":"full"}"""));
        Assert.Equal("GenericError: Invalid job ID '1bad'",
            await Fails("blockdev-backup", """{"job-id":"1bad","device":"drive0","target":"small","sync":"full"}"""));
        Assert.Equal("GenericError: Transaction aborted using Abort action",
            await Fails("transaction", """{"actions":[{"type":"block-dirty-bitmap-clear","data":{"node":"drive0","name":"b0"}},{"type":"block-dirty-bitmap-add","data":{"node":"drive0","name":"tx"}},{"type":"abort","data":{}}]}"""));
        Assert.StartsWith("DeviceNotActive", await Fails("block-job-cancel", """{"device":"j"}"""));
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        var bitmaps = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!["dirty-bitmaps"]!.AsArray();
        Assert.Single(bitmaps); // no "tx"
        Assert.Equal(16 * 65536, bitmaps[0]!["count"]!.GetValue<long>()); // the clear was undone
        Assert.False(bitmaps[0]!["busy"]!.GetValue<bool>());
        Assert.Empty((await qmp.ExecuteAsync("query-jobs"))!.AsArray());
    }
}

/// <summary>Failure paths with blkdebug: individual mode lets the healthy job finish; grouped mode cancels
/// everything and keeps every bitmap; a retry then succeeds.</summary>
public class BackupFailureTests : ScratchDirTest
{
    [Fact]
    public async Task GroupedFailureCancelsAllAndKeepsBitmapsIndividualFailureDoesNot()
    {
        foreach (var n in new[] { "d0", "d1" })
        {
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P(n + ".qcow2"), "16M").Exit);
            Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x61 0 4M", "-c", "write -P 0x62 8M 1M", P(n + ".qcow2")).Exit);
        }
        // d1's file fails the first two guest-data reads with EIO (two rules, each once).
        string blkdebug = $$$"""{"driver":"qcow2","node-name":"d1","file":{"driver":"blkdebug","image":{"driver":"file","filename":"{{{P("d1.qcow2")}}}"},"inject-error":[{"event":"read_aio","errno":5,"once":true},{"event":"read_aio","errno":5,"once":true}]}}""";
        using var d = new StrataDaemonProcess(Dir, "f", [
            "--blockdev", $"driver=file,node-name=f0,filename={P("d0.qcow2")}", "--blockdev", "driver=qcow2,node-name=d0,file=f0",
            "--blockdev", blkdebug, "--nbd-server", $"addr.type=unix,addr.path={P("f.nbd")}", "--export", "type=nbd,id=e0,node-name=d0,writable=on"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        var events = new List<JsonObject>();
        var reader = Task.Run(async () => { await foreach (var e in qmp.Events()) lock (events) events.Add(e); });
        foreach (var n in new[] { "d0", "d1" })
            await qmp.ExecuteAsync("block-dirty-bitmap-add", new Dictionary<string, object> { ["node"] = n, ["name"] = "b", ["granularity"] = 65536 });
        async Task<long> Count(string node)
        {
            var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
            return nodes.First(x => x!["node-name"]!.GetValue<string>() == node)!["dirty-bitmaps"]!.AsArray()
                .First(b => b!["name"]?.GetValue<string>() == "b")!["count"]!.GetValue<long>();
        }
        // Dirty some clusters so the bitmaps have something to keep.
        foreach (var n in new[] { "d0", "d1" }) Assert.Equal(0, (await Count(n)));
        async Task<Dictionary<string, string>> RunTransaction(string round, bool grouped)
        {
            lock (events) events.Clear();
            // One worker per job, so that exactly one injected error is used per round.
            string Backup(string n) => "{\"type\":\"drive-backup\",\"data\":{\"job-id\":\"" + n + "-" + round + "\",\"device\":\"" + n + "\",\"target\":\"" + P($"{n}-{round}.qcow2")
                + "\",\"sync\":\"full\",\"format\":\"qcow2\",\"bitmap\":\"b\",\"bitmap-mode\":\"on-success\",\"x-perf\":{\"max-workers\":1}}}";
            string props = grouped ? ""","properties":{"completion-mode":"grouped"}""" : "";
            await qmp.ExecuteAsync("transaction", JsonNode.Parse($$$"""{"actions":[{{{Backup("d0")}}},{{{Backup("d1")}}}]{{{props}}}}"""));
            var outcome = new Dictionary<string, string>();
            for (int i = 0; i < 400 && outcome.Count < 2; i++)
            {
                await Task.Delay(25);
                lock (events)
                    foreach (var e in events)
                    {
                        string name = e["event"]!.GetValue<string>();
                        if (name is "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED")
                            outcome[e["data"]!["device"]!.GetValue<string>()] = name == "BLOCK_JOB_CANCELLED" ? "cancelled" : e["data"]!["error"] is { } err ? "failed: " + err : "completed";
                    }
            }
            return outcome;
        }
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new Dictionary<string, object> { ["node"] = "d0", ["name"] = "probe" });

        var individual = await RunTransaction("i", grouped: false);
        Assert.Equal("completed", individual["d0-i"]);
        Assert.Equal("failed: Input/output error", individual["d1-i"]);
        // Both images are open (and locked) in the daemon: compare them live, as qemu-img allows with -U.
        Assert.Equal(0, Tools.Run("qemu-img", "compare", "-U", P("d0.qcow2"), P("d0-i.qcow2")).Exit);

        // Writes after the individual round: d0's bitmap (synchronised by its successful job) records them.
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x71 1M 64k", "-c", "write -P 0x72 12M 128k", $"nbd+unix:///d0?socket={P("f.nbd")}").Exit);
        Assert.Equal(3 * 65536, await Count("d0"));

        var grouped = await RunTransaction("g", grouped: true);
        Assert.Equal("failed: Input/output error", grouped["d1-g"]);
        Assert.Equal("cancelled", grouped["d0-g"]);
        lock (events) Assert.Contains(events, e => e["event"]!.GetValue<string>() == "BLOCK_JOB_ERROR" && e["data"]!["device"]!.GetValue<string>() == "d1-g");

        // Every bitmap kept its bits (reclaimed), nothing is busy, and a retry now succeeds on both.
        Assert.Equal(3 * 65536, await Count("d0"));
        var retry = await RunTransaction("r", grouped: true);
        Assert.Equal("completed", retry["d0-r"]);
        Assert.Equal("completed", retry["d1-r"]);
        foreach (var n in new[] { "d0", "d1" })
        {
            Assert.Equal(0, await Count(n));
            var cmp = Tools.Run("qemu-img", "compare", "-U", P($"{n}.qcow2"), P($"{n}-r.qcow2"));
            Assert.True(cmp.Exit == 0, cmp.Stdout);
        }
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, d.WaitForExit());
    }
}

public class BackupErrorPolicyTests : ScratchDirTest
{
    [Fact]
    public async Task OnSourceErrorStopPausesTheJobUntilResumedThenItCompletes()
    {
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("s.qcow2"), "16M").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x51 0 16M", P("s.qcow2")).Exit);
        string drive = $$$"""{"driver":"qcow2","node-name":"s","file":{"driver":"blkdebug","image":{"driver":"file","filename":"{{{P("s.qcow2")}}}"},"inject-error":[{"event":"read_aio","errno":5,"once":true}]}}""";
        using var d = new StrataDaemonProcess(Dir, "p", ["--blockdev", drive]);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        var events = new EventLog(qmp);
        await qmp.ExecuteAsync("drive-backup", JsonNode.Parse($$$"""
            {"job-id":"j","device":"s","target":"{{{P("t.qcow2")}}}","sync":"full","format":"qcow2","on-source-error":"stop"}
            """));
        await JobWaits.UntilStatus(events, "j", "paused");
        var job = (await qmp.ExecuteAsync("query-block-jobs"))!.AsArray().FirstOrDefault();
        Assert.Equal("paused", job!["status"]!.GetValue<string>());
        Assert.True(job["paused"]!.GetValue<bool>());
        Assert.Equal("failed", job["io-status"]!.GetValue<string>());
        var error = await events.WaitAsync("BLOCK_JOB_ERROR");
        Assert.Equal("stop", error["data"]!["action"]!.GetValue<string>());
        Assert.Equal("read", error["data"]!["operation"]!.GetValue<string>());
        await qmp.ExecuteAsync("job-resume", new { id = "j" });
        Assert.Null((await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]);
        Assert.Single(events.Snapshot(), e => e["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED");
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, d.WaitForExit());
        Assert.Equal(0, Tools.Run("qemu-img", "compare", P("s.qcow2"), P("t.qcow2")).Exit);
    }
}
