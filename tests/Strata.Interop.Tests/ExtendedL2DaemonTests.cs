using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>blockdev-create with extended-l2 in the daemon, against qemu-storage-daemon: the image qemu-img sees,
/// and the error of a cluster size too small for subclusters.</summary>
public class ExtendedL2DaemonTests : ScratchDirTest
{
    private async Task<List<string>> Scenario(QmpClient c, string prefix)
    {
        var log = new List<string>();
        var events = new EventLog(c);
        async Task<JsonNode?> Job(string id)
        {
            await JobWaits.UntilConcluded(events, id);
            return await JobWaits.Info(events, id);
        }
        foreach (var (name, clusterSize) in new[] { ("ok", 65536), ("small", 8192) })
        {
            string img = P($"{prefix}-{name}.qcow2");
            await c.ExecuteAsync("blockdev-create", JsonNode.Parse($$$"""{"job-id":"f-{{{name}}}","options":{"driver":"file","filename":"{{{img}}}","size":0}}"""));
            await Job($"f-{name}");
            await c.ExecuteAsync("job-dismiss", JsonNode.Parse($$"""{"id":"f-{{name}}"}"""));
            await c.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"file","node-name":"n-{{name}}","filename":"{{img}}"}"""));
            await c.ExecuteAsync("blockdev-create", JsonNode.Parse($$$"""{"job-id":"q-{{{name}}}","options":{"driver":"qcow2","file":"n-{{{name}}}","size":1048576,"cluster-size":{{{clusterSize}}},"extended-l2":true}}"""));
            var job = await Job($"q-{name}");
            log.Add($"{name}: {job!["error"]?.GetValue<string>() ?? "no error"}");
            await c.ExecuteAsync("job-dismiss", JsonNode.Parse($$"""{"id":"q-{{name}}"}"""));
        }
        await c.ExecuteAsync("quit");
        return log;
    }

    [Fact]
    public async Task BlockdevCreate_ExtendedL2_AsQemuStorageDaemon()
    {
        var (qemu, strata) = await Differential.OnBothDaemons(Dir, Scenario);
        Assert.Equal(qemu, strata);
        Tools.AssertQemuCheckClean(P("s-ok.qcow2"));
        Assert.Contains("\"extended-l2\": true", Tools.QemuImg("info", "--output=json", P("s-ok.qcow2")).Ok().Stdout);
        Tools.AssertQemuIdentical(P("q-ok.qcow2"), P("s-ok.qcow2"));
    }
}
