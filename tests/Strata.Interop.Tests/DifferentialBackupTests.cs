using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json;

namespace Strata.Interop.Tests;

/// <summary>
/// A source killed with SIGKILL loses the bitmap the last point started (QEMU's rule, and Strata's today): the next
/// `strata backup run` compares the disk with that point instead of taking a blind full, copies only what differs,
/// says so, and the chain goes on with bitmaps afterwards.
/// </summary>
public class DifferentialBackupTests : ScratchDirTest
{
    private string Repo => P("repo");

    private JsonElement Run(BackupSourceProcess src, params string[] more) =>
        Tools.StrataCmd(["backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", .. more, Repo]).Ok().Json()[0];

    private void AssertRestores(JsonElement point, string copy) =>
        Infra.RepositoryAsserts.AssertRestores(Repo, "vda", point.GetProperty("id").GetString()!, copy);

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task AfterAKilledSourceTheNextRunComparesInsteadOfCopyingEverything(string kind)
    {
        // strata daemon keeps its bitmaps across a kill (CrashSafeTrackingTests); without that tracking it loses them
        // as QEMU does, which is the case for a differential.
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], size: "64M", daemonOptions: kind == "strata" ? ["--crash-safe-bitmaps=off"] : null);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var full = Run(src);
        Assert.Equal("full", full.GetProperty("level").GetString());
        await src.GuestWritesAsync("vda", seed: 7);
        await src.CopyAsync("vda", P("1.raw"));
        src.Kill();
        src.Start();

        // Without a bitmap the run must read the disk: it pulls, here through the NBD server the source runs.
        var refused = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", Repo);
        Assert.Equal(4, refused.Exit);
        Assert.Contains("differential by comparison reads the disk over NBD", refused.Stderr);
        var diff = Run(src, "--nbd", src.NbdPath);

        Assert.Equal("inc", diff.GetProperty("level").GetString());
        Assert.Equal("pull", diff.GetProperty("mode").GetString());
        Assert.Contains("differential by comparison because bitmap", diff.GetProperty("note").GetString());
        Assert.Equal(full.GetProperty("id").GetString(), diff.GetProperty("parent").GetString());
        // What the guest wrote (at most 24 blocks of 64 KiB), not the 7 MiB of data the disk holds.
        Assert.InRange(diff.GetProperty("copied-bytes").GetInt64(), 1, 24 * 65536);
        AssertRestores(diff, P("1.raw"));

        // The chain goes on with the bitmap the differential started.
        await src.GuestWritesAsync("vda", seed: 8);
        await src.CopyAsync("vda", P("2.raw"));
        var next = Run(src);
        Assert.Equal("inc", next.GetProperty("level").GetString());
        Assert.False(next.TryGetProperty("note", out _));
        AssertRestores(next, P("2.raw"));
        AssertRestores(full, PointZero());
        Tools.StrataCmd("backup", "verify", Repo).Ok();
        foreach (var f in Directory.EnumerateFiles(Repo, "*.qcow2", SearchOption.AllDirectories)) Tools.AssertQemuCheckClean(f);
    }

    /// <summary>The disk as it was when the test's source was created (the full's content).</summary>
    private string PointZero()
    {
        // The source's images start with 4 MiB of 0x11 at 0 and 3 MiB of 0x12 at 12 MiB (BackupSourceProcess).
        var bytes = new byte[64 << 20];
        bytes.AsSpan(0, 4 << 20).Fill(0x11);
        bytes.AsSpan(12 << 20, 3 << 20).Fill(0x12);
        File.WriteAllBytes(P("0.raw"), bytes);
        return P("0.raw");
    }

    [Fact]
    public void LevelFullStillTakesAFull()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        Run(src);
        src.Kill();
        src.Start();
        var full = Run(src, "--level", "full");
        Assert.Equal("full", full.GetProperty("level").GetString());
        Assert.False(full.TryGetProperty("parent", out _));
    }
}
