using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;

namespace Strata.Backup.Chunks;

/// <summary>
/// One backup run into a chunk repository: every disk at one point in time, always pulled (the source freezes the
/// disks with fleecing overlays and exports them over NBD; this tool reads and chunks them). A full reads every
/// chunk the frozen disk has data in; an incremental starts from the last point's chunk list and reads only the
/// chunks the old bitmap marks — each one whole, from the frozen view, never from the repository. Chunks the
/// repository already holds are not uploaded, so a full of an unchanged disk uploads nothing. The point exists once
/// its index is published, after every chunk; the bitmaps rotate as for a chain repository (<see cref="SourceBitmaps"/>).
/// </summary>
public sealed class ChunkBackupRunner(ChunkRepository repo, BackupRunOptions options, IBackupProgress progress)
{
    private const string Allocation = "base:allocation";
    private const uint AllocationZero = 2, DirtyFlag = 1;

    /// <summary>Chunks read and uploaded at once, per disk.</summary>
    public int InFlight { get; init; } = 8;

    /// <summary>Where the fleecing overlays and the run's NBD socket go: a local folder the source can reach (the
    /// repository may be a bucket).</summary>
    public string ScratchDir { get; init; } = Path.GetTempPath();

    /// <summary>Testing: wait this long with every chunk uploaded before publishing the point (to kill the run there,
    /// or race it with GC).</summary>
    public TimeSpan? HoldBeforeCommit { get; init; }

    private sealed class DiskPlan
    {
        public required string Disk;
        public required SourceNode Node;
        public ChunkPoint? HeadPoint;
        public ChunkDisk? Head;
        public bool Incremental;
        public string? Note;
        public required string NewBitmap;
        public ChunkId[] Chunks = [];
        public long Copied, Uploaded, UploadedChunks;
    }

    public async Task<ChunkPoint> RunAsync()
    {
        if (options.Disks.Count == 0) throw new BackupException("no disk given", "name the source's node(s) with --disk NODE", BackupExitCodes.Usage);
        if (options.Disks.Distinct().Count() != options.Disks.Count) throw new BackupException("a disk is named twice", exitCode: BackupExitCodes.Usage);
        if (options.Level is not ("auto" or "full" or "inc")) throw new BackupException($"unknown level '{options.Level}'", "use full, inc or auto", BackupExitCodes.Usage);
        if (options.InjectTargetErrno is not null) throw new BackupException("a chunk repository is written by this tool, not by the source: no push targets to fail", exitCode: BackupExitCodes.Usage);

        await using var source = await QmpSource.ConnectAsync(options.Socket);
        var heads = new Dictionary<string, (ChunkPoint Point, ChunkDisk Disk)?>();
        foreach (string disk in options.Disks) heads[disk] = await repo.LatestAsync(disk);
        await SourceBitmaps.RecoverAsync(source,
            heads.ToDictionary(h => h.Key, h => h.Value?.Disk.Bitmap is { } b && b.StartsWith(repo.BitmapPrefix, StringComparison.Ordinal) ? b : null),
            repo.BitmapPrefix, progress);

        var now = DateTimeOffset.UtcNow;
        string id = await repo.NewIdAsync(now);
        var plans = new List<DiskPlan>();
        foreach (string disk in options.Disks) plans.Add(await PlanAsync(source, disk, id, heads[disk]));
        foreach (var p in plans)
            progress.Message($"{p.Disk}: {(p.Incremental ? $"incremental on {p.HeadPoint!.Id}" : "full")} (pull, chunks of {Sizes(repo.ChunkSize)}){(p.Note is null ? "" : " — " + p.Note)}");

        await using var session = await repo.BeginBackupAsync();
        ChunkPoint point;
        bool ok = false;
        try
        {
            // Named by the process and a random tag: a run killed before its clean-up leaves its overlay in the shared
            // scratch folder, still open in the source, and a later run that got the same process id must not take it
            // (the source refused the write lock: seen in a test run once the machine's process ids had wrapped).
            string run = $"{Environment.ProcessId}-{Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(4))}";
            var frozenDisks = plans.Select(p => new FrozenSource.Disk(p.Disk, p.Node, p.NewBitmap, p.Incremental ? p.Head!.Bitmap : null,
                Path.Combine(ScratchDir, $"strata-fleece-{run}-{p.Disk}.qcow2"))).ToList();
            string ownSocket = SocketPaths.ForRun(Path.Combine(ScratchDir, $"strata-nbd-{run}.sock"), "chunks");
            await using (var frozen = await FrozenSource.FreezeAsync(source, frozenDisks, options.Nbd, ownSocket, "if it already runs one, pass its address with --nbd"))
                await Task.WhenAll(plans.Select(p => CopyDiskAsync(p, session, frozen.NbdAddress, frozen.DirtyContext(p.Disk))));
            await session.FlushJournalAsync();
            point = new ChunkPoint
            {
                Id = id,
                Time = now,
                Disks = plans.Select(p => new ChunkDisk
                {
                    Disk = p.Disk,
                    VirtualSize = p.Node.VirtualSize,
                    Level = p.Incremental ? "inc" : "full",
                    Parent = p.HeadPoint?.Id,
                    Mode = "pull",
                    Source = options.Socket.Contains('/') || File.Exists(options.Socket) ? Path.GetFullPath(options.Socket) : options.Socket,
                    Node = p.Disk,
                    Bitmap = p.NewBitmap,
                    Note = p.Note,
                    CopiedBytes = p.Copied,
                    UploadedBytes = p.Uploaded,
                    UploadedChunks = p.UploadedChunks,
                    Chunks = p.Chunks,
                }).ToList(),
            };
            if (HoldBeforeCommit is { } hold)
            {
                progress.Message($"holding before commit for {hold.TotalSeconds:0} s (testing)");
                await Task.Delay(hold);
            }
            await session.CommitAsync(point);
            ok = true;
        }
        finally
        {
            // Keep every bitmap able to produce a correct next incremental; the chunks uploaded stay for a rerun to reuse.
            if (!ok)
                foreach (var p in plans)
                    await SourceBitmaps.RollBackAsync(source, p.Disk, p.NewBitmap, p.Incremental ? p.Head!.Bitmap : null, progress);
        }
        // Only now that the new point is published may the bitmaps of the old ones go.
        foreach (var p in plans) await SourceBitmaps.DropOldAsync(source, p.Disk, repo.BitmapPrefix, p.NewBitmap);
        return point;
    }

