using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>blockdev-snapshot-sync against qemu-storage-daemon: refusals, the new overlay on top (alone and in a
/// transaction with a bitmap), the export writing into it, the base left as it was, and the chain qemu-img sees.</summary>
public class SnapshotSyncDifferentialTests : ScratchDirTest
{
    private async Task<List<string>> Scenario(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var transcript = new QmpTranscript(qmp, dir);
        var log = transcript.Lines;
        string ov1 = Path.Combine(dir, "ov1.qcow2"), ov2 = Path.Combine(dir, "ov2.qcow2");
        await transcript.Try("blockdev-snapshot-sync", "{\"node-name\":\"nope\",\"snapshot-file\":\"" + ov1 + "\",\"snapshot-node-name\":\"ov1\"}");
        await transcript.Try("blockdev-snapshot-sync", "{\"node-name\":\"src\",\"snapshot-file\":\"" + ov1 + "\"}");
        await transcript.Try("blockdev-snapshot-sync", "{\"node-name\":\"src\",\"snapshot-file\":\"" + ov1 + "\",\"snapshot-node-name\":\"src-file\"}");
        await transcript.Try("blockdev-snapshot-sync", "{\"node-name\":\"src\",\"snapshot-file\":\"" + ov1 + "\",\"snapshot-node-name\":\"ov1\"}");
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x71 2M 64k", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        await transcript.Try("transaction", "{\"actions\":[{\"type\":\"blockdev-snapshot-sync\",\"data\":{\"node-name\":\"ov1\",\"snapshot-file\":\"" + ov2
            + "\",\"snapshot-node-name\":\"ov2\"}},{\"type\":\"block-dirty-bitmap-add\",\"data\":{\"node\":\"ov2\",\"name\":\"b\"}}]}");
        // A transaction that fails after a snapshot action takes the snapshot back.
        await transcript.Try("transaction", "{\"actions\":[{\"type\":\"blockdev-snapshot-sync\",\"data\":{\"node-name\":\"ov2\",\"snapshot-file\":\"" + Path.Combine(dir, "ov3.qcow2")
            + "\",\"snapshot-node-name\":\"ov3\"}},{\"type\":\"abort\"}]}");
        await transcript.Try("transaction", "{\"actions\":[{\"type\":\"blockdev-snapshot-sync\",\"data\":{\"node-name\":\"ov2\",\"snapshot-file\":\"" + Path.Combine(dir, "ov3.qcow2")
            + "\",\"snapshot-node-name\":\"ov3\"}},{\"type\":\"abort\",\"data\":{}}]}");
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x72 3M 64k", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        foreach (var n in nodes.Where(n => !n!["node-name"]!.GetValue<string>().StartsWith('#')))
            log.Add($"{n!["node-name"]} drv={n["drv"]} ro={n["ro"]} depth={n["backing_file_depth"]} backing={n["backing_file"]?.GetValue<string>().Replace(dir, "DIR") ?? "-"} bitmaps={n["dirty-bitmaps"]?.ToJsonString() ?? "-"}");
        log.Add("exports on: " + string.Join(",", (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Select(e => e!["node-name"]!.GetValue<string>())));
        await qmp.ExecuteAsync("quit");
        var chain = Tools.Run("qemu-img", "info", "--backing-chain", ov2);
        log.Add("chain: " + string.Join(" <- ", chain.Stdout.Split('\n').Where(l => l.StartsWith("image: ")).Select(l => Path.GetFileName(l[7..]))));
        foreach (var (f, at) in new[] { (ov1, "2M"), (ov2, "3M"), (src.Image("src"), "2M") })
        {
            var map = Tools.Run("qemu-img", "map", "--output=json", f);
            log.Add($"{Path.GetFileName(f)} holds {at}: {map.Stdout.Contains($"\"start\": {(at == "2M" ? 2097152 : 3145728)}, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true")}");
        }
        return log;
    }

    [Fact]
    public async Task ExternalSnapshotsBehaveAsInQemuStorageDaemon()
    {
        await Differential.AssertSameAsQemu(kind => Scenario(kind));
    }
}
