using System.Diagnostics;
using Strata.Backup.Chunks;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// The chunk repository on a folder (issue 17), end to end: points written through a session from the bytes of real
/// images QEMU made, then `strata backup` restore, serve, verify, copy, prune and gc judged by qemu-img and nbdcopy.
/// </summary>
public class ChunkRepositoryTests : ScratchDirTest
{
    private const int C = 65536;
    private string Repo => P("chunks");

    /// <summary>An 8 MiB qcow2 that QEMU writes: patterns at unaligned offsets, a written run of zeros and holes; its raw
    /// form (qemu-img convert) is what every restore must equal.</summary>
    private string MakeSource(string name, int seed)
    {
        string qcow2 = P(name + ".qcow2"), raw = P(name + ".raw");
        Tools.QemuImg("create", "-q", "-f", "qcow2", qcow2, "8M").Ok();
        Tools.QemuIo(qcow2, [
            $"write -P 0x{seed:x2} 0 100k",
            $"write -P 0x{seed + 1:x2} 1000000 300k",
            "write -z 2M 192k",
            $"write -P 0x{seed + 2:x2} 5M 7k",
            $"write -P 0x{seed + 3:x2} 8386560 1k",
        ], "qcow2");
        Tools.QemuImg("convert", "-f", "qcow2", "-O", "raw", qcow2, raw).Ok();
        return raw;
    }

    private static async Task<ChunkRepository> OpenApi(string repo, string? passphrase = null) =>
        await ChunkRepository.OpenAsync(new FolderObjectStore(repo), passphrase is null ? null : new ChunkKeySource(passphrase, null));

    /// <summary>Backs up raw disk files as one point through a session (as a run would), returning the point id.</summary>
    private static async Task<string> WritePoint(ChunkRepository repo, params (string Disk, string File)[] disks)
    {
        await using var s = await repo.BeginBackupAsync();
        var made = new List<ChunkDisk>();
        foreach (var (disk, file) in disks)
        {
            byte[] data = File.ReadAllBytes(file);
            var ids = new List<ChunkId>();
            for (int at = 0; at < data.Length; at += repo.ChunkSize)
                ids.Add(await s.PutChunkAsync(data.AsMemory(at, Math.Min(repo.ChunkSize, data.Length - at))));
            made.Add(new ChunkDisk { Disk = disk, VirtualSize = data.Length, Level = "full", Mode = "push", Source = "test", Node = disk, Bitmap = "none", Chunks = ids, CopiedBytes = data.Length });
        }
        var point = new ChunkPoint { Id = await repo.NewIdAsync(DateTimeOffset.UtcNow), Time = DateTimeOffset.UtcNow, Disks = made };
        await s.CommitAsync(point);
        return point.Id;
    }

    private void AssertSameBytes(string expected, string actual) =>
        Assert.True(File.ReadAllBytes(expected).AsSpan().SequenceEqual(File.ReadAllBytes(actual)), $"{actual} differs from {expected}");

    private void Restore(string repo, string disk, string id, string to, string format = "raw", params string[] more) =>
        Tools.StrataCmd(["backup", "restore", "--disk", disk, "--at", id, "--to", to, "-O", format, .. more, repo]).Ok();

    private static Process StartServe(params string[] args)
    {
        var psi = Tools.StrataStartInfo(["backup", "serve", .. args]);
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        return Process.Start(psi)!;
    }

    private static void Flip(string file, long offset)
    {
        using var fs = new FileStream(file, FileMode.Open, FileAccess.ReadWrite);
        fs.Position = offset;
        int b = fs.ReadByte();
        fs.Position = offset;
        fs.WriteByte((byte)(b ^ 0x01));
    }

    private string[] ChunkFiles(string repo) => Directory.GetFiles(Path.Combine(repo, "chunks"), "*", SearchOption.AllDirectories);

    [Fact]
    public async Task RestoreAndServeGiveBackTheSourceBytes()
    {
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "64K", Repo).Ok();
        string vda = MakeSource("vda", 0x11), vdb = MakeSource("vdb", 0x51);
        string id;
        using (var repo = await OpenApi(Repo)) id = await WritePoint(repo, ("vda", vda), ("vdb", vdb));