    private async Task<DiskPlan> PlanAsync(QmpSource source, string disk, string id, (ChunkPoint Point, ChunkDisk Disk)? head)
    {
        var node = await source.NodeAsync(disk);
        if (node.VirtualSize <= 0) throw new BackupException($"node '{disk}' has no size", "name a format node (qcow2, raw), not a protocol node", BackupExitCodes.Usage);
        string? why = null;
        if (head is null) why = "no earlier backup of this disk";
        else if (options.Level == "full") why = null;
        else if (node.VirtualSize != head.Value.Disk.VirtualSize) why = $"the disk changed size ({head.Value.Disk.VirtualSize} -> {node.VirtualSize} bytes)";
        // A point copied in from another repository names that repository's bitmap: reading it would stop another
        // chain's tracking. This repository's own bitmap starts with the next point.
        else if (!head.Value.Disk.Bitmap.StartsWith(repo.BitmapPrefix, StringComparison.Ordinal))
            why = $"the last point was copied from another repository, whose bitmap '{head.Value.Disk.Bitmap}' is not this repository's";
        else why = SourceBitmaps.WhyUnusable(node, head.Value.Disk.Bitmap);
        bool inc = options.Level != "full" && why is null;
        if (options.Level == "inc" && !inc)
            throw new BackupException($"{disk}: cannot take an incremental: {why}", "run with --level full (or auto)", BackupExitCodes.Failed);
        return new DiskPlan
        {
            Disk = disk,
            Node = node,
            HeadPoint = head?.Point,
            Head = head?.Disk,
            Incremental = inc,
            // Every point is a whole chunk list: a full of a disk the repository has seen uploads only what changed.
            Note = options.Level == "auto" && !inc && head is not null ? $"full because {why}; chunks the repository holds are not uploaded again" : null,
            NewBitmap = repo.BitmapPrefix + id,
        };
    }

