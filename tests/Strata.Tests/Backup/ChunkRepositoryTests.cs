using Strata.Backup;
using Strata.Backup.Chunks;
using Strata.Block;
using Strata.Formats.Chunks;

namespace Strata.Tests.Backup;

/// <summary>The chunk repository over a folder store: points written by hand through a session, read back.</summary>
public sealed class ChunkRepositoryTests : IDisposable
{
    private const int C = 65536;
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "strata-chunks-" + Guid.NewGuid().ToString("N"));

    public void Dispose()
    {
        if (Directory.Exists(_dir)) Directory.Delete(_dir, recursive: true);
    }

    private FolderObjectStore Store() => new(_dir);

    private static byte[] Random(int size, int seed)
    {
        var b = new byte[size];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>A disk of <paramref name="chunks"/> chunks plus a short tail: random data, a zero chunk at index 1.</summary>
    private static byte[] Disk(int chunks, int seed, int tail = 1000)
    {
        var disk = Random(chunks * C + tail, seed);
        if (chunks > 1) Array.Clear(disk, C, C);
        return disk;
    }

    private static async Task<ChunkDisk> PutDisk(ChunkBackupSession s, string name, byte[] data)
    {
        var ids = new List<ChunkId>();
        for (int at = 0; at < data.Length; at += C) ids.Add(await s.PutChunkAsync(data.AsMemory(at, Math.Min(C, data.Length - at))));
        return new ChunkDisk
        {
            Disk = name, VirtualSize = data.Length, Level = "full", Mode = "push", Source = "test", Node = "n", Bitmap = "b", Chunks = ids,
            UploadedChunks = s.UploadedChunks,
        };
    }

    private static ChunkPoint Point(string id, params ChunkDisk[] disks) =>
        new() { Id = id, Time = DateTimeOffset.ParseExact(id[..16], "yyyyMMdd'T'HHmmss'Z'", null, System.Globalization.DateTimeStyles.AssumeUniversal), Disks = disks };

    private static byte[] ReadAll(BlockImage image)
    {
        var b = new byte[image.Size];
        image.Read(0, b);
        return b;
    }

    private string[] ChunkFiles() =>
        Directory.Exists(Path.Combine(_dir, "chunks")) ? Directory.GetFiles(Path.Combine(_dir, "chunks"), "*", SearchOption.AllDirectories) : [];

    private Task<ChunkRepository> Init(bool encrypt = false) =>
        ChunkRepository.InitAsync(Store(), new ChunkRepositoryInit { ChunkSize = C, Encrypt = encrypt, Key = encrypt ? new ChunkKeySource("sesame", null) : null });

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task APointWrittenThroughASessionReadsBackAndZeroChunksAreNeverStored(bool encrypt)
    {
        using var repo = await Init(encrypt);
        byte[] vda = Disk(4, 1);
        await using (var s = await repo.BeginBackupAsync())
        {
            var d = await PutDisk(s, "vda", vda);
            Assert.True(d.Chunks[1].IsZero);
            Assert.Equal(4, s.UploadedChunks); // 5 chunks, one of them zero
            await s.CommitAsync(Point("20261206T120000Z", d));
        }
        Assert.Equal(4, ChunkFiles().Length);
        Assert.Empty(Directory.GetFiles(Path.Combine(_dir, "locks"), "*", SearchOption.AllDirectories));

        using var reopened = await ChunkRepository.OpenAsync(Store(), encrypt ? new ChunkKeySource("sesame", null) : null);
        Assert.Equal(encrypt, reopened.Encrypted);
        Assert.Equal(repo.Tag, reopened.Tag);
        var points = await reopened.PointsAsync();
        var p = Assert.Single(points);
        Assert.Equal("20261206T120000Z", p.Id);
        using var image = reopened.OpenDisk(p, "vda", cacheChunks: 2);
        Assert.Equal(vda.Length, image.Size);
        Assert.Equal(vda, ReadAll(image));
        // Unaligned reads across chunk borders, from several threads at once through a cache smaller than the disk.
        Parallel.For(0, 64, i =>
        {
            int at = new Random(i).Next(vda.Length - 3 * C);
            var b = new byte[2 * C + 123];
            image.Read(at, b);
            Assert.Equal(vda.AsSpan(at, b.Length).ToArray(), b);
        });
        var status = image.GetLayerStatus(0, image.Size);
        Assert.Equal((LayerState.Data, (long)C), (status.State, status.Length));
        status = image.GetLayerStatus(C, image.Size - C);
        Assert.Equal((LayerState.Zero, (long)C), (status.State, status.Length));
        Assert.Throws<BlockException>(() => image.Write(0, new byte[512]));
        var latest = await reopened.LatestAsync("vda");
        Assert.Equal("20261206T120000Z", latest!.Value.Point.Id);
        Assert.Null(await reopened.LatestAsync("vdb"));
    }

    [Fact]
    public async Task AChunkStoredForOneDiskIsNotStoredAgainForAnotherOrALaterPoint()
    {
        using var repo = await Init();
        byte[] vda = Disk(6, 2);
        byte[] vdb = (byte[])vda.Clone();
        Random(100, 3).CopyTo(vdb, 3 * C + 5); // the clone differs in one chunk
        await using (var s = await repo.BeginBackupAsync())
        {
            var a = await PutDisk(s, "vda", vda);
            long afterA = s.UploadedChunks;
            var b = await PutDisk(s, "vdb", vdb);
            Assert.Equal(6, afterA);
            Assert.Equal(7, s.UploadedChunks);
            Assert.Equal(5, s.ReusedChunks);
            await s.CommitAsync(Point("20261206T120000Z", a, b));
        }
        Assert.Equal(7, ChunkFiles().Length);
        // A new session knows every chunk of the published points: none is sent again.
        await using (var s = await repo.BeginBackupAsync())
        {
            var a = await PutDisk(s, "vda", vda);
            Assert.Equal(0, s.UploadedChunks);
            Assert.Equal(0, s.UploadedBytes);
            await s.CommitAsync(Point("20261206T130000Z", a));
        }
        Assert.Equal(7, ChunkFiles().Length);
        var points = await repo.PointsAsync();
        Assert.Equal(["20261206T120000Z", "20261206T130000Z"], points.Select(p => p.Id));
        using var image = repo.OpenDisk(points[0], "vdb");
        Assert.Equal(vdb, ReadAll(image));
    }

    [Fact]
    public async Task ConcurrentPutsOfOneChunkStoreItOnce()
    {
        using var repo = await Init();
        byte[] chunk = Random(C, 4);
        await using var s = await repo.BeginBackupAsync();
        var ids = await Task.WhenAll(Enumerable.Range(0, 16).Select(_ => Task.Run(() => s.PutChunkAsync(chunk))));
        Assert.Single(ids.Distinct());
        Assert.Single(ChunkFiles());
        Assert.Equal(16, s.UploadedChunks + s.ReusedChunks);
    }

    [Fact]
    public async Task AMissingChunkIsNamedByReadsAndTheImage()
    {
        using var repo = await Init();
        byte[] vda = Disk(3, 5);
        ChunkPoint p;
        await using (var s = await repo.BeginBackupAsync())
        {
            p = Point("20261206T120000Z", await PutDisk(s, "vda", vda));
            await s.CommitAsync(p);
        }
        var gone = p.Disks[0].Chunks[2];
        File.Delete(Path.Combine(_dir, ChunkRepository.ChunkKey(gone)));
        var e = await Assert.ThrowsAsync<ChunkIntegrityException>(() => repo.ReadChunkAsync(gone, C));
        Assert.Contains(gone.ToString(), e.Message);
        Assert.Contains("missing", e.Message);
        using var image = repo.OpenDisk(p, "vda");
        var io = Assert.Throws<BlockIOException>(() => ReadAll(image));
        Assert.Contains(gone.ToString(), io.Message);
        // The chunks before it still read.
        var first = new byte[2 * C];
        image.Read(0, first);
        Assert.Equal(vda.AsSpan(0, 2 * C).ToArray(), first);
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task AChunkWithAnyByteFlippedFailsItsCheckNamingIt(bool encrypt)
    {
        using var repo = await Init(encrypt);
        ChunkId id;
        await using (var s = await repo.BeginBackupAsync()) id = await s.PutChunkAsync(Random(C, 6));
        string file = Path.Combine(_dir, ChunkRepository.ChunkKey(id));
        byte[] blob = File.ReadAllBytes(file);
        foreach (int at in new[] { 0, 4, 5, 6, 20, blob.Length / 2, blob.Length - 1 })
        {
            blob[at] ^= 0x01;
            File.WriteAllBytes(file, blob);
            var e = await Assert.ThrowsAsync<ChunkIntegrityException>(() => repo.ReadChunkAsync(id, C));
            Assert.Contains(id.ToString(), e.Message);
            blob[at] ^= 0x01;
        }
        File.WriteAllBytes(file, blob);
        Assert.Equal(Random(C, 6), await repo.ReadChunkAsync(id, C));
        // The right blob under another id's name is refused too.
        var other = ChunkId.Parse(new string('7', 64));
        var moved = await Assert.ThrowsAsync<ChunkIntegrityException>(() => Task.FromResult(repo.DecodeChunk(other, blob, C)));
        Assert.Contains(other.ToString(), moved.Message);
    }

    [Fact]
    public async Task ADamagedPointIndexIsNamed()
    {
        using var repo = await Init();
        await using (var s = await repo.BeginBackupAsync()) await s.CommitAsync(Point("20261206T120000Z", await PutDisk(s, "vda", Disk(2, 7))));
        string file = Path.Combine(_dir, "points", "20261206T120000Z");
        byte[] blob = File.ReadAllBytes(file);
        blob[^40] ^= 0x02;
        File.WriteAllBytes(file, blob);
        using var fresh = await ChunkRepository.OpenAsync(Store(), null);
        var e = await Assert.ThrowsAsync<ChunkIntegrityException>(() => fresh.PointsAsync());
        Assert.Contains("points/20261206T120000Z", e.Message);
    }

    [Fact]
    public async Task ASessionThatIsNotCommittedLeavesNoPointAndReleasesItsLease()
    {
        using var repo = await Init();
        await using (var s = await repo.BeginBackupAsync())
        {
            await PutDisk(s, "vda", Disk(3, 8));
            Assert.Single(await RepositoryLeases.LiveSharedAsync(repo.Store));
        }
        Assert.Empty(await repo.PointsAsync());
        Assert.Equal(3, ChunkFiles().Length); // unreferenced: garbage collection's to remove
        Assert.Empty(await RepositoryLeases.LiveSharedAsync(repo.Store));
        Assert.Null(await repo.LatestAsync("vda"));
    }

    [Fact]
    public async Task APointIdIsPublishedOnceAndNewIdsAvoidTakenOnes()
    {
        using var repo = await Init();
        var now = new DateTimeOffset(2026, 12, 6, 12, 0, 0, TimeSpan.Zero);
        string id = await repo.NewIdAsync(now);
        Assert.Equal("20261206T120000Z", id);
        await using var s = await repo.BeginBackupAsync();
        var d = await PutDisk(s, "vda", Disk(1, 9));
        await s.CommitAsync(Point(id, d));
        Assert.Equal("20261206T120000Z-2", await repo.NewIdAsync(now));
        var e = await Assert.ThrowsAsync<BackupException>(() => s.CommitAsync(Point(id, d)));
        Assert.Contains("already exists", e.Message);
        // A point naming a chunk the session never stored is a caller's bug, refused before anything is published.
        var bogus = d with { Chunks = [ChunkId.Parse(new string('a', 64)), .. d.Chunks.Skip(1)] };
        await Assert.ThrowsAsync<InvalidOperationException>(() => s.CommitAsync(Point("20261206T140000Z", bogus)));
        Assert.Single(await repo.PointsAsync());
    }

    [Fact]
    public async Task InitRefusesAnExistingRepositoryAndOpenRefusesAFolderWithout()
    {
        using (await Init()) { }
        var again = await Assert.ThrowsAsync<BackupException>(() => Init());
        Assert.Equal(BackupExitCodes.Usage, again.ExitCode);
        Assert.Contains("already a repository", again.Message);
        var bad = await Assert.ThrowsAsync<BackupException>(() => ChunkRepository.InitAsync(Store(), new ChunkRepositoryInit { ChunkSize = 5000 }));
        Assert.Contains("chunk size", bad.Message);
        var none = await Assert.ThrowsAsync<BackupException>(() => ChunkRepository.OpenAsync(new FolderObjectStore(_dir + "-none"), null));
        Assert.Contains("not a chunk repository", none.Message);
    }

    [Fact]
    public async Task AnEncryptedRepositoryOpensOnlyWithItsPassphraseOrKeyFile()
    {
        using (await Init(encrypt: true)) { }
        var config = ChunkRepositoryConfig.Parse(File.ReadAllBytes(Path.Combine(_dir, "config")));
        Assert.Null(config.IdKey);
        Assert.Equal(65536, config.Encryption!.MemoryKib);
        var wrong = await Assert.ThrowsAsync<BackupException>(() => ChunkRepository.OpenAsync(Store(), new ChunkKeySource("open sesame", null)));
        Assert.Contains("wrong passphrase or key file", wrong.Message);
        var missing = await Assert.ThrowsAsync<BackupException>(() => ChunkRepository.OpenAsync(Store(), null));
        Assert.Contains("is encrypted", missing.Message);
        // The passphrase's bytes in a key file open it as well.
        string keyFile = _dir + ".key";
        File.WriteAllText(keyFile, "sesame");
        try
        {
            using var byFile = await ChunkRepository.OpenAsync(Store(), new ChunkKeySource(null, keyFile));
            Assert.True(byFile.Encrypted);
        }
        finally
        {
            File.Delete(keyFile);
        }
        var encryptWithout = await Assert.ThrowsAsync<BackupException>(() =>
            ChunkRepository.InitAsync(new FolderObjectStore(_dir + "-2"), new ChunkRepositoryInit { Encrypt = true }));
        Assert.Contains("passphrase", encryptWithout.Message);
    }

    [Fact]
    public async Task AnUnencryptedRepositoryOpensWithAPassphraseGivenAllTheSame()
    {
        using (await Init()) { }
        using var repo = await ChunkRepository.OpenAsync(Store(), new ChunkKeySource("unused", null));
        Assert.False(repo.Encrypted);
    }

    [Fact]
    public async Task ABackupIsRefusedWhileGarbageCollectionHoldsTheRepository()
    {
        using var repo = await Init();
        await using (var gc = await RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", TimeSpan.Zero))
        {
            var e = await Assert.ThrowsAsync<BackupException>(() => repo.BeginBackupAsync());
            Assert.Equal(BackupExitCodes.Locked, e.ExitCode);
            Assert.Contains("locked by garbage collection", e.Message);
            // The backup's own lease went with it, so garbage collection does not wait for it.
            Assert.Empty(await RepositoryLeases.LiveSharedAsync(repo.Store));
            var second = await Assert.ThrowsAsync<BackupException>(() => RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", TimeSpan.Zero));
            Assert.Equal(BackupExitCodes.Locked, second.ExitCode);
        }
        await using (await repo.BeginBackupAsync())
        {
            // And garbage collection waits for the backup, then gives up with exit code 3.
            var e = await Assert.ThrowsAsync<BackupException>(() =>
                RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", TimeSpan.FromMilliseconds(300), pollInterval: TimeSpan.FromMilliseconds(50)));
            Assert.Equal(BackupExitCodes.Locked, e.ExitCode);
            Assert.Contains("backup(s) still hold", e.Message);
            Assert.Null(await repo.Store.HeadAsync(RepositoryLeases.ExclusiveKey));
        }
    }

    [Fact]
    public async Task ExpiredLeasesAreIgnoredAndDeletedByWhoeverFindsThem()
    {
        using var repo = await Init();
        var stale = new ChunkLeaseRecord("gc dead", "elsewhere", 1, DateTimeOffset.UtcNow.AddHours(-1));
        await repo.Store.PutAsync(RepositoryLeases.ExclusiveKey, stale.Serialize());
        await repo.Store.PutAsync(RepositoryLeases.SharedPrefix + "dead", (stale with { Owner = "backup dead" }).Serialize());
        await using (await repo.BeginBackupAsync())
        {
        }
        Assert.Null(await repo.Store.HeadAsync(RepositoryLeases.ExclusiveKey));
        await using (await RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", TimeSpan.Zero))
        {
        }
        Assert.Null(await repo.Store.HeadAsync(RepositoryLeases.SharedPrefix + "dead"));
    }

    [Fact]
    public async Task ASessionWhoseLeaseWasTakenAwayDoesNotPublish()
    {
        using var repo = await Init();
        await using var s = await repo.BeginBackupAsync();
        var d = await PutDisk(s, "vda", Disk(1, 10));
        await foreach (var o in repo.Store.ListAsync(RepositoryLeases.SharedPrefix)) await repo.Store.DeleteAsync(o.Key);
        var e = await Assert.ThrowsAsync<BackupException>(() => s.CommitAsync(Point("20261206T120000Z", d)));
        Assert.Equal(BackupExitCodes.Locked, e.ExitCode);
        Assert.Empty(await repo.PointsAsync());
    }

    [Fact]
    public async Task ALeaseIsRenewedInTheBackground()
    {
        using var repo = await Init();
        await using var lease = await RepositoryLeases.AcquireSharedAsync(repo.Store, "backup", TimeSpan.FromMilliseconds(600));
        var first = lease.Record.Expires;
        await Task.Delay(1500);
        Assert.True(lease.Record.Expires > first.AddMilliseconds(500));
        await lease.CheckAsync();
        var stored = ChunkLeaseRecord.TryParse((await repo.Store.GetAsync(lease.Key))!)!;
        Assert.Equal(lease.Record.Owner, stored.Owner);
    }

    [Fact]
    public async Task VerifyReadsASampleOrEveryChunkAndNamesEachDiskOfEachPointUsingABadOne()
    {
        using var repo = await Init();
        byte[] vda = Disk(8, 11);
        string[] ids = ["20261206T120000Z", "20261206T130000Z"];
        ChunkPoint first;
        await using (var s = await repo.BeginBackupAsync())
        {
            first = Point(ids[0], await PutDisk(s, "vda", vda), await PutDisk(s, "vdb", vda));
            await s.CommitAsync(first);
            await s.CommitAsync(Point(ids[1], await PutDisk(s, "vda", Disk(8, 12))));
        }
        var all = await ChunkVerifier.VerifyAsync(repo);
        Assert.Equal((2, 16L, 16L), (all.Points, all.DistinctChunks, all.ChunksRead));
        Assert.Empty(all.Problems);
        var half = await ChunkVerifier.VerifyAsync(repo, sample: 0.5);
        Assert.Equal(8, half.ChunksRead);

        var bad = first.Disks[0].Chunks[3];
        string file = Path.Combine(_dir, ChunkRepository.ChunkKey(bad));
        byte[] blob = File.ReadAllBytes(file);
        blob[^1] ^= 0x80;
        File.WriteAllBytes(file, blob);
        var found = await ChunkVerifier.VerifyAsync(repo);
        Assert.Equal([(ids[0], "vda", bad.ToString()), (ids[0], "vdb", bad.ToString())], found.Problems.Select(p => (p.Point!, p.Disk!, p.Chunk!)));
        Assert.All(found.Problems, p => Assert.Contains("corrupt", p.What));
        await Assert.ThrowsAsync<BackupException>(() => ChunkVerifier.VerifyAsync(repo, sample: 0));

        // A damaged index is a problem of its own; the other points are still checked.
        string index = Path.Combine(_dir, "points", ids[1]);
        byte[] indexBlob = File.ReadAllBytes(index);
        indexBlob[^1] ^= 0x01;
        File.WriteAllBytes(index, indexBlob);
        found = await ChunkVerifier.VerifyAsync(repo);
        Assert.Contains(found.Problems, p => p.Point == ids[1] && p.Disk is null && p.What.Contains("corrupt"));
        Assert.Equal(1, found.Points);
    }

    [Fact]
    public async Task PruneKeepsAPointThatAnyOfItsDisksRulesKeepAndDeletesOnlyIndexes()
    {
        using var repo = await Init();
        await using (var s = await repo.BeginBackupAsync())
        {
            await s.CommitAsync(Point("20261201T120000Z", await PutDisk(s, "vda", Disk(2, 13)), await PutDisk(s, "vdb", Disk(2, 14))));
            await s.CommitAsync(Point("20261202T120000Z", await PutDisk(s, "vda", Disk(2, 15))));
            await s.CommitAsync(Point("20261203T120000Z", await PutDisk(s, "vda", Disk(2, 16))));
        }
        int chunks = ChunkFiles().Length;
        var dry = await ChunkPruner.PruneAsync(repo, new RetentionPolicy(1, 0, 0, 0), dryRun: true);
        Assert.Equal(["20261202T120000Z"], dry.Select(p => p.Id));
        Assert.Equal(3, (await repo.PointsAsync()).Count);
        // The first point is vdb's newest: kept. Of vda's, only the newest is kept.
        var removed = await ChunkPruner.PruneAsync(repo, new RetentionPolicy(1, 0, 0, 0));
        Assert.Equal(["20261202T120000Z"], removed.Select(p => p.Id));
        Assert.Equal(["20261201T120000Z", "20261203T120000Z"], (await repo.PointsAsync()).Select(p => p.Id));
        Assert.Equal(chunks, ChunkFiles().Length);
        var gc = await ChunkGarbageCollector.CollectAsync(repo, TimeSpan.Zero, TimeSpan.Zero);
        Assert.Equal(2, gc.DeletedChunks);
        Assert.Equal(chunks - 2, ChunkFiles().Length);
        await ChunkVerifier.VerifyAsync(repo);
    }

    [Fact]
    public async Task ABackupAndAGarbageCollectionStartingTogetherNeverBothHoldTheRepository()
    {
        using var repo = await Init();
        int both = 0, backups = 0, collections = 0;
        for (int round = 0; round < 40; round++)
        {
            var start = new TaskCompletionSource();
            var gc = Task.Run(async () => { await start.Task; return await RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", TimeSpan.Zero); });
            var backup = Task.Run(async () => { await start.Task; return await RepositoryLeases.AcquireSharedAsync(repo.Store, "backup"); });
            start.SetResult();
            RepositoryLease? gcLease = null, backupLease = null;
            try { gcLease = await gc; } catch (BackupException e) { Assert.Equal(BackupExitCodes.Locked, e.ExitCode); }
            try { backupLease = await backup; } catch (BackupException e) { Assert.Equal(BackupExitCodes.Locked, e.ExitCode); }
            if (gcLease is not null && backupLease is not null) both++;
            if (gcLease is not null) collections++;
            if (backupLease is not null) backups++;
            if (gcLease is not null) await gcLease.DisposeAsync();
            if (backupLease is not null) await backupLease.DisposeAsync();
            Assert.Empty(Directory.GetFiles(Path.Combine(_dir, "locks"), "*", SearchOption.AllDirectories));
        }
        Assert.Equal(0, both);
        Assert.True(backups + collections > 0);
    }
}
