using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup` of a raw disk with a qcow2 of metadata (data_file_raw=on): the dirty bitmap lives in the metadata
/// file, survives a restart of the daemon, drives incrementals that restore to the raw file byte for byte, and
/// qemu-storage-daemon loads the same bitmap from the same file.
/// </summary>
public class RawDiskBackupTests : ScratchDirTest
{
    private string Repo => P("repo");

    private string[] Run(BackupSourceProcess src, string mode)
    {
        var made = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--mode", mode, "--nbd", src.NbdPath, "--disk", "vda", "--json", Repo).Ok().Json();
        var point = made.EnumerateArray().Single();
        return [point.GetProperty("id").GetString()!, point.GetProperty("level").GetString()!, point.GetProperty("copied-bytes").GetInt64().ToString()];
    }

    private static async Task<(string Bitmap, long Count, string Sha)> StrataBitmap(string qmpPath, bool quit)
    {
        await using var qmp = await QmpClient.ConnectUnixAsync(qmpPath);
        var node = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Single(n => n!["node-name"]!.GetValue<string>() == "vda")!;
        var bitmap = node["dirty-bitmaps"]!.AsArray().Single()!;
        string name = bitmap["name"]!.GetValue<string>();
        string sha = (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "vda", name }))!["sha256"]!.GetValue<string>();
        var result = (name, bitmap["count"]!.GetValue<long>(), sha);
        if (quit) await qmp.ExecuteAsync("quit");
        return result;
    }

    [Theory]
    [InlineData("strata", "push")]
    [InlineData("strata", "pull")]
    [InlineData("qsd", "pull")]
    public async Task ABitmapOnARawDiskSurvivesARestartAndDrivesIncrementalsThatRestoreTheRawFile(string kind, string mode)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], rawDisks: true);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        File.Copy(src.DataFile("vda"), P("vda-0.raw"));
        var full = Run(src, mode);
        Assert.Equal("full", full[1]);

        await src.GuestWritesAsync("vda", seed: 1);
        // A clean restart: the bitmap is stored in the metadata file and loaded again.
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
            await qmp.ExecuteAsync("quit");
        Assert.True(src.WaitForExit(15000), src.Log);
        src.Start();
        await src.GuestWritesAsync("vda", seed: 2);
        File.Copy(src.DataFile("vda"), P("vda-1.raw"));
        var inc = Run(src, mode);
        Assert.Equal("inc", inc[1]);
        // What the guest wrote (2 × 24 blocks of 64 KiB), not the disk.
        Assert.InRange(long.Parse(inc[2]), 64 << 10, 4L << 20);

        Infra.RepositoryAsserts.AssertRestores(Repo, "vda", full[0], P("vda-0.raw"));
        Infra.RepositoryAsserts.AssertRestores(Repo, "vda", inc[0], P("vda-1.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        if (kind != "strata") return;
        // The bitmap strata daemon leaves in the metadata file is the one qemu-storage-daemon loads.
        await src.GuestWritesAsync("vda", seed: 3);
        var (name, count, sha) = await StrataBitmap(src.QmpPath, quit: true);
        Assert.True(src.WaitForExit(15000), src.Log);
        Assert.True(count > 0);
        Tools.AssertQemuCheckClean(src.Image("vda"));
        using var qsd = new QsdProcess(src.Image("vda"), "vda", fileNodeName: "vda-file");
        var node = qsd.Execute("query-named-block-nodes")!.AsArray().Single(n => n!["node-name"]!.GetValue<string>() == "vda")!;
        var loaded = node["dirty-bitmaps"]!.AsArray().Single()!;
        Assert.Equal(name, loaded["name"]!.GetValue<string>());
        Assert.Equal(count, loaded["count"]!.GetValue<long>());
        Assert.True(loaded["persistent"]!.GetValue<bool>());
        var qsha = qsd.Execute("x-debug-block-dirty-bitmap-sha256", new Dictionary<string, string> { ["node"] = "vda", ["name"] = name })!["sha256"]!.GetValue<string>();
        Assert.Equal(sha, qsha);
    }

    /// <summary>A mirror of a raw disk node (writes while ready mirrored too) ends with the target equal to the raw file,
    /// and the raw file still the disk.</summary>
    [Fact]
    public async Task AMirrorOfARawDiskCopiesTheRawFile()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"], rawDisks: true);
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("t.qcow2"), "32M").Ok();
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse($$$"""{"driver":"qcow2","node-name":"tgt","file":{"driver":"file","filename":"{{{P("t.qcow2")}}}"}}""")!.AsObject());
        await qmp.ExecuteAsync("blockdev-mirror", JsonNode.Parse("""{"job-id":"m","device":"vda","target":"tgt","sync":"full"}""")!.AsObject());
        await events.WaitAsync("BLOCK_JOB_READY");
        await src.GuestWritesAsync("vda", seed: 4);
        await qmp.ExecuteAsync("block-job-cancel", JsonNode.Parse("""{"device":"m"}""")!.AsObject());
        var end = await events.WaitAsync("BLOCK_JOB_COMPLETED");
        Assert.Null(end["data"]!["error"]);
        await src.CopyAsync("vda", P("disk.raw"));
        await qmp.ExecuteAsync("quit");
        Assert.True(src.WaitForExit(15000), src.Log);
        Assert.Equal(Tools.Sha256(P("disk.raw")), Tools.Sha256(src.DataFile("vda")));
        Tools.AssertQemuIdentical(src.DataFile("vda"), P("t.qcow2"), "-f", "raw", "-F", "qcow2");
        Tools.AssertQemuCheckClean(src.Image("vda"));
    }
}
