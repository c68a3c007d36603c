using System.Collections.Concurrent;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Backup.Chunks;

/// <summary>Restores one disk of one point of a chunk repository into a new raw or qcow2 file.</summary>
public static class ChunkRestorer
{
    /// <summary>Chunks fetched at once: a round trip per chunk dominates on an object store.</summary>
    public const int ReadersInFlight = 8;

    public static void Restore(ChunkRepository repo, ChunkPoint point, string disk, string to, string format, Action<long, long>? progress = null)
    {
        if (format is not ("qcow2" or "raw")) throw new BackupException($"unknown output format '{format}'", "use -O qcow2 or -O raw", BackupExitCodes.Usage);
        if (File.Exists(to)) throw new BackupException($"'{to}' already exists", "restore into a new file; a restore never overwrites", BackupExitCodes.Usage);
        using var source = repo.OpenDisk(point, disk, cacheChunks: 2 * ReadersInFlight);
        string partial = to + Repository.PartialSuffix;
        try
        {
            using (BlockImage target = format == "qcow2" ? Qcow2Image.Create(partial, new Qcow2CreateOptions { Size = source.Size }) : RawImage.Create(partial, source.Size))
            {
                // Zero chunks are holes in the source's block status: the new file stays sparse there.
                ImageConverter.Convert([source], target, new ConvertOptions { Progress = progress, Workers = ReadersInFlight, ChunkSize = Math.Min(repo.ChunkSize, 4 << 20) });
                target.Flush();
            }
            File.Move(partial, to);
        }
        finally
        {
            File.Delete(partial);
        }
    }
}

/// <summary>One thing verify found wrong: a point index, or a chunk as one disk of one point uses it.</summary>
public sealed record ChunkVerifyProblem(string? Point, string? Disk, string? Chunk, string What);

/// <summary>What verify looked at.</summary>
public sealed record ChunkVerifyReport(int Points, long DistinctChunks, long ChunksRead, IReadOnlyList<ChunkVerifyProblem> Problems);

/// <summary>
/// Re-checks a chunk repository: every point index is read and checked, every chunk a point names must be listed in
/// the store, and every distinct chunk (or a random <c>sample</c> fraction of them) is read back, decrypted,
/// decompressed and re-hashed against its id. A bad chunk is reported once for each disk of each point that uses it.
/// </summary>
public static class ChunkVerifier
{
    public static async Task<ChunkVerifyReport> VerifyAsync(ChunkRepository repo, double sample = 1.0, Action<string>? log = null, CancellationToken cancel = default)
    {
        if (sample is <= 0 or > 1 || double.IsNaN(sample)) throw new BackupException($"--sample must be in (0, 1], not {sample}", exitCode: BackupExitCodes.Usage);
        var problems = new ConcurrentBag<ChunkVerifyProblem>();
        var points = new List<ChunkPoint>();
        await foreach (var o in repo.Store.ListAsync(ChunkRepository.PointsPrefix, cancel).ConfigureAwait(false))
        {
            string id = o.Key[ChunkRepository.PointsPrefix.Length..];
            try
            {
                if (await repo.ReadPointAsync(id, cancel).ConfigureAwait(false) is { } p) points.Add(p);
                log?.Invoke($"checking point {id}");
            }
            catch (ChunkIntegrityException e)
            {
                problems.Add(new ChunkVerifyProblem(id, null, null, e.Message));
            }
        }

        // Who uses each chunk, to name them when it is bad.
        var users = new Dictionary<ChunkId, List<(string Point, string Disk, int Length)>>();
        foreach (var p in points)
            foreach (var d in p.Disks)
                for (int i = 0; i < d.Chunks.Count; i++)
                {
                    var c = d.Chunks[i];
                    if (c.IsZero) continue;
                    if (!users.TryGetValue(c, out var list)) users[c] = list = [];
                    if (list.Count == 0 || list[^1].Point != p.Id || list[^1].Disk != d.Disk)
                        list.Add((p.Id, d.Disk, (int)Math.Min(repo.ChunkSize, d.VirtualSize - (long)i * repo.ChunkSize)));
                }

        var stored = new HashSet<ChunkId>();
        await foreach (var o in repo.Store.ListAsync(ChunkRepository.ChunksPrefix, cancel).ConfigureAwait(false))
            if (ChunkId.TryParse(o.Key[(o.Key.LastIndexOf('/') + 1)..], out var id)) stored.Add(id);

        void Bad(ChunkId id, string what)
        {
            foreach (var (point, disk, _) in users[id]) problems.Add(new ChunkVerifyProblem(point, disk, id.ToString(), what));
        }

        var present = new List<ChunkId>();
        foreach (var id in users.Keys)
            if (stored.Contains(id)) present.Add(id);
            else Bad(id, $"chunk {id} is missing from the repository");

        var toRead = present;
        if (sample < 1.0)
        {
            int count = Math.Max(present.Count == 0 ? 0 : 1, (int)Math.Ceiling(present.Count * sample));
            toRead = present.OrderBy(_ => Random.Shared.Next()).Take(count).ToList();
        }
        long read = 0;
        await Parallel.ForEachAsync(toRead, new ParallelOptions { MaxDegreeOfParallelism = ChunkRestorer.ReadersInFlight, CancellationToken = cancel }, async (id, ct) =>
        {
            // A chunk's last-chunk users may want a shorter length than the full ones: each length is checked.
            foreach (int length in users[id].Select(u => u.Length).Distinct())
            {
                try
                {
                    await repo.ReadChunkAsync(id, length, ct).ConfigureAwait(false);
                }
                catch (ChunkIntegrityException e)
                {
                    Bad(id, e.Message);
                    break;
                }
            }
            Interlocked.Increment(ref read);
        }).ConfigureAwait(false);
        var ordered = problems.OrderBy(p => p.Point, StringComparer.Ordinal).ThenBy(p => p.Disk, StringComparer.Ordinal).ThenBy(p => p.Chunk, StringComparer.Ordinal).ToList();
        return new ChunkVerifyReport(points.Count, users.Count, read, ordered);
    }
}

