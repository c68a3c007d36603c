using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// What a running backup looks like from QMP, against qemu-storage-daemon: the copy-before-write filter node
/// above the source (named by filter-node-name or automatically), the anonymous bitmaps QEMU 7.2 lists (the
/// successor and the job's copy map on the source, the filter's access and done maps), the job's progress under
/// a speed limit, and all of it gone once the job completes.
/// </summary>
public class BackupGraphDifferentialTests : ScratchDirTest
{
    private static string Nodes(JsonArray nodes, string dir) =>
        string.Join("\n", nodes.Select(n =>
        {
            var image = n!["image"]!.AsObject();
            string bitmaps = n["dirty-bitmaps"]?.ToJsonString() ?? "-";
            return $"{n["node-name"]} drv={n["drv"]} file={n["file"]} depth={n["backing_file_depth"]} image=[{string.Join(",", image.Select(p => p.Key))}] " +
                   $"backing-image={image["backing-image"]?["format"]} bitmaps={bitmaps}";
        })).Replace(dir, "DIR");

    private static string Normalise(string s) => Regex.Replace(s, "#block[0-9]+", "#blockN");

    private async Task<List<string>> Scenario(string kind, string sync, string? filterName)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"], size: "64M");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "t.qcow2"), "64M").Exit);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        var log = new List<string>();
        await qmp.ExecuteAsync("block-dirty-bitmap-add", JsonNode.Parse("""{"node":"src","name":"b0"}"""));
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 1 0 4M", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"qcow2\",\"node-name\":\"tgt\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/t.qcow2\"}}"));
        var backup = new JsonObject { ["job-id"] = "j", ["device"] = "src", ["target"] = "tgt", ["sync"] = sync, ["speed"] = 1 };
        if (sync == "incremental") backup["bitmap"] = "b0";
        if (filterName is not null) backup["filter-node-name"] = filterName;
        await qmp.ExecuteAsync("blockdev-backup", backup);
        // The first 1 MiB chunk goes at once; the limit holds the rest.
        for (int i = 0; i < 100; i++)
        {
            var j = (await qmp.ExecuteAsync("query-block-jobs"))!.AsArray()[0]!;
            if (j["offset"]!.GetValue<long>() > 0 && !j["busy"]!.GetValue<bool>()) break;
            await Task.Delay(20);
        }
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 2 32M 64k", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        log.Add(Normalise(Nodes((await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray(), dir)));
        var job = (await qmp.ExecuteAsync("query-block-jobs"))!.AsArray()[0]!;
        log.Add($"job: len={job["len"]} offset={job["offset"]} busy={job["busy"]} status={job["status"]} speed={job["speed"]}");
        if (filterName is not null)
        {
            try { await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"null-co\",\"node-name\":\"" + filterName + "\"}")); log.Add("duplicate name: ok"); }
            catch (QmpException e) { log.Add($"duplicate name: {e.ErrorClass}: {e.Message}"); }
        }
        await qmp.ExecuteAsync("block-job-set-speed", JsonNode.Parse("""{"device":"j","speed":0}"""));
        Assert.Null((await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]);
        log.Add(Normalise(Nodes((await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray(), dir)));
        await qmp.ExecuteAsync("quit");
        return log;
    }

    [Theory]
    [InlineData("incremental", "flt")]
    [InlineData("full", null)]
    public async Task ARunningBackupShowsItsFilterAndBitmapsAsInQemuStorageDaemon(string sync, string? filterName)
    {
        await Differential.AssertSameAsQemu(kind => Scenario(kind, sync, filterName));
    }
}