        var list = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().ToArray();
        Assert.Equal(["vda", "vdb"], list.Select(e => e.GetProperty("disk").GetString()));
        Assert.All(list, e => Assert.Equal(id, e.GetProperty("id").GetString()));
        Assert.Equal(128, list[0].GetProperty("chunks").GetInt64());

        Restore(Repo, "vda", id, P("vda.out.raw"));
        AssertSameBytes(vda, P("vda.out.raw"));
        // Zero chunks stay holes in the restored file.
        var map = Tools.QemuImg("map", "--output=json", "-f", "raw", P("vda.out.raw")).Ok().Json().EnumerateArray();
        Assert.Contains(map, e => !e.GetProperty("data").GetBoolean() && e.GetProperty("start").GetInt64() <= 2 << 20 && e.GetProperty("start").GetInt64() + e.GetProperty("length").GetInt64() >= 4 << 20);
        Restore(Repo, "vdb", "latest", P("vdb.out.qcow2"), "qcow2");
        Tools.AssertQemuCheckClean(P("vdb.out.qcow2"));
        Tools.AssertQemuIdentical(P("vdb.out.qcow2"), vdb, "-f", "qcow2", "-F", "raw");
        var again = Tools.StrataCmd("backup", "restore", "--disk", "vda", "--to", P("vda.out.raw"), Repo);
        Assert.Equal(2, again.Exit);
        Assert.Contains("already exists", again.Stderr);

