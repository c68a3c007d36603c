using Tools = Strata.Interop.Tests.Infra.Tools;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup run --image`: a disk that no daemon serves is backed up from its persistent bitmaps, continuing
/// the chain its online runs made; a disk a running daemon holds is refused.
/// </summary>
public class OfflineBackupTests : ScratchDirTest
{
    private string Repo => P("repo");

    private System.Text.Json.JsonElement RunOnline(BackupSourceProcess src) =>
        Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", Repo).Ok().Json()[0];

    private System.Text.Json.JsonElement RunOffline(string image) =>
        Tools.StrataCmd("backup", "run", "--image", image, "--disk", "vda", "--json", Repo).Ok().Json()[0];

    private static async Task QuitAsync(BackupSourceProcess src)
    {
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
            await qmp.ExecuteAsync("quit");
        Assert.True(src.WaitForExit(15000), "the daemon did not quit");
    }

    private void AssertRestores(string id, string copy) => Infra.RepositoryAsserts.AssertRestores(Repo, "vda", id, copy);

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task OnlineOfflineOnlineIsOneChainAndEveryPointRestores(string kind)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["vda"]);
        string image = src.Image("vda");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        await src.CopyAsync("vda", P("0.raw"));
        var full = RunOnline(src);
        Assert.Equal("full", full.GetProperty("level").GetString());
        await src.GuestWritesAsync("vda", seed: 1);
        await QuitAsync(src);

        // The VM is off: its disk is written by qemu-io (QEMU records the writes in the enabled persistent bitmap).
        Tools.QemuIo(image, ["write -P 0x61 1M 64k", "write -z 12M 128k", "write -P 0x62 31M 4k"]);
        Tools.QemuImg("convert", "-O", "raw", image, P("1.raw")).Ok();
        var offline = RunOffline(image);
        Assert.Equal("inc", offline.GetProperty("level").GetString());
        Assert.Equal(full.GetProperty("id").GetString(), offline.GetProperty("parent").GetString());
        // The online writes (24 blocks and a zeroed one) and the three offline ones, not the disk.
        Assert.InRange(offline.GetProperty("copied-bytes").GetInt64(), 4 * 65536, 2L << 20);
        Tools.AssertQemuCheckClean(image);

        src.Start();
        await src.GuestWritesAsync("vda", seed: 2);
        await src.CopyAsync("vda", P("2.raw"));
        var online = RunOnline(src);
        Assert.Equal("inc", online.GetProperty("level").GetString());
        Assert.Equal(offline.GetProperty("id").GetString(), online.GetProperty("parent").GetString());

        AssertRestores(full.GetProperty("id").GetString()!, P("0.raw"));
        AssertRestores(offline.GetProperty("id").GetString()!, P("1.raw"));
        AssertRestores(online.GetProperty("id").GetString()!, P("2.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    [Fact]
    public void ADiskARunningDaemonHoldsIsRefused()
    {
        using var src = new BackupSourceProcess("qsd", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();

        var refused = Tools.StrataCmd("backup", "run", "--image", src.Image("vda"), "--disk", "vda", Repo);

        Assert.Equal(4, refused.Exit);
        Assert.Contains("lock", refused.Stderr);
        Assert.Contains("use --socket", refused.Stderr);
        Assert.Empty(Directory.EnumerateFiles(Repo, "*.qcow2", SearchOption.AllDirectories));
    }

    [Fact]
    public void ASourceIsNamedOnceEitherWay()
    {
        Tools.StrataCmd("backup", "init", Repo).Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("d.qcow2"), "1M").Ok();
        var both = Tools.StrataCmd("backup", "run", "--socket", P("none.sock"), "--image", P("d.qcow2"), "--disk", "vda", Repo);
        Assert.Equal(2, both.Exit);
        var neither = Tools.StrataCmd("backup", "run", "--disk", "vda", Repo);
        Assert.Equal(2, neither.Exit);
        var unpaired = Tools.StrataCmd("backup", "run", "--image", P("d.qcow2"), "--disk", "vda", "--disk", "vdb", Repo);
        Assert.Equal(2, unpaired.Exit);
        Assert.Contains("one --disk per --image", unpaired.Stderr);
    }
}
