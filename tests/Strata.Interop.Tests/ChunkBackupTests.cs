using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Strata.Backup.Chunks;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup run` into a chunk repository, end to end: a real source (strata daemon or qemu-storage-daemon)
/// backed up into a folder or into a bucket on the project's own radosgw, every point restored and compared with a
/// copy of the disk taken at that point, dedup, integrity, encryption and GC racing a backup.
/// </summary>
[Collection(Infra.CephCollection.Name)]
public class ChunkBackupTests(Infra.CephCluster ceph) : ScratchDirTest
{
    /// <summary>Small chunks keep the disks of the tests small while still spanning many chunks.</summary>
    private const int ChunkSize = 1 << 20;

    /// <summary>A chunk repository under test: its address for the CLI, the options every command takes, and the store
    /// itself for looking at (and tampering with) its objects.</summary>
    private sealed record Target(string Address, string[] Options, IObjectStore Store) : IDisposable
    {
        public void Dispose() => Store.Dispose();
    }

    private Target NewTarget(string where)
    {
        if (where == "folder") return new Target(P("repo"), [], new FolderObjectStore(P("repo")));
        string bucket = ceph.NewBucket("chunks");
        return new Target(Infra.CephCluster.RepoUrl(bucket, "repo"), ["--endpoint", ceph.Endpoint], ceph.OpenStore(bucket, "repo"));
    }

    private static Infra.ToolResult Strata(Target t, string command, params string[] args) =>
        Tools.StrataCmd(["backup", command, .. t.Options, .. args, t.Address]);

    private static JsonElement RunBackup(Target t, BackupSourceProcess src, params string[] more) =>
        Strata(t, "run", ["--socket", src.QmpPath, "--nbd", src.NbdPath, "--json", .. more]).Ok().Json();

    private void AssertRestores(Target t, string disk, string id, string copy)
    {
        string to = P($"restored-{disk}-{id}.raw");
        Strata(t, "restore", "--at", id, "--disk", disk, "--to", to).Ok();
        Assert.True(File.ReadAllBytes(to).AsSpan().SequenceEqual(File.ReadAllBytes(copy)), $"{disk}@{id} does not restore to the disk as it was");
        File.Delete(to);
    }

    /// <summary>`strata backup COMMAND …` as a process of its own, its output read by the test.</summary>
    private static Process StartStrata(Target t, string command, params string[] args)
    {
        var psi = Tools.StrataStartInfo(["backup", command, .. t.Options, .. args, t.Address]);
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        return Process.Start(psi)!;
    }

    private static IReadOnlyList<StoredObject> Objects(Target t, string prefix) =>
        t.Store.ListAsync(prefix).ToBlockingEnumerable().ToList();

    [Theory]
    [InlineData("s3", "strata")]
    [InlineData("s3", "qsd")]
    [InlineData("folder", "strata")]
    public async Task FullAndIncrementalsOfTwoDisksRestoreEveryPointAndServe(string where, string kind)
    {
        using var t = NewTarget(where);
        string[] disks = ["vda", "vdb"];
        using var src = new BackupSourceProcess(kind, Dir, disks);
        Strata(t, "init", "--chunks", "--chunk-size", "1M").Ok();
        var points = new List<string>();
        for (int round = 0; round < 4; round++)
        {
            if (round > 0)
                foreach (var (d, i) in disks.Select((d, i) => (d, i))) await src.GuestWritesAsync(d, seed: round * 10 + i, blocks: 6);
            foreach (var d in disks) await src.CopyAsync(d, P($"{d}-{round}.raw"));
            var made = RunBackup(t, src, "--disk", "vda", "--disk", "vdb").EnumerateArray().ToArray();
            Assert.Equal(2, made.Length);
            Assert.Equal(made[0].GetProperty("id").GetString(), made[1].GetProperty("id").GetString());
            foreach (var m in made)
            {
                Assert.Equal(round == 0 ? "full" : "inc", m.GetProperty("level").GetString());
                // An incremental reads the chunks the guest's 7 writes touched (at most 7 MiB), not the 32 MiB disk.
                if (round > 0) Assert.InRange(m.GetProperty("copied-bytes").GetInt64(), 1, 7L * ChunkSize);
            }
            points.Add(made[0].GetProperty("id").GetString()!);
        }
        for (int round = 0; round < 4; round++)
            foreach (var d in disks) AssertRestores(t, d, points[round], P($"{d}-{round}.raw"));
        Strata(t, "verify").Ok();
        Assert.Equal(8, Strata(t, "list", "--json").Ok().Json().GetArrayLength());

        // A point served read-only over NBD reads back identical through nbdcopy.
        string sock = P("serve.sock");
        using var serve = StartStrata(t, "serve", "--at", points[1], "--disk", "vdb", "--socket", sock);
        try
        {
            string line = serve.StandardOutput.ReadLine() ?? serve.StandardError.ReadToEnd();
            Assert.Contains($"serving vdb@{points[1]}", line);
            Assert.Equal(0, Tools.Run("nbdcopy", $"nbd+unix:///vdb?socket={sock}", P("served.raw")).Exit);
            Assert.True(File.ReadAllBytes(P("served.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("vdb-1.raw"))));
        }
        finally
        {
            serve.Kill();
            serve.WaitForExit();
        }
    }

    [Fact]
    public async Task ACloneAddsAlmostNoChunksAndIncrementalsCostWhatChanged()
    {
        using var t = NewTarget("s3");
        using var src = new BackupSourceProcess("strata", Dir, ["vda", "vdb"], size: "64M");
        // vdb is a clone of vda: the same 40 MiB of incompressible data at the same offsets.
        var data = new byte[40 << 20];
        new Random(7).NextBytes(data);
        foreach (var d in new[] { "vda", "vdb" })
        {
            await using var nbd = await src.ConnectAsync(d);
            for (int at = 0; at < data.Length; at += 4 << 20) await nbd.WriteAsync(at, data.AsMemory(at, 4 << 20));
            await nbd.FlushAsync();
        }
        Strata(t, "init", "--chunks", "--chunk-size", "1M").Ok();
        var full = RunBackup(t, src, "--disk", "vda", "--disk", "vdb").EnumerateArray().ToDictionary(m => m.GetProperty("disk").GetString()!);
        long uploadedA = full["vda"].GetProperty("uploaded-bytes").GetInt64(), uploadedB = full["vdb"].GetProperty("uploaded-bytes").GetInt64();
        long afterFull = Objects(t, "chunks/").Sum(o => o.Size);
        // Between them the two disks uploaded the data once (a chunk both read at the same moment may go up twice).
        Assert.InRange(afterFull, 40L << 20, (40L << 20) + (2L << 20));
        Assert.InRange(uploadedA + uploadedB, 40L << 20, (40L << 20) + 8L * ChunkSize);

        // Five incrementals of 1 % of vda each (640 KiB inside one chunk): the repository grows by about what changed.
        var rng = new Random(9);
        long changed = 0;
        for (int i = 0; i < 5; i++)
        {
            var block = new byte[640 << 10];
            rng.NextBytes(block);
            await using (var nbd = await src.ConnectAsync("vda"))
            {
                await nbd.WriteAsync((long)rng.Next(0, 40) * ChunkSize + 4096, block);
                await nbd.FlushAsync();
            }
            changed += ChunkSize; // the chunk holding it, as the repository stores whole chunks
            var inc = RunBackup(t, src, "--disk", "vda").EnumerateArray().Single();
            Assert.Equal("inc", inc.GetProperty("level").GetString());
            Assert.Equal(ChunkSize, inc.GetProperty("copied-bytes").GetInt64());
        }
        long growth = Objects(t, "chunks/").Sum(o => o.Size) - afterFull;
        Assert.InRange(growth, changed * 97 / 100, changed * 103 / 100);
        await src.CopyAsync("vda", P("vda-now.raw"));
        var latest = Strata(t, "list", "--json").Ok().Json().EnumerateArray().Last(p => p.GetProperty("disk").GetString() == "vda");
        AssertRestores(t, "vda", latest.GetProperty("id").GetString()!, P("vda-now.raw"));
    }

    [Fact]
    public async Task AFlippedByteInAChunkFailsVerifyAndTheRestoreOfItsPointsOnly()
    {
        using var t = NewTarget("s3");
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Strata(t, "init", "--chunks", "--chunk-size", "1M").Ok();
        await src.CopyAsync("vda", P("p0.raw"));
        string p0 = RunBackup(t, src, "--disk", "vda").EnumerateArray().Single().GetProperty("id").GetString()!;
        var before = Objects(t, "chunks/").Select(o => o.Key).ToHashSet();
        // A write into an empty part of the disk: the next point has one chunk the first does not use.
        await using (var nbd = await src.ConnectAsync("vda"))
        {
            await nbd.WriteAsync(20L << 20, Enumerable.Repeat((byte)0x5a, 65536).ToArray());
            await nbd.FlushAsync();
        }
        await src.CopyAsync("vda", P("p1.raw"));
        string p1 = RunBackup(t, src, "--disk", "vda").EnumerateArray().Single().GetProperty("id").GetString()!;
        string onlyP1 = Objects(t, "chunks/").Select(o => o.Key).Single(k => !before.Contains(k));

        // A raw PUT of the same object with one byte flipped, behind the repository's back.
        byte[] blob = (await t.Store.GetAsync(onlyP1))!;
        blob[blob.Length / 2] ^= 0x01;
        await t.Store.PutAsync(onlyP1, blob);

        var verify = Strata(t, "verify");
        Assert.Equal(1, verify.Exit);
        string chunkId = onlyP1[(onlyP1.LastIndexOf('/') + 1)..];
        Assert.Contains(p1, verify.Stdout + verify.Stderr);
        Assert.Contains(chunkId, verify.Stdout + verify.Stderr);
        Assert.DoesNotContain(p0 + ":", verify.Stdout + verify.Stderr);
        var restore = Strata(t, "restore", "--at", p1, "--disk", "vda", "--to", P("bad.raw"));
        Assert.NotEqual(0, restore.Exit);
        Assert.Contains(chunkId, restore.Stderr);
        AssertRestores(t, "vda", p0, P("p0.raw"));
    }

    [Fact]
    public async Task AnEncryptedBucketHoldsNoPlaintextAndRefusesAWrongPassphrase()
    {
        using var t = NewTarget("s3");
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        // A 4 KiB pattern the guest writes in several places.
        var pattern = Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("strata-plaintext-marker-", 171)))[..4096];
        await using (var nbd = await src.ConnectAsync("vda"))
        {
            for (int i = 0; i < 8; i++) await nbd.WriteAsync(i * (3L << 20) + 8192, pattern);
            await nbd.FlushAsync();
        }
        string pass = P("pass");
        File.WriteAllText(pass, "correct horse battery staple\n");
        var withKey = t with { Options = [.. t.Options, "--passphrase-file", pass] };
        Strata(withKey, "init", "--chunks", "--chunk-size", "1M", "--encrypt").Ok();
        await src.CopyAsync("vda", P("p0.raw"));
        string id = RunBackup(withKey, src, "--disk", "vda").EnumerateArray().Single().GetProperty("id").GetString()!;
        AssertRestores(withKey, "vda", id, P("p0.raw"));

        byte[] marker = pattern[..32];
        foreach (var o in Objects(t, ""))
        {
            byte[] content = (await t.Store.GetAsync(o.Key))!;
            Assert.True(content.AsSpan().IndexOf(marker) < 0, $"{o.Key} holds plaintext");
        }

        File.WriteAllText(P("wrong"), "not the passphrase\n");
        var wrong = Strata(t with { Options = [.. t.Options, "--passphrase-file", P("wrong")] }, "list");
        Assert.NotEqual(0, wrong.Exit);
        Assert.Contains("passphrase", wrong.Stderr);
        Assert.False(Tools.LooksLikeCrash(wrong.Stderr), wrong.Stderr);
    }

    [Fact]
    public async Task PruneAndGcDuringABackupDeleteNothingItReferencesAndAKilledRunLeavesNoPoint()
    {
        using var t = NewTarget("s3");
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Strata(t, "init", "--chunks", "--chunk-size", "1M").Ok();
        RunBackup(t, src, "--disk", "vda");
        await src.GuestWritesAsync("vda", seed: 1, blocks: 12);
        RunBackup(t, src, "--disk", "vda");

        // A run killed after its uploads, before its index: no point, and its chunks help the next run.
        await src.GuestWritesAsync("vda", seed: 2, blocks: 12);
        using (var killed = StartStrata(t, "run", "--socket", src.QmpPath, "--nbd", src.NbdPath, "--disk", "vda", "--x-hold-before-commit", "60"))
        {
            string? line;
            while ((line = killed.StandardOutput.ReadLine()) is not null && !line.Contains("holding before commit")) { }
            Assert.NotNull(line);
            killed.Kill();
            killed.WaitForExit();
        }
        Assert.Equal(2, Strata(t, "list", "--json").Ok().Json().GetArrayLength());

        // Another run holds before its commit while prune and GC run in other processes.
        await src.CopyAsync("vda", P("now.raw"));
        // The killed run's lease is still there (nobody has looked at it since): the new run's is the one to wait for.
        var leftLeases = Objects(t, "locks/shared/").Select(o => o.Key).ToHashSet();
        using var running = StartStrata(t, "run", "--socket", src.QmpPath, "--nbd", src.NbdPath, "--disk", "vda", "--json", "--x-hold-before-commit", "5");
        var outputTask = running.StandardOutput.ReadToEndAsync();
        // Prune and GC start once the run holds its lease (GC must wait for it, not race ahead of it).
        for (int i = 0; i < 600 && Objects(t, "locks/shared/").All(o => leftLeases.Contains(o.Key)) && !running.HasExited; i++) await Task.Delay(100);
        Assert.Contains(Objects(t, "locks/shared/"), o => !leftLeases.Contains(o.Key));
        Strata(t, "prune", "--keep-last", "1").Ok();
        var gc = Strata(t, "gc", "--grace", "0");
        Assert.True(running.WaitForExit(120_000));
        Assert.Equal(0, running.ExitCode);
        gc.Ok();
        string output = await outputTask;
        var made = JsonDocument.Parse(output[output.IndexOf('[')..]).RootElement.EnumerateArray().Single();
        Assert.Equal("inc", made.GetProperty("level").GetString());
        // It read what the killed run read (the bitmaps of the killed run were folded back) and uploaded none of it
        // again: the killed run's journal named those chunks.
        Assert.True(made.GetProperty("copied-bytes").GetInt64() > 0);
        Assert.Equal(0, made.GetProperty("uploaded-bytes").GetInt64());
        AssertRestores(t, "vda", made.GetProperty("id").GetString()!, P("now.raw"));
        Strata(t, "verify").Ok();
        // GC swept for real: after prune, only the newest point's chunks remain.
        Strata(t, "gc", "--grace", "0").Ok();
        Strata(t, "verify").Ok();
    }

    [Fact]
    public async Task APointCopiedFromAChainFolderStartsItsOwnBitmapAndLeavesTheFoldersAlone()
    {
        using var t = NewTarget("folder");
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        string chain = P("chain");
        Tools.StrataCmd("backup", "init", chain).Ok();
        Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", chain).Ok();
        Strata(t, "init", "--chunks", "--chunk-size", "1M").Ok();
        Tools.StrataCmd(["backup", "copy", chain, t.Address]).Ok();
        await src.GuestWritesAsync("vda", seed: 4, blocks: 6);
        await src.CopyAsync("vda", P("now.raw"));

        // The copied point names the chain folder's bitmap: the chunk repository takes a full and its own bitmap.
        var made = RunBackup(t, src, "--disk", "vda").EnumerateArray().Single();
        Assert.Equal("full", made.GetProperty("level").GetString());
        Assert.Contains("copied from another repository", made.GetProperty("note").GetString());
        AssertRestores(t, "vda", made.GetProperty("id").GetString()!, P("now.raw"));
        // The folder's chain goes on: its bitmap still records, and its next run is an incremental.
        var next = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", chain).Ok().Json().EnumerateArray().Single();
        Assert.Equal("inc", next.GetProperty("level").GetString());
        Infra.RepositoryAsserts.AssertRestores(chain, "vda", next.GetProperty("id").GetString()!, P("now.raw"));
        Assert.Equal("inc", RunBackup(t, src, "--disk", "vda").EnumerateArray().Single().GetProperty("level").GetString());
    }
}