/// <summary>Retention over a chunk repository: the same rules as the chain repository, applied per disk; a point is
/// kept when any of its disks' rules keeps it. Only point indexes are deleted; garbage collection frees the chunks.</summary>
public static class ChunkPruner
{
    public static async Task<List<ChunkPoint>> PruneAsync(ChunkRepository repo, RetentionPolicy policy, Action<string>? log = null, bool dryRun = false, CancellationToken cancel = default)
    {
        var points = await repo.PointsAsync(cancel).ConfigureAwait(false);
        var keep = new HashSet<string>();
        foreach (var disk in points.SelectMany(p => p.Disks.Select(d => d.Disk)).Distinct())
            keep.UnionWith(policy.Keep(points.Where(p => p.Disk(disk) is not null).Select(p => (p.Id, p.Time))));
        var removed = points.Where(p => !keep.Contains(p.Id)).ToList();
        foreach (var p in removed)
        {
            log?.Invoke($"{p.Id} ({string.Join(", ", p.Disks.Select(d => d.Disk))}): remove");
            if (!dryRun) await repo.Store.DeleteAsync(ChunkRepository.PointKey(p.Id), cancel).ConfigureAwait(false);
        }
        return removed;
    }
}

/// <summary>What a garbage collection did.</summary>
public sealed record ChunkGcReport(int Points, long ReferencedChunks, long DeletedChunks, long FreedBytes, long KeptWithinGrace);

/// <summary>
/// Mark and sweep (object-storage §5.4): under the exclusive lease, once no backup holds a shared one, every chunk
/// that no point references and that was stored before <c>T0 − grace</c> is deleted. The grace keeps the chunks of a
/// backup that has written but not yet published (a paused one whose lease lapsed, or a clock that is off).
/// </summary>
public static class ChunkGarbageCollector
{
    public static readonly TimeSpan DefaultGrace = TimeSpan.FromHours(1);
    public static readonly TimeSpan DefaultWaitForBackups = TimeSpan.FromMinutes(10);