        string sock = P("serve.sock");
        using var serve = StartServe("--disk", "vdb", "--socket", sock, Repo);
        try
        {
            string line = serve.StandardOutput.ReadLine() ?? serve.StandardError.ReadToEnd();
            Assert.Contains($"serving vdb@{id}", line);
            string uri = $"nbd+unix:///vdb?socket={sock}";
            Assert.Equal(0, Tools.Run("nbdcopy", uri, P("served.raw")).Exit);
            AssertSameBytes(vdb, P("served.raw"));
            var info = Tools.Run("nbdinfo", "--json", uri);
            Assert.Contains("\"is_read_only\": true", info.Stdout);
        }
        finally
        {
            serve.Kill();
            serve.WaitForExit();
        }
    }

    [Fact]
    public async Task VerifyAndRestoreNameAChunkWithAFlippedByteAndPointsWithoutItStillRestore()
    {
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "64K", Repo).Ok();
        string first = MakeSource("first", 0x21), second = MakeSource("second", 0x61);
        string idFirst, idSecond;
        ChunkId damaged;
        using (var repo = await OpenApi(Repo))
        {
            idFirst = await WritePoint(repo, ("vda", first));
            idSecond = await WritePoint(repo, ("vda", second));
            var points = await repo.PointsAsync();
            var secondIds = points.Single(p => p.Id == idSecond).Disks[0].Chunks.ToHashSet();
            damaged = points.Single(p => p.Id == idFirst).Disks[0].Chunks.First(c => !c.IsZero && !secondIds.Contains(c));
        }
        var ok = Tools.StrataCmd("backup", "verify", Repo).Ok();
        Assert.Contains("all good", ok.Stdout);

        // A raw rewrite of the chunk's object with one byte flipped, past the blob header.
        string file = Path.Combine(Repo, ChunkRepository.ChunkKey(damaged));
        Flip(file, new FileInfo(file).Length / 2);
        var verify = Tools.StrataCmd("backup", "verify", Repo);
        Assert.True(verify.Exit == 1, verify.ToString());
        Assert.Contains($"PROBLEM vda@{idFirst} chunk {damaged}", verify.Stdout);
        Assert.DoesNotContain($"vda@{idSecond}", verify.Stdout);

        var restore = Tools.StrataCmd("backup", "restore", "--disk", "vda", "--at", idFirst, "--to", P("first.out.raw"), Repo);
        Assert.Equal(1, restore.Exit);
        Assert.Contains(damaged.ToString(), restore.Stderr);
        Assert.False(File.Exists(P("first.out.raw")));
        Assert.Empty(Directory.GetFiles(Dir, "*.partial"));
        Restore(Repo, "vda", idSecond, P("second.out.raw"));
        AssertSameBytes(second, P("second.out.raw"));

        // A missing chunk is named the same way.
        Flip(file, new FileInfo(file).Length / 2);
        Tools.StrataCmd("backup", "verify", Repo).Ok();
        File.Delete(file);
        verify = Tools.StrataCmd("backup", "verify", "--sample", "0.1", Repo);
        Assert.Equal(1, verify.Exit);
        Assert.Contains($"PROBLEM vda@{idFirst} chunk {damaged}: chunk {damaged} is missing", verify.Stdout);
    }

    [Fact]
    public async Task AnEncryptedRepositoryHoldsNoPlaintextAndWantsItsPassphrase()
    {
        const string DiskName = "vda";
        // A random 4 KiB pattern (zstd leaves it as literals) written into the disk at several places.
        var pattern = new byte[4096];
        new Random(17).NextBytes(pattern);
        string disk = P("disk.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", disk, "4M").Ok();
        Tools.QemuIo(disk, ["write -P 0x33 2M 64k"], "qcow2");
        Tools.QemuImg("convert", "-f", "qcow2", "-O", "raw", disk, P("disk.raw")).Ok();
        byte[] raw = File.ReadAllBytes(P("disk.raw"));
        // Two of the 1 MiB chunks are random around the pattern: zstd gains nothing there, so an unencrypted
        // repository stores them as they are, and the search below finds the pattern in it.
        new Random(18).NextBytes(raw.AsSpan(1 << 20, 1 << 20));
        new Random(19).NextBytes(raw.AsSpan(3 << 20, 1 << 20));
        foreach (long at in new long[] { 0, 70000, (1 << 20) + 100, (3 << 20) + 5000 }) pattern.CopyTo(raw, at);
        File.WriteAllBytes(P("disk.raw"), raw);

        File.WriteAllText(P("pass"), "correct horse battery staple\n");
        File.WriteAllText(P("wrong"), "incorrect horse\n");
        string plain = P("plain"), secret = P("secret");
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "1M", plain).Ok();
        var init = Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "1M", "--encrypt", "--passphrase-file", P("pass"), secret).Ok();
        Assert.Contains("encrypted", init.Stdout);
        using (var repo = await OpenApi(plain)) await WritePoint(repo, (DiskName, P("disk.raw")));
        string id;
        using (var repo = await OpenApi(secret, "correct horse battery staple")) id = await WritePoint(repo, (DiskName, P("disk.raw")));

        static bool Holds(string folder, byte[] needle) =>
            Directory.GetFiles(folder, "*", SearchOption.AllDirectories).Any(f => File.ReadAllBytes(f).AsSpan().IndexOf(needle) >= 0);
        // The unencrypted repository shows what the search finds; the encrypted one has none of it, not even 64 bytes.
        Assert.True(Holds(plain, pattern));
        Assert.False(Holds(secret, pattern[..64]));

        var wrong = Tools.StrataCmd("backup", "list", "--passphrase-file", P("wrong"), secret);
        Assert.Equal(2, wrong.Exit);
        Assert.Contains("wrong passphrase or key file", wrong.Stderr);
        var none = Tools.StrataCmd("backup", "restore", "--disk", DiskName, "--to", P("x.raw"), secret);
        Assert.Equal(2, none.Exit);
        Assert.Contains("is encrypted", none.Stderr);
        Restore(secret, DiskName, id, P("out.raw"), "raw", "--passphrase-file", P("pass"));
        AssertSameBytes(P("disk.raw"), P("out.raw"));
        Tools.StrataCmd("backup", "verify", "--passphrase-file", P("pass"), secret).Ok();

        // The passphrase from the environment, in a process of its own.
        var psi = Tools.StrataStartInfo("backup", "list", "--json", secret);
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.Environment["STRATA_PASSPHRASE"] = "correct horse battery staple";
        using (var listed = Process.Start(psi)!)
        {
            string stdout = listed.StandardOutput.ReadToEnd();
            listed.WaitForExit();
            Assert.True(listed.ExitCode == 0, listed.StandardError.ReadToEnd());
            Assert.Contains(id, stdout);
        }

        // A key file's bytes are the secret: another file does not open it.
        var keyBytes = new byte[64];
        new Random(20).NextBytes(keyBytes);
        File.WriteAllBytes(P("key"), keyBytes);
        keyBytes[0] ^= 1;
        File.WriteAllBytes(P("other-key"), keyBytes);
        string keyed = P("keyed");
        Tools.StrataCmd("backup", "init", "--chunks", "--encrypt", "--key-file", P("key"), keyed).Ok();
        Tools.StrataCmd("backup", "list", "--key-file", P("key"), keyed).Ok();
        var otherKey = Tools.StrataCmd("backup", "list", "--key-file", P("other-key"), keyed);
        Assert.Equal(2, otherKey.Exit);
        Assert.Contains("wrong passphrase or key file", otherKey.Stderr);
    }

    [Fact]
    public async Task CopyBetweenChunkRepositoriesRoundTripsAndRunsAgainAsANoOp()
    {
        string a = P("a"), b = P("b"), c = P("c");
        File.WriteAllText(P("pass"), "copy me");
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "64K", a).Ok();
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "64K", "--encrypt", "--passphrase-file", P("pass"), b).Ok();
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "128K", c).Ok();
        string vda = MakeSource("vda", 0x31), vdb = MakeSource("vdb", 0x71), vda2 = MakeSource("vda2", 0x41);
        var ids = new List<string>();
        using (var repo = await OpenApi(a))
        {
            ids.Add(await WritePoint(repo, ("vda", vda), ("vdb", vdb)));
            ids.Add(await WritePoint(repo, ("vda", vda2)));
        }
        var copy = Tools.StrataCmd("backup", "copy", "--passphrase-file", P("pass"), a, b).Ok();
        Assert.Contains("copied 2 point(s) (0 already present)", copy.Stdout);
        int stored = ChunkFiles(b).Length;
        var again = Tools.StrataCmd("backup", "copy", "--passphrase-file", P("pass"), a, b).Ok();
        Assert.Contains("copied 0 point(s) (2 already present): 0 chunk(s)", again.Stdout);
        Assert.Equal(stored, ChunkFiles(b).Length);
        // Back out of the encrypted one into a repository of another chunk size.
        Tools.StrataCmd("backup", "copy", "--source-passphrase-file", P("pass"), b, c).Ok();
        var listed = Tools.StrataCmd("backup", "list", "--json", c).Ok().Json().EnumerateArray().Select(e => e.GetProperty("id").GetString()).Distinct();
        Assert.Equal(ids, listed);
        Restore(c, "vda", ids[0], P("vda.out.raw"));
        AssertSameBytes(vda, P("vda.out.raw"));
        Restore(c, "vdb", ids[0], P("vdb.out.raw"));
        AssertSameBytes(vdb, P("vdb.out.raw"));
        Restore(c, "vda", ids[1], P("vda2.out.raw"));
        AssertSameBytes(vda2, P("vda2.out.raw"));
        Tools.StrataCmd("backup", "verify", c).Ok();
    }

    [Fact]
    public async Task CopyFromAChainFolderReadsEveryPointThroughItsChain()
    {
        string chain = P("chain");
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", chain).Ok();
        var ids = new List<string>();
        for (int round = 0; round < 3; round++)
        {
            if (round > 0) await src.GuestWritesAsync("vda", seed: round);
            await src.CopyAsync("vda", P($"vda-{round}.raw"));
            ids.Add(Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", chain).Ok().Json()[0].GetProperty("id").GetString()!);
        }
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "256K", Repo).Ok();
        Tools.StrataCmd("backup", "copy", chain, Repo).Ok();
        var listed = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().ToArray();
        Assert.Equal(ids, listed.Select(e => e.GetProperty("id").GetString()));
        Assert.Equal(["full", "inc", "inc"], listed.Select(e => e.GetProperty("level").GetString()));
        for (int round = 0; round < 3; round++)
        {
            Restore(Repo, "vda", ids[round], P($"out-{round}.raw"));
            AssertSameBytes(P($"vda-{round}.raw"), P($"out-{round}.raw"));
        }
        var again = Tools.StrataCmd("backup", "copy", chain, Repo).Ok();
        Assert.Contains("copied 0 point(s) (3 already present)", again.Stdout);
    }

    [Fact]
    public async Task GcFreesExactlyTheChunksNoPointReferencesAndSparesAnUnpublishedBackupWithinTheGrace()
    {
        Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "64K", Repo).Ok();
        string old = MakeSource("old", 0x12), now = MakeSource("now", 0x52), pending = MakeSource("pending", 0x92);
        using var repo = await OpenApi(Repo);
        string idOld = await WritePoint(repo, ("vda", old));
        string idNow = await WritePoint(repo, ("vda", now));
        var points = await repo.PointsAsync();
        var keep = points.Single(p => p.Id == idNow).Disks[0].Chunks.Where(c => !c.IsZero).ToHashSet();
        var doomed = points.Single(p => p.Id == idOld).Disks[0].Chunks.Where(c => !c.IsZero && !keep.Contains(c)).ToHashSet();
        Assert.NotEmpty(doomed);
        long doomedBytes = doomed.Sum(c => new FileInfo(Path.Combine(Repo, ChunkRepository.ChunkKey(c))).Length);
        // Everything stored so far is two hours old.
        foreach (var f in ChunkFiles(Repo)) File.SetLastWriteTimeUtc(f, DateTime.UtcNow.AddHours(-2));

        // A backup that has stored chunks but not published its point.
        var session = await repo.BeginBackupAsync();
        byte[] pendingData = File.ReadAllBytes(pending);
        var pendingIds = new List<ChunkId>();
        for (int at = 0; at < pendingData.Length; at += C) pendingIds.Add(await session.PutChunkAsync(pendingData.AsMemory(at, C)));
        var fresh = pendingIds.Where(c => !c.IsZero && !keep.Contains(c) && !doomed.Contains(c)).ToHashSet();
        Assert.NotEmpty(fresh);

        var prune = Tools.StrataCmd("backup", "prune", "--keep-last", "1", Repo).Ok();
        Assert.Contains($"{idOld} (vda): remove", prune.Stdout);
        // While the backup holds its lease, gc waits and then gives up.
        var locked = Tools.StrataCmd("backup", "gc", "--wait", "1s", Repo);
        Assert.True(locked.Exit == 3, locked.ToString());
        Assert.Contains("still hold", locked.Stderr);

        // The backup's process stalls past its lease (here: the lease is gone); the grace still spares its chunks.
        foreach (var lease in Directory.GetFiles(Path.Combine(Repo, "locks", "shared"))) File.Delete(lease);
        var gc = Tools.StrataCmd("backup", "gc", "--grace", "1h", "--json", Repo).Ok().Json();
        Assert.Equal(doomed.Count, gc.GetProperty("deleted-chunks").GetInt64());
        Assert.Equal(doomedBytes, gc.GetProperty("freed-bytes").GetInt64());
        Assert.Equal(fresh.Count, gc.GetProperty("kept-within-grace").GetInt64());
        var left = ChunkFiles(Repo).Select(f => ChunkId.Parse(Path.GetFileName(f))).ToHashSet();
        Assert.True(left.SetEquals(keep.Concat(fresh)), "gc must delete exactly the unreferenced chunks older than the grace");
        Restore(Repo, "vda", idNow, P("now.out.raw"));
        AssertSameBytes(now, P("now.out.raw"));

        // The stalled backup finds its lease gone and does not publish; with no grace its chunks go too.
        var point = new ChunkPoint { Id = "20990101T000000Z", Time = DateTimeOffset.UtcNow, Disks = [new ChunkDisk { Disk = "vda", VirtualSize = pendingData.Length, Level = "full", Mode = "push", Source = "t", Node = "n", Bitmap = "b", Chunks = pendingIds }] };
        var lost = await Assert.ThrowsAsync<Strata.Backup.BackupException>(() => session.CommitAsync(point));
        Assert.Equal(3, lost.ExitCode);
        await session.DisposeAsync();
        var sweep = Tools.StrataCmd("backup", "gc", "--grace", "0", Repo).Ok();
        Assert.Contains($"deleted {fresh.Count} unreferenced chunk(s)", sweep.Stdout);
        Assert.True(ChunkFiles(Repo).Select(f => ChunkId.Parse(Path.GetFileName(f))).ToHashSet().SetEquals(keep));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }
}