    private async Task CopyDiskAsync(DiskPlan p, ChunkBackupSession session, string nbd, string? dirtyContext)
    {
        var contexts = dirtyContext is null ? new[] { Allocation } : [Allocation, dirtyContext];
        await using var client = await PullCopier.ConnectExportAsync(nbd, FrozenSource.ExportName(p.Disk), contexts);
        long size = client.Size, chunkSize = repo.ChunkSize;
        if (size != p.Node.VirtualSize) throw new BackupException($"the export of {p.Disk} is {size} bytes but the disk is {p.Node.VirtualSize}");
        if (dirtyContext is not null && !client.Contexts.ContainsKey(dirtyContext))
            throw new BackupException($"the export does not offer {dirtyContext}", "the source must export the bitmap (block-export-add bitmaps)", BackupExitCodes.Source);
        int count = checked((int)((size + chunkSize - 1) / chunkSize));
        if (p.Incremental && p.Head!.Chunks.Count != count)
            throw new BackupException($"{p.Disk}: the last point lists {p.Head.Chunks.Count} chunks, the disk has {count}", "run with --level full");
        p.Chunks = p.Incremental ? [.. p.Head!.Chunks] : new ChunkId[count];

        // Which chunks to read: those the bitmap touches (incremental) or all (full); of them, those the frozen disk
        // reads as zeros throughout need no read at all.
        var read = new bool[count];
        if (dirtyContext is null) Array.Fill(read, true);
        else
            foreach (var (offset, length) in await client.ExtentsWithFlagAsync(dirtyContext, DirtyFlag))
                for (long c = offset / chunkSize; c <= (offset + length - 1) / chunkSize; c++) read[c] = true;
        var wholeZero = new bool[count];
        foreach (var (offset, length) in await client.ExtentsWithFlagAsync(Allocation, AllocationZero))
            for (long c = (offset + chunkSize - 1) / chunkSize; c < count && Math.Min((c + 1) * chunkSize, size) <= offset + length; c++)
                wholeZero[c] = true;

        long total = 0;
        for (int c = 0; c < count; c++) if (read[c]) total += ChunkLength(c);
        long done = 0;
        progress.Start(p.Disk, total);
        using var slots = new SemaphoreSlim(InFlight);
        var running = new List<Task>();
        try
        {
            for (int c = 0; c < count; c++)
            {
                if (!read[c]) continue;
                int length = ChunkLength(c);
                if (wholeZero[c])
                {
                    p.Chunks[c] = default;
                    progress.Advance(p.Disk, Interlocked.Add(ref done, length));
                    continue;
                }
                await slots.WaitAsync();
                if (running.FirstOrDefault(t => t.IsFaulted) is { } failed) await failed;
                running.RemoveAll(t => t.IsCompletedSuccessfully);
                int index = c;
                running.Add(Task.Run(async () =>
                {
                    try
                    {
                        var buffer = new byte[length];
                        for (int at = 0; at < length; at += NbdConst.MaxPayload)
                            await client.ReadAsync((long)index * chunkSize + at, buffer.AsMemory(at, Math.Min(NbdConst.MaxPayload, length - at)));
                        var put = await session.StoreChunkAsync(buffer);
                        p.Chunks[index] = put.Id;
                        Interlocked.Add(ref p.Copied, length);
                        if (put.UploadedBytes > 0)
                        {
                            Interlocked.Add(ref p.Uploaded, put.UploadedBytes);
                            Interlocked.Increment(ref p.UploadedChunks);
                        }
                        progress.Advance(p.Disk, Interlocked.Add(ref done, length));
                    }
                    finally
                    {
                        slots.Release();
                    }
                }));
            }
            await Task.WhenAll(running);
        }
        catch
        {
            // No read may still use the connection once it is disposed.
            try { await Task.WhenAll(running); } catch (Exception) { }
            throw;
        }
        progress.Finish(p.Disk);

        int ChunkLength(long c) => (int)Math.Min(chunkSize, size - c * chunkSize);
    }

    private static string Sizes(long bytes) => bytes >= 1 << 20 && bytes % (1 << 20) == 0 ? $"{bytes >> 20} MiB" : $"{bytes >> 10} KiB";
}
