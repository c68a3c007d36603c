using Tools = Strata.Interop.Tests.Infra.Tools;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// A real full disk under a backup or mirror target: a small tmpfs, not an injected error. Against
/// qemu-storage-daemon: the job fails (report) or pauses (enospc / stop) with ENOSPC, the guest's writes outside
/// what the job still has to copy go on unharmed, and the next incremental from the same bitmap is correct.
/// </summary>
public class NoSpaceTests : ScratchDirTest
{
    /// <summary>A tmpfs of <paramref name="size"/> at <paramref name="path"/>, unmounted when disposed (CI runs as root).</summary>
    private sealed class SmallDisk : IDisposable
    {
        private readonly string _path;

        public SmallDisk(string path, string size)
        {
            _path = path;
            Directory.CreateDirectory(path);
            var mount = Tools.Run("mount", "-t", "tmpfs", "-o", $"size={size}", "tmpfs", path);
            Assert.True(mount.Exit == 0, $"a tmpfs for the full-disk tests could not be mounted (root is needed): {mount.Stderr}");
        }

        public void Dispose() => Tools.Run("umount", "-l", _path);
    }

    private static string Guest(BackupSourceProcess src, string command) =>
        Tools.Run("qemu-io", "-f", "raw", "-c", command, $"nbd+unix:///disk?socket={src.NbdPath}") is var r && r.Exit == 0 && !r.Stdout.Contains("failed")
            ? "ok"
            : $"FAILED: {r.Stdout.Trim()} {r.Stderr.Trim()}";

    /// <summary>One scenario's world: a 3 MiB tmpfs at DIR/small, a daemon of <paramref name="kind"/> serving a 64 MiB
    /// disk, its QMP connection, events and transcript.</summary>
    private sealed class Setup : IAsyncDisposable
    {
        public required string Dir { get; init; }
        public required SmallDisk Small { get; init; }
        public required BackupSourceProcess Source { get; init; }
        public required QmpClient Qmp { get; init; }
        public required EventLog Events { get; init; }
        public required QmpTranscript Transcript { get; init; }

        public static async Task<Setup> StartAsync(string kind, string dir)
        {
            var small = new SmallDisk(Path.Combine(dir, "small"), "3M");
            var src = new BackupSourceProcess(kind, dir, ["disk"], size: "64M");
            var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
            return new Setup { Dir = dir, Small = small, Source = src, Qmp = qmp, Events = new EventLog(qmp), Transcript = new QmpTranscript(qmp, dir) };
        }

        public async ValueTask DisposeAsync()
        {
            await Qmp.DisposeAsync();
            Source.Dispose();
            Small.Dispose();
        }
    }

