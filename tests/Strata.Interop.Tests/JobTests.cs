using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>The job engine through blockdev-create, against qemu-storage-daemon: the same events, states,
/// errors, and an image qemu-img accepts.</summary>
public class JobTests : ScratchDirTest
{
    private async Task<List<string>> Scenario(QmpClient c, string prefix)
    {
        var log = new List<string>();
        var events = new EventLog(c);
        async Task<string> Try(string cmd, string args)
        {
            try
            {
                var r = await c.ExecuteAsync(cmd, JsonNode.Parse(args));
                return "ok";
            }
            catch (QmpException e)
            {
                return "error:" + e.ErrorClass;
            }
        }
        string img = P(prefix + ".qcow2");
        log.Add(await Try("blockdev-create", $$$"""{"job-id":"c1","options":{"driver":"file","filename":"{{{img}}}","size":0}}"""));
        await JobWaits.UntilStatus(events, "c1", "concluded");
        log.Add(await Try("job-dismiss", """{"id":"c1"}"""));
        log.Add(await Try("blockdev-add", $$"""{"driver":"file","node-name":"f0","filename":"{{img}}"}"""));
        log.Add(await Try("blockdev-create", """{"job-id":"c2","options":{"driver":"qcow2","file":"f0","size":67108864,"cluster-size":65536}}"""));
        await JobWaits.UntilStatus(events, "c2", "concluded");
        var jobs = (await c.ExecuteAsync("query-jobs"))!.AsArray();
        log.Add(string.Join(",", jobs.Select(j => $"{j!["id"]}:{j["type"]}:{j["status"]}:{j["current-progress"]}/{j["total-progress"]}:{j["error"]}")));
        log.Add(await Try("job-dismiss", """{"id":"c2"}"""));
        log.Add(await Try("blockdev-add", """{"driver":"qcow2","node-name":"d0","file":"f0"}"""));
        // A create that fails in the job, not in the command.
        log.Add(await Try("blockdev-create", """{"job-id":"c3","options":{"driver":"qcow2","file":"nosuch","size":1048576}}"""));
        await JobWaits.UntilStatus(events, "c3", "concluded");
        jobs = (await c.ExecuteAsync("query-jobs"))!.AsArray();
        log.Add(jobs.Any(j => j!["id"]!.GetValue<string>() == "c3" && j["error"] is not null) ? "c3 failed with an error" : "c3 did not fail");
        log.Add(await Try("job-dismiss", """{"id":"c3"}"""));
        // Verbs on jobs that do not exist, and verbs a state refuses.
        log.Add(await Try("job-cancel", """{"id":"nope"}"""));
        log.Add(await Try("block-job-cancel", """{"device":"nope"}"""));
        log.Add(await Try("block-job-set-speed", """{"device":"nope","speed":1}"""));
        log.Add(await Try("job-dismiss", """{"id":"nope"}"""));
        log.Add(await Try("blockdev-create", """{"job-id":"c4","options":{"driver":"file","filename":"/nonexistent-dir/x","size":0}}"""));
        await JobWaits.UntilStatus(events, "c4", "concluded");
        log.Add(await Try("job-finalize", """{"id":"c4"}"""));
        log.Add(await Try("job-dismiss", """{"id":"c4"}"""));
        await c.ExecuteAsync("quit");
        await events.Completion.WaitAsync(TimeSpan.FromSeconds(10));
        log.Add(string.Join(" ", events.Snapshot().Select(e =>
            e["event"]!.GetValue<string>() is var name && name == "JOB_STATUS_CHANGE" ? $"{e["data"]!["id"]}:{e["data"]!["status"]}" : name)));
        return log;
    }

    [Fact]
    public async Task BlockdevCreateJobsBehaveAsInQemuStorageDaemon()
    {
        var (qemu, strata) = await Differential.OnBothDaemons(Dir, Scenario);
        Console.Error.WriteLine(string.Join("\n", strata));
        Assert.Equal(qemu.Count, strata.Count);
        for (int i = 0; i < qemu.Count; i++) Assert.True(qemu[i] == strata[i], $"step {i}\nqemu:   {qemu[i]}\nstrata: {strata[i]}");
        var check = Tools.Run("qemu-img", "check", P("s.qcow2"));
        Assert.True(check.Exit == 0, check.Stdout + check.Stderr);
        Assert.Equal(0, Tools.Run("qemu-img", "compare", P("q.qcow2"), P("s.qcow2")).Exit);
        Assert.Contains("virtual size: 64 MiB", Tools.Run("qemu-img", "info", P("s.qcow2")).Stdout);
    }
}