    public static async Task<ChunkGcReport> CollectAsync(ChunkRepository repo, TimeSpan grace, TimeSpan waitForBackups, Action<string>? log = null,
        TimeSpan? pollInterval = null, CancellationToken cancel = default)
    {
        if (grace < TimeSpan.Zero) throw new BackupException("the grace period cannot be negative", exitCode: BackupExitCodes.Usage);
        await using var lease = await RepositoryLeases.AcquireExclusiveAsync(repo.Store, "gc", waitForBackups, pollInterval: pollInterval, cancel: cancel).ConfigureAwait(false);
        var t0 = DateTimeOffset.UtcNow;
        var points = await repo.PointsAsync(cancel).ConfigureAwait(false);
        var referenced = new HashSet<ChunkId>();
        foreach (var p in points)
            foreach (var d in p.Disks)
                foreach (var id in d.Chunks)
                    if (!id.IsZero) referenced.Add(id);
        log?.Invoke($"marked {referenced.Count} chunk(s) referenced by {points.Count} point(s)");

        var doomed = new List<StoredObject>();
        long tooNew = 0;
        await foreach (var o in repo.Store.ListAsync(ChunkRepository.ChunksPrefix, cancel).ConfigureAwait(false))
        {
            if (!ChunkId.TryParse(o.Key[(o.Key.LastIndexOf('/') + 1)..], out var id) || referenced.Contains(id)) continue;
            if (o.LastModified < t0 - grace) doomed.Add(o);
            else tooNew++;
        }
        long deleted = 0, freed = 0;
        foreach (var batch in doomed.Chunk(256))
        {
            // Never delete on a lease that is gone: a backup may be writing again.
            await lease.CheckAsync(cancel).ConfigureAwait(false);
            await Parallel.ForEachAsync(batch, new ParallelOptions { MaxDegreeOfParallelism = 8, CancellationToken = cancel }, async (o, ct) =>
            {
                await repo.Store.DeleteAsync(o.Key, ct).ConfigureAwait(false);
                Interlocked.Increment(ref deleted);
                Interlocked.Add(ref freed, o.Size);
            }).ConfigureAwait(false);
        }
        // No backup runs while the exclusive lease is held, so every upload journal is a finished or killed run's: its
        // chunks are referenced now, or swept, or kept within the grace (a rerun then uploads them again, create-only).
        foreach (var (_, keys) in await UploadJournal.ListAsync(repo.Store, cancel).ConfigureAwait(false))
            foreach (string key in keys)
                await repo.Store.DeleteAsync(key, cancel).ConfigureAwait(false);
        return new ChunkGcReport(points.Count, referenced.Count, deleted, freed, tooNew);
    }
}

/// <summary>What a copy did.</summary>
public sealed record ChunkCopyReport(int PointsCopied, int PointsPresent, long ChunksUploaded, long BytesUploaded);

/// <summary>
/// Copies points into a chunk repository: from another chunk repository (every chunk read, checked and re-encoded
/// under the destination's keys, sent only when the destination lacks it), or from a chain folder repository (each
/// disk of each point read through its qcow2 backing chain). A point's index is published after all its chunks;
/// points the destination already has are skipped, so running it again after an interruption finishes the job.
/// </summary>
public static class ChunkCopier
{
    private const int InFlight = 8;

    public static async Task<ChunkCopyReport> CopyAsync(ChunkRepository source, ChunkRepository destination, Action<string>? log = null, CancellationToken cancel = default)
    {
        var have = (await destination.PointsAsync(cancel).ConfigureAwait(false)).Select(p => p.Id).ToHashSet();
        var points = await source.PointsAsync(cancel).ConfigureAwait(false);
        int copied = 0;
        await using var session = await destination.BeginBackupAsync(cancel).ConfigureAwait(false);
        // Source id → destination id (the two repositories' id keys differ): a chunk shared by points is read once.
        var mapped = new ConcurrentDictionary<ChunkId, ChunkId>();
        foreach (var point in points)
        {
            if (have.Contains(point.Id))
            {
                log?.Invoke($"{point.Id}: already present");
                continue;
            }
            var disks = new List<ChunkDisk>();
            foreach (var disk in point.Disks)
            {
                var ids = source.ChunkSize == destination.ChunkSize
                    ? await CopyChunksAsync(source, disk, session, mapped, cancel).ConfigureAwait(false)
                    : await RechunkAsync(source, point, disk, session, cancel).ConfigureAwait(false);
                disks.Add(disk with { Chunks = ids });
            }
            await session.CommitAsync(point with { Disks = disks }, cancel).ConfigureAwait(false);
            copied++;
            log?.Invoke($"{point.Id}: copied ({string.Join(", ", point.Disks.Select(d => d.Disk))})");
        }
        return new ChunkCopyReport(copied, points.Count - copied, session.UploadedChunks, session.UploadedBytes);
    }