    private async Task<List<string>> BackupScenario(string kind, string policy)
    {
        string dir = Directory.CreateDirectory(P($"{kind}-{policy}")).FullName;
        await using var setup = await Setup.StartAsync(kind, dir);
        var (src, qmp, events, t) = (setup.Source, setup.Qmp, setup.Events, setup.Transcript);
        var log = t.Lines;
        foreach (var (name, file) in new[] { ("full0", "full0.qcow2"), ("inc1", "inc1.qcow2"), ("small", "small/t.qcow2") })
        {
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, file), "64M").Exit);
            await t.Try("blockdev-add", $$$"""{"driver":"qcow2","node-name":"{{{name}}}","file":{"driver":"file","filename":"{{{Path.Combine(dir, file)}}}"}}""");
        }

        // The chain's start: a full backup and the bitmap, at one point in time.
        await t.Try("transaction", """{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"disk","name":"b0"}},{"type":"blockdev-backup","data":{"device":"disk","target":"full0","sync":"full","job-id":"full"}}]}""");
        log.Add("full: " + (await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]?.ToString());
        events.Clear();
        log.Add("guest writes 8M: " + Guest(src, "write -P 0x21 16M 8M"));

        // The incremental meets a full disk after about 3 MiB.
        await t.Try("blockdev-backup", $$"""{"device":"disk","target":"small","sync":"incremental","bitmap":"b0","job-id":"inc","on-target-error":"{{policy}}"}""");
        if (policy == "report")
        {
            var done = await events.WaitAsync("BLOCK_JOB_COMPLETED");
            log.Add($"inc: completed, error: {done["data"]!["error"]}");
        }
        else
        {
            var error = await events.WaitAsync("BLOCK_JOB_ERROR");
            log.Add($"inc: error event: operation {error["data"]!["operation"]}, action {error["data"]!["action"]}");
            await JobWaits.UntilStatus(events, "inc", "paused");
            log.Add("inc: paused");
            // The guest goes on writing where the job has nothing left to copy.
            log.Add("guest writes while paused: " + Guest(src, "write -P 0x22 40M 1M"));
            await t.Try("job-cancel", """{"id":"inc"}""");
            var cancelled = await events.WaitAsync("BLOCK_JOB_CANCELLED");
            log.Add($"inc: {cancelled["event"]}");
        }
        log.Add("guest writes after: " + Guest(src, "write -P 0x23 48M 1M"));
        var bitmaps = (await qmp.ExecuteAsync("query-named-block-nodes", System.Text.Json.Nodes.JsonNode.Parse("""{"flat":true}""")))!.AsArray()
            .Single(n => n!["node-name"]!.GetValue<string>() == "disk")!["dirty-bitmaps"]!.AsArray();
        log.Add("b0 after the failure: " + string.Join(",", bitmaps.Select(b => $"{b!["name"]} count={b["count"]} busy={b["busy"]}")));

        // The next incremental, from the same bitmap, onto a disk with room: it must be the disk as it is now.
        await src.CopyAsync("disk", Path.Combine(dir, "now.raw"));
        events.Clear();
        await t.Try("blockdev-backup", """{"device":"disk","target":"inc1","sync":"incremental","bitmap":"b0","job-id":"inc1"}""");
        log.Add("inc1: " + (await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]?.ToString());
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, Tools.Run("qemu-img", "rebase", "-u", "-f", "qcow2", "-b", Path.Combine(dir, "full0.qcow2"), "-F", "qcow2", Path.Combine(dir, "inc1.qcow2")).Exit);
        var cmp = Tools.Run("qemu-img", "compare", "-F", "raw", Path.Combine(dir, "inc1.qcow2"), Path.Combine(dir, "now.raw"));
        log.Add($"full0 + inc1 == disk: {cmp.Exit == 0} {cmp.Stdout.Trim()}");
        Tools.AssertQemuCheckClean(Path.Combine(dir, "disk.qcow2"));
        return log;
    }

    [Theory]
    [InlineData("report")]
    [InlineData("enospc")]
    public async Task ABackupOntoAFullDiskFailsOrPausesAndTheNextIncrementalIsRight(string policy)
    {
        await Differential.AssertSameAsQemu(kind => BackupScenario(kind, policy));
    }

    private async Task<List<string>> MirrorScenario(string kind)
    {
        string dir = Directory.CreateDirectory(P($"{kind}-mirror")).FullName;
        await using var setup = await Setup.StartAsync(kind, dir);
        var (src, qmp, events, t) = (setup.Source, setup.Qmp, setup.Events, setup.Transcript);
        var log = t.Lines;
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "small/t.qcow2"), "64M").Exit);
        await t.Try("blockdev-add", $$$"""{"driver":"qcow2","node-name":"small","file":{"driver":"file","filename":"{{{Path.Combine(dir, "small/t.qcow2")}}}"}}""");
        await t.Try("blockdev-mirror", """{"job-id":"m","device":"disk","target":"small","sync":"full","on-target-error":"report"}""");
        var done = await events.WaitAsync("BLOCK_JOB_COMPLETED");
        log.Add($"mirror: completed, error: {done["data"]!["error"]}");
        log.Add("guest writes after: " + Guest(src, "write -P 0x31 20M 2M"));
        await src.CopyAsync("disk", Path.Combine(dir, "now.raw"));
        await qmp.ExecuteAsync("quit");
        Tools.AssertQemuCheckClean(Path.Combine(dir, "disk.qcow2"));
        var read = Tools.Run("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x31 20M 2M", Path.Combine(dir, "disk.qcow2"));
        log.Add("the guest's data is on the disk: " + (read.Exit == 0 && !read.Stdout.Contains("fail")));
        return log;
    }

    [Fact]
    public async Task AMirrorOntoAFullDiskFailsAndTheGuestGoesOn()
    {
        await Differential.AssertSameAsQemu(MirrorScenario);
    }
}
