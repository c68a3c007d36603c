using Tools = Strata.Interop.Tests.Infra.Tools;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>QMP block_resize against qemu-storage-daemon: the refusals in QEMU's order and words, a live disk grown
/// and shrunk under its export with dirty bitmaps following it, and the image qemu-img finds afterwards.</summary>
public class BlockResizeDifferentialTests : ScratchDirTest
{
    private async Task<List<string>> Scenario(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        string readOnlyImage = Path.Combine(dir, "ro.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", readOnlyImage, "1M").Ok();
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var t = new QmpTranscript(qmp, dir);
        await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"ro\",\"read-only\":true,\"file\":{\"driver\":\"file\",\"filename\":\"" + readOnlyImage + "\"}}");
        foreach (var args in new[]
                 {
                     "{\"node-name\":\"src\",\"size\":-1}", "{\"node-name\":\"src\",\"size\":1000}", "{\"device\":\"src\",\"size\":1048576}",
                     "{\"size\":1048576}", "{\"node-name\":\"nope\",\"size\":1048576}", "{\"node-name\":\"ro\",\"size\":2097152}",
                     "{\"node-name\":\"src-file\",\"size\":67108864}", "{\"device\":\"x\",\"node-name\":\"src\",\"size\":33554432}",
                 })
            await t.Try("block_resize", args);
        await t.Try("block-dirty-bitmap-add", "{\"node\":\"src\",\"name\":\"transient\"}");
        await t.Try("block-dirty-bitmap-add", "{\"node\":\"src\",\"name\":\"persistent\",\"persistent\":true}");
        Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x21 0 64k", $"nbd+unix:///src?socket={src.NbdPath}").Ok();
        await t.Try("block_resize", "{\"node-name\":\"src\",\"size\":50331648}");
        await Nodes(qmp, t);
        // An NBD export does not let its node change size under its clients: refused until it goes.
        await t.Try("block-export-del", "{\"id\":\"guest-src\"}");
        await t.Try("block_resize", "{\"node-name\":\"src\",\"size\":50331648}");
        await Nodes(qmp, t);
        await t.Try("block_resize", "{\"node-name\":\"src\",\"size\":8388608}");
        await Nodes(qmp, t);
        await t.Try("block_resize", "{\"node-name\":\"src\",\"size\":20971520}");
        await Nodes(qmp, t);
        await qmp.ExecuteAsync("quit");
        Assert.True(src.WaitForExit(15_000));
        t.Add("check: " + Tools.Run("qemu-img", "check", src.Image("src")).Exit);
        t.Add(Tools.Run("qemu-img", "map", "--output=json", src.Image("src")).Stdout);
        t.Add(string.Join(" ", Tools.Run("qemu-img", "info", src.Image("src")).Stdout.Split('\n').Where(l => l.Contains("virtual size") || l.Contains("name:"))));
        return t.Lines;
    }

    private static async Task Nodes(QmpClient qmp, QmpTranscript t)
    {
        foreach (var n in (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Where(n => n!["node-name"]!.GetValue<string>() == "src"))
            t.Add($"size {n!["image"]!["virtual-size"]} bitmaps " + string.Join(",", n["dirty-bitmaps"]!.AsArray()
                .Select(b => $"{b!["name"]}={b["count"]}").Order(StringComparer.Ordinal)));
    }

    [Fact]
    public async Task BlockResizeBehavesAsInQemuStorageDaemon()
    {
        await Differential.AssertSameAsQemu(Scenario);
    }
}

/// <summary>`img resize` of an image with a persistent bitmap: qemu-img 7.2 resizes the bitmap with the disk.</summary>
public class ImgResizeWithBitmapsTests : ScratchDirTest
{
    [Fact]
    public void ResizingAnImageWithAPersistentBitmapKeepsItAsQemuImgDoes()
    {
        var infos = new List<string>();
        foreach (var (tool, name) in new[] { ("qemu-img", "q.qcow2"), ("strata", "s.qcow2") })
        {
            string img = P(name);
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
            Tools.QemuImg("bitmap", "--add", img, "b0").Ok();
            Tools.Run("qemu-io", "-c", "write -P 0x5 960k 64k", img).Ok();
            foreach (var step in new[] { new[] { "3M" }, ["--shrink", "512K"], ["2M"] })
            {
                var r = tool == "qemu-img" ? Tools.QemuImg(["resize", img, .. step]) : Tools.StrataCmd(["img", "resize", img, .. step]);
                r.Ok();
            }
            Tools.AssertQemuCheckClean(img);
            infos.Add(string.Join("\n", Tools.QemuImg("info", img).Stdout.Split('\n').Where(l => l.Contains("virtual size") || l.Contains("name:") || l.Contains("granularity"))));
        }
        Assert.Equal(infos[0], infos[1]);
        Tools.AssertQemuIdentical(P("q.qcow2"), P("s.qcow2"));
    }
}
