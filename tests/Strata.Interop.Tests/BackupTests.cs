using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Push backups on strata daemon, judged by QEMU's tools: a full backup and incrementals restored with qemu-img
/// convert equal the disk at each backup; writes racing a running backup never leak into it; bad requests
/// change nothing.
/// </summary>
public class BackupTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("bk-").FullName;
    private string P(string name) => Path.Combine(_dir, name);

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private StrataDaemonProcess Start(string image) => new(_dir, "d", [
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
        Assert.Equal("GenericError: Invalid job ID ''",
            await Fails("blockdev-backup", """{"device":"drive0","target":"small","sync":"full"}"""));
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
