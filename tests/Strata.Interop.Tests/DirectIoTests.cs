using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>cache.direct=on (O_DIRECT) nodes: a backup target written that way is a clean qcow2 identical to its
/// source, and the nodes report their cache modes as qemu-storage-daemon's do.</summary>
public class DirectIoTests : ScratchDirTest
{
    private async Task<List<string>> Run(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 9M", "-c", "write -P 0x3d 20M 513", $"nbd+unix:///src?socket={src.NbdPath}").Exit);
        string target = Path.Combine(dir, "t.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", target, "32M").Exit);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"file\",\"node-name\":\"tf\",\"filename\":\"" + target + "\",\"cache\":{\"direct\":true,\"no-flush\":false}}"));
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("""{"driver":"qcow2","node-name":"tgt","file":"tf"}"""));
        var events = new EventLog(qmp);
        await qmp.ExecuteAsync("blockdev-backup", JsonNode.Parse("""{"job-id":"j","device":"src","target":"tgt","sync":"full"}"""));
        Assert.Null((await events.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]);
        var caches = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray()
            .Select(n => $"{n!["node-name"]}: {n["cache"]!.ToJsonString()}").Order().ToList();
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"tgt"}"""));
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"tf"}"""));
        await src.CopyAsync("src", Path.Combine(dir, "src.raw"));
        await qmp.ExecuteAsync("quit");
        var check = Tools.Run("qemu-img", "check", target);
        Assert.True(check.Exit == 0, check.Stdout + check.Stderr);
        var cmp = Tools.Run("qemu-img", "compare", "-F", "raw", target, Path.Combine(dir, "src.raw"));
        Assert.True(cmp.Exit == 0, cmp.Stdout + cmp.Stderr);
        return caches;
    }

    /// <summary>Every node's cache modes, named by driver and file (auto-generated node names differ between the two).</summary>
    private async Task<List<string>> CachesOfInlineChildren(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        foreach (string name in new[] { "inherits", "overrides", "direct" })
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, name + ".qcow2"), "1M").Exit);
        const string OwnNoFlushOff = ",\"cache\":{\"no-flush\":false}";
        string File(string name, string cache = "") => $$"""{"driver":"file","filename":"{{Path.Combine(dir, name + ".qcow2")}}"{{cache}}}""";
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"qcow2","node-name":"inherits","cache":{"no-flush":true},"file":{{File("inherits")}}}"""));
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"qcow2","node-name":"overrides","cache":{"no-flush":true},"file":{{File("overrides", OwnNoFlushOff)}}}"""));
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"qcow2","node-name":"direct","cache":{"direct":true},"file":{{File("direct")}}}"""));
        var caches = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray()
            .Where(n => n!["file"]!.GetValue<string>().StartsWith(dir, StringComparison.Ordinal))
            .Select(n => $"{n!["drv"]} {Path.GetFileName(n["file"]!.GetValue<string>())}: {n["cache"]!.ToJsonString()}").Order().ToList();
        foreach (string name in new[] { "inherits", "overrides", "direct" })
            await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse($$"""{"node-name":"{{name}}"}"""));
        await qmp.ExecuteAsync("quit");
        return caches;
    }

    [Fact]
    public async Task AnInlineFileTakesItsParentsCacheModesUnlessItSetsItsOwnAsInQemuStorageDaemon()
    {
        var qemu = await CachesOfInlineChildren("qsd");
        var strata = await CachesOfInlineChildren("strata");
        Assert.Contains(strata, l => l.StartsWith("file inherits.qcow2: ") && l.Contains("\"no-flush\":true"));
        Assert.Contains(strata, l => l.StartsWith("file overrides.qcow2: ") && l.Contains("\"no-flush\":false"));
        Assert.Contains(strata, l => l.StartsWith("file direct.qcow2: ") && l.Contains("\"direct\":true"));
        Assert.Equal(qemu, strata);
    }

    [Fact]
    public async Task ABackupOntoAnODirectTargetIsCorrectAndReportedAsInQemuStorageDaemon()
    {
        var qemu = await Run("qsd");
        var strata = await Run("strata");
        Assert.Contains(strata, l => l.StartsWith("tf: ") && l.Contains("\"direct\":true"));
        Assert.Equal(qemu, strata);
    }
}
