using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>Pull-mode backups: a copy-before-write filter and snapshot-access give a frozen view over NBD while
/// the guest keeps writing through the filter; pulled data is the disk at the freeze point.</summary>
public class FleecingTests : ScratchDirTest
{
    [Fact]
    public async Task SnapshotAccessExportHoldsThePointInTimeWhileWritesContinue()
    {
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("src.qcow2"), "32M").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x31 0 8M", "-c", "write -P 0x32 20M 4M", P("src.qcow2")).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", P("src.qcow2"), "b0").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "raw", P("temp.raw"), "32M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "convert", "-O", "raw", P("src.qcow2"), P("point.raw")).Exit);
        using var d = new StrataDaemonProcess(Dir, "f", [
            "--blockdev", $"driver=file,node-name=src-file,filename={P("src.qcow2")}", "--blockdev", "driver=qcow2,node-name=src,file=src-file",
            "--nbd-server", $"addr.type=unix,addr.path={P("f.nbd")}"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        async Task Ok(string cmd, string json) => await qmp.ExecuteAsync(cmd, JsonNode.Parse(json));
        await Ok("blockdev-add", $$$"""{"node-name":"tmp","driver":"file","filename":"{{{P("temp.raw")}}}"}""");
        await Ok("blockdev-add", """{"node-name":"cbw","driver":"copy-before-write","file":"src","target":"tmp"}""");
        await Ok("transaction", """{"actions":[{"type":"block-dirty-bitmap-disable","data":{"node":"src","name":"b0"}},{"type":"block-dirty-bitmap-add","data":{"node":"src","name":"b1"}}]}""");
        await Ok("block-export-add", """{"type":"nbd","id":"guest","node-name":"cbw","name":"guest","writable":true}""");
        await Ok("blockdev-add", """{"node-name":"acc","driver":"snapshot-access","file":"cbw"}""");
        await Ok("block-export-add", """{"type":"nbd","id":"fleece","node-name":"acc","name":"fleece","bitmaps":[{"node":"src","name":"b0"}]}""");

        // The guest keeps writing, over areas the client is about to pull.
        string guest = $"nbd+unix:///guest?socket={P("f.nbd")}", fleece = $"nbd+unix:///fleece?socket={P("f.nbd")}";
        var w = Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x77 1M 2M", "-c", "write -P 0x78 21M 64k", "-c", "write -z 0 512", guest);
        Assert.True(w.Exit == 0, w.Stderr);
        Assert.Equal(0, Tools.Run("nbdcopy", fleece, P("pulled.raw")).Exit);
        Assert.True(File.ReadAllBytes(P("pulled.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("point.raw"))), "the pull is the disk at the freeze point");
        // Only the overwritten clusters (about 2.1 MiB of 32 MiB) went to the sparse temp file.
        long tempAllocated = long.Parse(Tools.Run("stat", "-c", "%b", P("temp.raw")).Stdout.Trim()) * 512;
        Assert.InRange(tempAllocated, 2L << 20, 4L << 20);

        // Tear down: export, snapshot-access, writers back, filter, temp — the source keeps the new data.
        await Ok("block-export-del", """{"id":"fleece"}""");
        await Ok("blockdev-del", """{"node-name":"acc"}""");
        await Ok("block-export-del", """{"id":"guest"}""");
        await Ok("blockdev-del", """{"node-name":"cbw"}""");
        await Ok("blockdev-del", """{"node-name":"tmp"}""");
        var names = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).Order().ToArray();
        Assert.Equal(["src", "src-file"], names);
        var bitmaps = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().First(n => n!["node-name"]!.GetValue<string>() == "src")!["dirty-bitmaps"]!.AsArray();
        Assert.Equal((2L << 20) + 65536 + 65536, bitmaps.First(b => b!["name"]!.GetValue<string>() == "b1")!["count"]!.GetValue<long>());
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, d.WaitForExit());
        Assert.Equal(0, Tools.Run("qemu-img", "check", P("src.qcow2")).Exit);
        var read = Tools.Run("qemu-io", "-c", "read -P 0x77 1M 2M", "-c", "read -P 0x78 21M 64k", P("src.qcow2"));
        Assert.DoesNotContain("fail", read.Stdout, StringComparison.OrdinalIgnoreCase);
    }
}