    /// <summary>Same chunk size: chunk for chunk, each read once (ids differ between repositories: their keys do).</summary>
    private static async Task<ChunkId[]> CopyChunksAsync(ChunkRepository source, ChunkDisk disk, ChunkBackupSession session,
        ConcurrentDictionary<ChunkId, ChunkId> mapped, CancellationToken cancel)
    {
        var ids = new ChunkId[disk.Chunks.Count];
        await Parallel.ForEachAsync(Enumerable.Range(0, ids.Length), new ParallelOptions { MaxDegreeOfParallelism = InFlight, CancellationToken = cancel }, async (i, ct) =>
        {
            var id = disk.Chunks[i];
            if (id.IsZero || mapped.TryGetValue(id, out ids[i])) return;
            int length = (int)Math.Min(source.ChunkSize, disk.VirtualSize - (long)i * source.ChunkSize);
            ids[i] = mapped[id] = await session.PutChunkAsync(await source.ReadChunkAsync(id, length, ct).ConfigureAwait(false), ct).ConfigureAwait(false);
        }).ConfigureAwait(false);
        return ids;
    }

    /// <summary>Another chunk size: the disk read as an image and cut into the destination's chunks.</summary>
    private static async Task<ChunkId[]> RechunkAsync(ChunkRepository source, ChunkPoint point, ChunkDisk disk, ChunkBackupSession session, CancellationToken cancel)
    {
        using var image = source.OpenDisk(point, disk.Disk, cacheChunks: 2 * InFlight);
        return await ChunkImageAsync(image, session, cancel).ConfigureAwait(false);
    }

    /// <summary>Every chunk of an image stored through the session, several in flight; the ids in disk order.</summary>
    private static async Task<ChunkId[]> ChunkImageAsync(BlockImage image, ChunkBackupSession session, CancellationToken cancel)
    {
        int chunkSize = session.Repository.ChunkSize;
        var ids = new ChunkId[(image.Size + chunkSize - 1) / chunkSize];
        await Parallel.ForEachAsync(Enumerable.Range(0, ids.Length), new ParallelOptions { MaxDegreeOfParallelism = InFlight, CancellationToken = cancel }, async (i, ct) =>
        {
            long offset = (long)i * chunkSize;
            var buffer = new byte[(int)Math.Min(chunkSize, image.Size - offset)];
            image.Read(offset, buffer);
            ids[i] = await session.PutChunkAsync(buffer, ct).ConfigureAwait(false);
        }).ConfigureAwait(false);
        return ids;
    }

    public static async Task<ChunkCopyReport> CopyFromChainAsync(Repository source, ChunkRepository destination, Action<string>? log = null, CancellationToken cancel = default)
    {
        using var held = source.Lock();
        var have = (await destination.PointsAsync(cancel).ConfigureAwait(false)).Select(p => p.Id).ToHashSet();
        var runs = source.AllPoints().GroupBy(m => m.Id).OrderBy(g => g.Min(m => m.Time)).ThenBy(g => g.Key, StringComparer.Ordinal).ToList();
        int copied = 0;
        await using var session = await destination.BeginBackupAsync(cancel).ConfigureAwait(false);
        foreach (var run in runs)
        {
            if (have.Contains(run.Key))
            {
                log?.Invoke($"{run.Key}: already present");
                continue;
            }
            var disks = new List<ChunkDisk>();
            foreach (var m in run.OrderBy(m => m.Disk, StringComparer.Ordinal))
            {
                source.ChainOf(m); // a broken chain fails here, with the chain repository's message
                using var image = ImageOpener.Open(source.FilePath(m), "qcow2", readOnly: true);
                var ids = await ChunkImageAsync(image, session, cancel).ConfigureAwait(false);
                disks.Add(new ChunkDisk
                {
                    Disk = m.Disk, VirtualSize = image.Size, Level = m.Level, Parent = m.Parent, Mode = m.Mode, Source = m.Source, Node = m.Node,
                    Bitmap = m.Bitmap, Note = m.Note, CopiedBytes = m.CopiedBytes, Chunks = ids,
                });
            }
            var first = run.First();
            await session.CommitAsync(new ChunkPoint { Id = run.Key, Time = first.Time, Disks = disks }, cancel).ConfigureAwait(false);
            copied++;
            log?.Invoke($"{run.Key}: copied ({string.Join(", ", disks.Select(d => d.Disk))})");
        }
        return new ChunkCopyReport(copied, runs.Count - copied, session.UploadedChunks, session.UploadedBytes);
    }
}
