using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// The bitmap-mode table of a backup (qemu-spec §3.4) checked against qemu-storage-daemon itself: the same image,
/// writes, backup and outcome on both daemons must leave the bitmap with the same sha256 and count. Outcomes whose
/// result depends on how far the job got (always + failure) are left to the conformance harness's range checks.
/// </summary>
public class BitmapModeDifferentialTests : ScratchDirTest
{
    public static TheoryData<string, string, bool> Cases => new()
    {
        { "bitmap", "on-success", false }, { "bitmap", "always", false }, { "bitmap", "never", false },
        { "full", "on-success", false }, { "full", "always", false }, { "top", "on-success", false }, { "top", "always", false },
        { "bitmap", "on-success", true }, { "bitmap", "never", true }, { "full", "on-success", true }, { "top", "on-success", true },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task BitmapAfterTheJobEqualsQemus(string sync, string mode, bool failTarget)
    {
        string qemu = await Run("q", sync, mode, failTarget, strata: false);
        string strata = await Run("s", sync, mode, failTarget, strata: true);
        Assert.Equal(qemu, strata);
    }

    private async Task<string> Run(string tag, string sync, string mode, bool failTarget, bool strata)
    {
        string src = P($"{tag}-src.qcow2"), dst = P($"{tag}-dst.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", src, "32M").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x12 10M 1M", src).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", dst, "32M").Exit);
        string nbd = P($"{tag}.nbd");
        IDisposable daemon;
        string qmpPath;
        if (strata)
        {
            var d = new StrataDaemonProcess(Dir, tag, [
                "--blockdev", $"driver=file,node-name=drive0-file,filename={src}", "--blockdev", "driver=qcow2,node-name=drive0,file=drive0-file",
                "--nbd-server", $"addr.type=unix,addr.path={nbd}", "--export", "type=nbd,id=exp0,node-name=drive0,name=drive0,writable=on"]);
            daemon = d;
            qmpPath = d.QmpPath;
        }
        else
        {
            var q = new QsdProcess(src, "drive0", nbdSocket: nbd, connect: false);
            daemon = q;
            qmpPath = q.QmpPath;
        }
        using (daemon)
        {
            await using var qmp = await QmpClient.ConnectUnixAsync(qmpPath);
            var events = new EventLog(qmp);
            await qmp.ExecuteAsync("block-dirty-bitmap-add", new Dictionary<string, object> { ["node"] = "drive0", ["name"] = "b0", ["granularity"] = 65536 });
            Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x21 1M 64k", "-c", "write -P 0x22 20M 300k", $"nbd+unix:///drive0?socket={nbd}").Exit);
            string file = failTarget
                ? $$$"""{"driver":"blkdebug","image":{"driver":"file","filename":"{{{dst}}}"},"inject-error":[{"event":"write_aio","errno":5,"once":true}]}"""
                : $$$"""{"driver":"file","filename":"{{{dst}}}"}""";
            await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""{"driver":"qcow2","node-name":"target","file":{{{file}}}}"""));
            var args = new Dictionary<string, object> { ["job-id"] = "j", ["device"] = "drive0", ["target"] = "target", ["sync"] = sync, ["bitmap"] = "b0", ["bitmap-mode"] = mode };
            await qmp.ExecuteAsync("blockdev-backup", args);
            await JobWaits.UntilNoJobs(events);
            Assert.Empty((await qmp.ExecuteAsync("query-jobs"))!.AsArray());
            string sha = (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name = "b0" }))!["sha256"]!.GetValue<string>();
            var b0 = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().First(n => n!["node-name"]!.GetValue<string>() == "drive0")!["dirty-bitmaps"]!.AsArray()
                .First(b => b!["name"]?.GetValue<string>() == "b0")!;
            await qmp.ExecuteAsync("quit");
            return $"sha256={sha} count={b0["count"]} busy={b0["busy"]} recording={b0["recording"]}";
        }
    }
}
