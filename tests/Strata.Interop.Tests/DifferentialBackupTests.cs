using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Strata.Interop.Tests;

/// <summary>
/// A source killed with SIGKILL loses the bitmap the last point started (QEMU's rule, and Strata's today): the next
/// `strata backup run` compares the disk with that point instead of taking a blind full, copies only what differs,
/// says so, and the chain goes on with bitmaps afterwards. The comparison is against the granule digests the last
/// point recorded, so the backup is not read back; a point from before digests is read back, and the run says so.
/// </summary>
public class DifferentialBackupTests : ScratchDirTest
{
    private string Repo => P("repo");

    private JsonElement Run(BackupSourceProcess src, params string[] more) =>
        Tools.StrataCmd(["backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", .. more, Repo]).Ok().Json()[0];

    private void AssertRestores(JsonElement point, string copy) =>
        Infra.RepositoryAsserts.AssertRestores(Repo, "vda", point.GetProperty("id").GetString()!, copy);

    /// <summary>A 64 MiB source. strata daemon keeps its bitmaps across a kill (CrashSafeTrackingTests); without that
    /// tracking it loses them as QEMU does, which is the case for a differential.</summary>
    private BackupSourceProcess Source(string kind) =>
        new(kind, Dir, ["vda"], size: "64M", daemonOptions: kind == "strata" ? ["--crash-safe-bitmaps=off"] : null);

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task AfterAKilledSourceTheNextRunComparesInsteadOfCopyingEverything(string kind)
    {
        using var src = Source(kind);
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
        Assert.DoesNotContain("read back", diff.GetProperty("note").GetString());
        Assert.Equal(full.GetProperty("id").GetString(), diff.GetProperty("parent").GetString());
        // What the guest wrote (at most 24 blocks of 64 KiB), not the 7 MiB of data the disk holds.
        Assert.InRange(diff.GetProperty("copied-bytes").GetInt64(), 1, 24 * 65536);
        Assert.Equal(ChangedDataBytes(PointZero(), P("1.raw")), diff.GetProperty("copied-bytes").GetInt64());
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

    /// <summary>The bytes of the 64 KiB granules that differ between two raw copies and hold data in the second: what
    /// a differential from the first to the second writes as data (the rest it writes as zeros).</summary>
    private static long ChangedDataBytes(string before, string after)
    {
        byte[] a = File.ReadAllBytes(before), b = File.ReadAllBytes(after);
        long changed = 0;
        for (int at = 0; at < b.Length; at += 65536)
        {
            var now = b.AsSpan(at, Math.Min(65536, b.Length - at));
            if (!now.SequenceEqual(a.AsSpan(at, now.Length)) && now.IndexOfAnyExcept((byte)0) >= 0) changed += now.Length;
        }
        return changed;
    }

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task ADifferentialComparesWithTheLastPointsDigestsAndNeverOpensItsFiles(string kind)
    {
        using var src = Source(kind);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        Run(src);
        await src.GuestWritesAsync("vda", seed: 11);
        await src.CopyAsync("vda", P("1.raw"));
        var inc = Run(src);
        Assert.Equal("inc", inc.GetProperty("level").GetString());
        await src.GuestWritesAsync("vda", seed: 12, blocks: 40);
        await src.CopyAsync("vda", P("2.raw"));
        src.Kill();
        src.Start();

        // Every backup file of the chain becomes an empty file: a run that opened one would fail. (Not chmod 000:
        // the tests run as root, whom a mode does not stop.)
        var chain = Directory.EnumerateFiles(Path.Combine(Repo, "vda"), "*.qcow2").ToList();
        Assert.Equal(2, chain.Count);
        foreach (var f in chain)
        {
            File.Move(f, f + ".aside");
            File.WriteAllBytes(f, []);
        }
        var diff = Run(src, "--nbd", src.NbdPath);
        foreach (var f in chain) File.Move(f + ".aside", f, overwrite: true);

        Assert.Equal("inc", diff.GetProperty("level").GetString());
        Assert.Equal(inc.GetProperty("id").GetString(), diff.GetProperty("parent").GetString());
        Assert.StartsWith("differential by comparison because bitmap", diff.GetProperty("note").GetString());
        Assert.DoesNotContain("read back", diff.GetProperty("note").GetString());
        // Exactly the granules the guest changed since the incremental.
        long changed = ChangedDataBytes(P("1.raw"), P("2.raw"));
        Assert.InRange(changed, 65536, 40 * 65536);
        Assert.Equal(changed, diff.GetProperty("copied-bytes").GetInt64());
        AssertRestores(diff, P("2.raw"));
        AssertRestores(inc, P("1.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
        foreach (var f in chain) Tools.AssertQemuCheckClean(f);
    }

    /// <summary>Makes the point look as a version before digests left it: no digests file, none in the manifest.</summary>
    private void ForgetDigests(JsonElement point)
    {
        string id = point.GetProperty("id").GetString()!;
        string manifest = Path.Combine(Repo, "vda", id + ".json");
        var json = JsonNode.Parse(File.ReadAllText(manifest))!.AsObject();
        Assert.True(json.Remove("digests"));
        File.WriteAllText(manifest, json.ToJsonString());
        File.Delete(Path.Combine(Repo, "vda", id + ".digests"));
    }

    [Fact]
    public async Task ALastPointWithoutDigestsIsReadBackToCompareAndTheRunSaysSo()
    {
        using var src = Source("strata");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var full = Run(src);
        ForgetDigests(full);
        await src.GuestWritesAsync("vda", seed: 21);
        await src.CopyAsync("vda", P("1.raw"));
        src.Kill();
        src.Start();

        var run = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--nbd", src.NbdPath, Repo).Ok();
        Assert.Contains("differential by comparison because bitmap", run.Stdout);
        Assert.Contains("the last point has no digests (taken before they were recorded), so it was read back to compare", run.Stdout);
        var diff = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json()[1];
        Assert.Equal(full.GetProperty("id").GetString(), diff.GetProperty("parent").GetString());
        Assert.Contains("so it was read back to compare", diff.GetProperty("note").GetString());
        Assert.Equal(ChangedDataBytes(PointZero(), P("1.raw")), diff.GetProperty("copied-bytes").GetInt64());
        // The differential read the whole disk, so its point has digests again, and the chain carries them on.
        AssertRestores(diff, P("1.raw"));
        await src.GuestWritesAsync("vda", seed: 22);
        await src.CopyAsync("vda", P("2.raw"));
        var next = Run(src);
        Assert.Equal("inc", next.GetProperty("level").GetString());
        AssertRestores(next, P("2.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    [Fact]
    public async Task VerifyReportsADamagedDigestsFileAndADifferentialDoesNotTrustIt()
    {
        using var src = Source("strata");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var full = Run(src);
        string id = full.GetProperty("id").GetString()!;
        string digests = Path.Combine(Repo, "vda", id + ".digests");
        var bytes = File.ReadAllBytes(digests);
        bytes[bytes.Length / 2] ^= 0x01;
        File.WriteAllBytes(digests, bytes);

        var verify = Tools.StrataCmd("backup", "verify", Repo);
        Assert.Equal(1, verify.Exit);
        Assert.Contains($"PROBLEM vda@{id}: its digests file {id}.digests does not match its SHA-256", verify.Stdout);
        Assert.Contains("1 problem(s) in 1 point(s)", verify.Stdout);

        await src.GuestWritesAsync("vda", seed: 31);
        await src.CopyAsync("vda", P("1.raw"));
        src.Kill();
        src.Start();
        var diff = Run(src, "--nbd", src.NbdPath);
        Assert.Contains($"the last point's digests file {id}.digests does not match its SHA-256", diff.GetProperty("note").GetString());
        Assert.Contains("so it was read back to compare", diff.GetProperty("note").GetString());
        Assert.Equal(ChangedDataBytes(PointZero(), P("1.raw")), diff.GetProperty("copied-bytes").GetInt64());
        AssertRestores(diff, P("1.raw"));
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
