using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>blockdev-mirror's life against qemu-storage-daemon's: refusals, events and states up to ready, the
/// switch-over moving the export to the target, and cancel once ready (a point-in-time copy, no switch).</summary>
public class MirrorDifferentialTests : ScratchDirTest
{
    private async Task<List<string>> Scenario(string kind, string ending)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "t.qcow2"), "32M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "small.qcow2"), "16M").Exit);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        var transcript = new QmpTranscript(qmp);
        var log = transcript.Lines;
        await transcript.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tgt\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/t.qcow2\"}}");
        await transcript.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"small\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/small.qcow2\"}}");
        await transcript.Try("blockdev-mirror", """{"job-id":"m","device":"src","target":"src","sync":"full"}""");
        await transcript.Try("blockdev-mirror", """{"job-id":"m","device":"src","target":"nope","sync":"full"}""");
        await transcript.Try("blockdev-mirror", """{"job-id":"m","device":"src","target":"tgt","sync":"full","granularity":1000}""");
        await transcript.Try("blockdev-mirror", """{"job-id":"m","device":"src","target":"tgt","sync":"full","granularity":256}""");
        await transcript.Try("blockdev-mirror", """{"job-id":"ms","device":"src","target":"small","sync":"full"}""");
        var failed = await events.WaitAsync("BLOCK_JOB_COMPLETED", e => e["data"]!["device"]!.GetValue<string>() == "ms");
        log.Add($"ms: {failed["data"]!["error"]}");
        events.Clear();
        await transcript.Try("blockdev-mirror", """{"job-id":"m","device":"src","target":"tgt","sync":"full","speed":1}""");
        await transcript.Try("job-complete", """{"id":"m"}""");
        await transcript.Try("block-job-set-speed", """{"device":"m","speed":0}""");
        await events.WaitAsync("BLOCK_JOB_READY");
        var job = (await qmp.ExecuteAsync("query-block-jobs"))!.AsArray()[0]!;
        log.Add($"ready: status={job["status"]} ready={job["ready"]} type={job["type"]} offset==len: {job["offset"]!.GetValue<long>() == job["len"]!.GetValue<long>()}");
        // Writes while ready are mirrored too.
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x6d 5M 1M", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        await src.CopyAsync("src", Path.Combine(dir, "src.raw"));
        if (ending == "complete") await transcript.Try("job-complete", """{"id":"m"}""");
        else if (ending == "soft-cancel") await transcript.Try("block-job-cancel", """{"device":"m"}""");
        else await transcript.Try("job-cancel", """{"id":"m"}""");
        var end = await events.WaitAsync(ending == "cancel" ? "BLOCK_JOB_CANCELLED" : "BLOCK_JOB_COMPLETED");
        log.Add($"end: {end["event"]} error={end["data"]!["error"]?.GetValue<string>() ?? "-"}");
        // The job's last states follow the end event (QEMU sends them in the same breath; a loaded machine may not).
        await events.WaitAsync("JOB_STATUS_CHANGE", e => e["data"]!["id"]!.GetValue<string>() == "m" && e["data"]!["status"]!.GetValue<string>() == "null");
        var states = events.Snapshot().Where(e => e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && e["data"]!["id"]!.GetValue<string>() == "m")
            .Select(e => e["data"]!["status"]!.GetValue<string>());
        log.Add("states: " + string.Join(" ", states));
        var exports = (await qmp.ExecuteAsync("query-block-exports"))!.AsArray();
        log.Add("export on: " + string.Join(",", exports.Select(e => e!["node-name"]!.GetValue<string>())));
        if (ending == "complete")
        {
            // After the switch, the guest's writes go to the target.
            Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x6e 9M 64k", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
            await src.CopyAsync("src", Path.Combine(dir, "src.raw"));
        }
        await qmp.ExecuteAsync("quit");
        var cmp = Tools.Run("qemu-img", "compare", "-F", "raw", Path.Combine(dir, "t.qcow2"), Path.Combine(dir, "src.raw"));
        // A forced cancel leaves the target wherever the copy was: only the other endings promise it.
        if (ending != "cancel") log.Add($"target == source: {cmp.Exit == 0}");
        return log;
    }

    [Theory]
    [InlineData("complete")]
    [InlineData("soft-cancel")]
    [InlineData("cancel")]
    public async Task AMirrorLivesAsInQemuStorageDaemon(string ending)
    {
        await Differential.AssertSameAsQemu(kind => Scenario(kind, ending));
    }

    /// <summary>sync=top to a target of 128 KiB clusters over the source's own backing file, added without it
    /// (backing: null): the target cannot copy on write, so the mirror copies whole target clusters around what it
    /// copies, as QEMU does (its COW bitmap), and zeroes only whole clusters. Otherwise a zeroed 64 KiB granule is a
    /// no-op on an unallocated cluster and a 64 KiB write fills the rest of its cluster with zeros, where the target
    /// read over its backing file must show the backing's data.</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task AMirrorToATargetWithoutItsBackingCopiesWholeTargetClusters(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        string Path(string name) => System.IO.Path.Combine(dir, name);
        Tools.QemuImg("create", "-q", "-f", "qcow2", Path("base.qcow2"), "32M").Ok();
        Tools.Run("qemu-io", "-c", "write -P 0x77 0 32M", Path("base.qcow2")).Ok();
        // The source's own layer: a zeroed granule and a written one, each half of a 128 KiB target cluster.
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", Path("src.qcow2"), "32M").Ok();
        Tools.Run("qemu-io", "-c", "write -z 0 64k", "-c", "write -P 0x22 192k 64k", Path("src.qcow2")).Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=131072", "-b", "base.qcow2", "-F", "qcow2", Path("t.qcow2"), "32M").Ok();
        using var src = new BackupSourceProcess(kind, dir, ["src"], createImages: false);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""
            {"driver":"qcow2","node-name":"tgt","file":{"driver":"file","filename":"{{{Path("t.qcow2")}}}"},"backing":null}
            """));
        await qmp.ExecuteAsync("blockdev-mirror", JsonNode.Parse("""{"job-id":"m","device":"src","target":"tgt","sync":"top"}"""));
        await events.WaitAsync("BLOCK_JOB_READY");
        await src.CopyAsync("src", Path("src.raw"));
        await qmp.ExecuteAsync("block-job-cancel", JsonNode.Parse("""{"device":"m"}"""));
        var end = await events.WaitAsync("BLOCK_JOB_COMPLETED");
        Assert.Null(end["data"]!["error"]);
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"tgt"}"""));
        // Read as every tool reads the file: over the backing file its header names.
        var cmp = Tools.Run("qemu-img", "compare", "-F", "raw", Path("t.qcow2"), Path("src.raw"));
        Assert.True(cmp.Exit == 0, cmp.Stdout + cmp.Stderr);
        Tools.AssertQemuCheckClean(Path("t.qcow2"));
    }

    private async Task<List<string>> DriveMirror(string kind, bool complete)
    {
        string dir = Directory.CreateDirectory(P(kind + complete)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        var log = new List<string>();
        string target = Path.Combine(dir, "d.qcow2");
        await qmp.ExecuteAsync("drive-mirror", JsonNode.Parse("{\"job-id\":\"m\",\"device\":\"src\",\"target\":\"" + target + "\",\"format\":\"qcow2\",\"sync\":\"full\",\"node-name\":\"dm\"}"));
        await events.WaitAsync("BLOCK_JOB_READY");
        log.Add("nodes while ready: " + string.Join(",", (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).Where(n => !n.StartsWith('#'))));
        await qmp.ExecuteAsync(complete ? "job-complete" : "block-job-cancel", complete ? new { id = "m" } : new { device = "m" });
        var end = await events.WaitAsync("BLOCK_JOB_COMPLETED");
        log.Add($"end error={end["data"]!["error"]?.GetValue<string>() ?? "-"}");
        log.Add("nodes after: " + string.Join(",", (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).Where(n => !n.StartsWith('#'))));
        log.Add("export on: " + string.Join(",", (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Select(e => e!["node-name"]!.GetValue<string>())));
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x6f 7M 64k", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        await src.CopyAsync("src", Path.Combine(dir, "now.raw"));
        await qmp.ExecuteAsync("quit");
        log.Add($"the new image is the disk now: {Tools.Run("qemu-img", "compare", "-F", "raw", target, Path.Combine(dir, "now.raw")).Exit == 0}");
        return log;
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task DriveMirrorSwitchesToTheImageItCreatedAsInQemuStorageDaemon(bool complete)
    {
        await Differential.AssertSameAsQemu(kind => DriveMirror(kind, complete));
    }

    [Fact]
    public async Task WithWriteBlockingEveryAcknowledgedWriteIsAlreadyOnTheTarget()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["src"]);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("t.qcow2"), "32M").Exit);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"qcow2\",\"node-name\":\"tgt\",\"file\":{\"driver\":\"file\",\"filename\":\"" + P("t.qcow2") + "\"}}"));
        await qmp.ExecuteAsync("blockdev-mirror", JsonNode.Parse("""{"job-id":"m","device":"src","target":"tgt","sync":"full","copy-mode":"write-blocking"}"""));
        await events.WaitAsync("BLOCK_JOB_READY");
        await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"t","node-name":"tgt","name":"t"}"""));
        await using var guest = await src.ConnectAsync("src");
        await using var target = await Strata.Protocol.Nbd.NbdClient.ConnectUnixAsync(src.NbdPath, "t");
        var rng = new Random(5);
        for (int i = 0; i < 50; i++)
        {
            var data = new byte[4096 * rng.Next(1, 20)];
            rng.NextBytes(data);
            long at = rng.Next(0, 7000) * 4096L;
            await guest.WriteAsync(at, data);
            var back = new byte[data.Length];
            await target.ReadAsync(at, back);
            Assert.True(back.AsSpan().SequenceEqual(data), $"write {i} at {at} not yet on the target when acknowledged");
        }
        await qmp.ExecuteAsync("job-complete", new { id = "m" });
        Assert.Null((await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]);
        await qmp.ExecuteAsync("quit");
    }

    private async Task<List<string>> FailingTarget(string kind, string policy)
    {
        string dir = Directory.CreateDirectory(P(kind + policy)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "t.qcow2"), "32M").Exit);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        var log = new List<string>();
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"qcow2\",\"node-name\":\"tgt\",\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\""
            + dir + "/t.qcow2\"},\"inject-error\":[{\"event\":\"write_aio\",\"errno\":5,\"once\":true}]}}"));
        await qmp.ExecuteAsync("blockdev-mirror", JsonNode.Parse("{\"job-id\":\"m\",\"device\":\"src\",\"target\":\"tgt\",\"sync\":\"full\",\"on-target-error\":\"" + policy + "\"}"));
        var error = await events.WaitAsync("BLOCK_JOB_ERROR");
        log.Add($"error: operation={error["data"]!["operation"]} action={error["data"]!["action"]}");
        if (policy == "stop")
        {
            await JobWaits.UntilStatus(events, "m", "paused");
            var job = (await qmp.ExecuteAsync("query-block-jobs"))!.AsArray()[0];
            log.Add($"stopped: status={job!["status"]} io-status={job["io-status"]} paused={job["paused"]}");
            await qmp.ExecuteAsync("job-resume", new { id = "m" });
        }
        if (policy == "report")
        {
            var end = await events.WaitAsync("BLOCK_JOB_COMPLETED");
            log.Add($"end: error={end["data"]!["error"]}");
        }
        else
        {
            await events.WaitAsync("BLOCK_JOB_READY");
            await qmp.ExecuteAsync("job-complete", new { id = "m" });
            var end = await events.WaitAsync("BLOCK_JOB_COMPLETED");
            log.Add($"end: error={end["data"]!["error"]?.ToString() ?? "-"}");
            await src.CopyAsync("src", Path.Combine(dir, "src.raw"));
        }
        await qmp.ExecuteAsync("quit");
        if (policy != "report")
            log.Add($"target == source: {Tools.Run("qemu-img", "compare", "-F", "raw", Path.Combine(dir, "t.qcow2"), Path.Combine(dir, "src.raw")).Exit == 0}");
        return log;
    }

    [Theory]
    [InlineData("report")]
    [InlineData("stop")]
    [InlineData("ignore")]
    public async Task AFailingMirrorTargetFollowsItsErrorPolicyAsInQemuStorageDaemon(string policy)
    {
        await Differential.AssertSameAsQemu(kind => FailingTarget(kind, policy));
    }
}
