using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Backup;
using Strata.Protocol.Qmp;

namespace Strata.Backup;

/// <summary>What `strata backup run` is asked to do.</summary>
public sealed record BackupRunOptions
{
    /// <summary>QMP address: a unix socket path or HOST:PORT.</summary>
    public required string Socket { get; init; }
    public required IReadOnlyList<string> Disks { get; init; }
    /// <summary>"auto", "full" or "inc".</summary>
    public string Level { get; init; } = "auto";
    /// <summary>"push" (the source's backup job writes the file) or "pull" (fleecing + NBD, this tool writes it).</summary>
    public string Mode { get; init; } = "push";
    /// <summary>Pull mode: the address of an NBD server the source already runs (unix path or HOST:PORT);
    /// null starts one for the run on a socket in the repository.</summary>
    public string? Nbd { get; init; }
    /// <summary>Testing hook: wrap each push target's file in blkdebug failing writes with this errno.</summary>
    public int? InjectTargetErrno { get; init; }
}

/// <summary>Where a run reports what it does; the CLI draws bars or prints lines.</summary>
public interface IBackupProgress
{
    void Message(string text);
    void Start(string disk, long total);
    void Advance(string disk, long done);
    void Finish(string disk);
}

/// <summary>
/// One backup run: every disk at one point in time, in one QMP transaction. Push mode lets the source's backup
/// job write a qcow2 the tool created (backed by the previous point); pull mode freezes the disks with a
/// fleecing overlay, exports the frozen view over NBD and copies the dirty extents itself. Bitmaps are named
/// after the point they start at: a new one is added at every point, the old one is removed only after the
/// new point's manifest is on disk, and any failure merges the new bitmap back into the old — so the next
/// incremental is always complete.
/// </summary>
public sealed class BackupRunner(Repository repo, BackupRunOptions options, IBackupProgress progress)
{
    private sealed class DiskPlan
    {
        public required string Disk;
        public required SourceNode Node;
        public BackupManifest? Head;
        public bool Incremental;
        /// <summary>An incremental whose changes are found by comparing the disk with the last point (its bitmap
        /// is gone), not read from a bitmap.</summary>
        public bool Differential;
        /// <summary>The last point's granule digests (an incremental carries them over, a differential compares the disk
        /// with them); null when it has none (a point from before they were recorded) or they are damaged.</summary>
        public GranuleDigests? HeadDigests;
        /// <summary>Why the last point's digests cannot be used, when it has none or they are damaged.</summary>
        public string? HeadDigestsProblem;
        /// <summary>The disk's digests as a differential read them (the new point's, with no need to build them).</summary>
        public GranuleDigests? DiskDigests;
        public string? Note;
        public required string NewBitmap;
        public required string PartialPath;
        public required string FinalName;
        public string JobId => "strata-job-" + Disk;
        public string TargetNode => "strata-tgt-" + Disk;
        public string ExportId => "strata-exp-" + Disk;
        public string ExportName => "strata-" + Disk;
        public string? FleecePath;
        public long Copied;
    }

    /// <summary>
    /// The granularity of the digests a new chain records: the backup files' cluster size, which is also the coarsest
    /// granularity a new bitmap gets by default (QEMU's rule, and Strata's: the disk's cluster size clamped to
    /// 4–64 KiB). Finer digests would not save a byte — a point is written in whole clusters — and whole clusters let a
    /// differential write its point without reading the last one. Only a disk too large for one set (over 8 TiB)
    /// gets coarser ones.
    /// </summary>
    public const int PointClusterSize = 65536;

    internal static long DigestGranularityFor(long diskSize) => GranuleDigests.GranularityFor(diskSize, PointClusterSize);

    /// <summary>The mode the run uses: the one asked for, or pull when a disk needs a differential.</summary>
    private string _mode = options.Mode;

    public async Task<IReadOnlyList<BackupManifest>> RunAsync()
    {
        if (options.Disks.Count == 0) throw new BackupException("no disk given", "name the source's node(s) with --disk NODE", BackupExitCodes.Usage);
        if (options.Disks.Distinct().Count() != options.Disks.Count) throw new BackupException("a disk is named twice", exitCode: BackupExitCodes.Usage);
        if (options.Level is not ("auto" or "full" or "inc")) throw new BackupException($"unknown level '{options.Level}'", "use full, inc or auto", BackupExitCodes.Usage);
        if (options.Mode is not ("push" or "pull")) throw new BackupException($"unknown mode '{options.Mode}'", "use push or pull", BackupExitCodes.Usage);
        using var held = repo.Lock();
        await using var source = await QmpSource.ConnectAsync(options.Socket);
        await RecoverAsync(source);
        foreach (var leftover in repo.CleanLeftovers()) progress.Message($"removed {leftover}, left by an interrupted run");

        var now = DateTimeOffset.UtcNow;
        string id = repo.NewId(now);
        var plans = new List<DiskPlan>();
        foreach (string disk in options.Disks) plans.Add(await PlanAsync(source, disk, id));
        // A differential reads the frozen disk itself: the run pulls.
        _mode = plans.Any(p => p.Differential) ? "pull" : options.Mode;
        foreach (var p in plans)
            progress.Message($"{p.Disk}: {(p.Incremental ? $"incremental on {p.Head!.Id}" : "full")} ({_mode}){(p.Note is null ? "" : " — " + p.Note)}");

        bool ok = false;
        try
        {
            if (_mode == "push") await PushAsync(source, plans);
            else await PullAsync(source, plans);
            ok = true;
        }
        finally
        {
            if (!ok)
            {
                // Keep every bitmap able to produce a correct next incremental, drop the unfinished files.
                await RestoreBitmapsAsync(source, plans);
                foreach (var p in plans)
                {
                    File.Delete(p.PartialPath);
                    if (p.FleecePath is not null) File.Delete(p.FleecePath);
                }
            }
        }

        var manifests = new List<BackupManifest>();
        foreach (var p in plans) manifests.Add(Commit(p, id, now));
        // Only now that the new points are on disk may the bitmaps of the old ones go.
        foreach (var p in plans)
            foreach (var b in (await source.NodeAsync(p.Disk)).Bitmaps.Where(b => b.Name.StartsWith(repo.BitmapPrefix, StringComparison.Ordinal) && b.Name != p.NewBitmap))
                await source.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = p.Disk, ["name"] = b.Name });
        return manifests;
    }

    private async Task<DiskPlan> PlanAsync(QmpSource source, string disk, string id)
    {
        var node = await source.NodeAsync(disk);
        if (node.VirtualSize <= 0) throw new BackupException($"node '{disk}' has no size", "name a format node (qcow2, raw), not a protocol node", BackupExitCodes.Usage);
        var head = repo.Points(disk).LastOrDefault();
        string? why = null, bitmapLost = null;
        if (head is null) why = "no earlier backup of this disk";
        else if (options.Level == "full") why = null;
        else if (node.VirtualSize != head.VirtualSize) why = $"the disk changed size ({head.VirtualSize} -> {node.VirtualSize} bytes)";
        else if (!File.Exists(repo.FilePath(head))) why = $"the previous backup file {head.File} is missing";
        else if (node.Bitmaps.FirstOrDefault(b => b.Name == head.Bitmap) is not { } bitmap) bitmapLost = $"bitmap '{head.Bitmap}' is missing on the source (daemon restarted without it, or removed)";
        else if (bitmap.Inconsistent) bitmapLost = $"bitmap '{head.Bitmap}' is inconsistent (the source was not shut down cleanly)";
        else if (!bitmap.Recording) bitmapLost = $"bitmap '{head.Bitmap}' is disabled, so it missed writes";
        bool inc = options.Level != "full" && why is null;
        if (options.Level == "inc" && !inc)
            throw new BackupException($"{disk}: cannot take an incremental: {why}", "run with --level full (or auto) to start a new chain", BackupExitCodes.Failed);
        string dir = repo.DiskDir(disk);
        Directory.CreateDirectory(dir);
        var (headDigests, digestsProblem) = PointCommit.HeadDigests(repo, inc ? head : null);
        return new DiskPlan
        {
            Disk = disk,
            Node = node,
            Head = inc ? head : null,
            Incremental = inc,
            // Without its bitmap the last point is still there to compare with: only what differs is copied.
            Differential = inc && bitmapLost is not null,
            HeadDigests = headDigests,
            HeadDigestsProblem = digestsProblem,
            Note = bitmapLost is not null && inc
                ? "differential by comparison because " + bitmapLost + (headDigests is null ? $"; {digestsProblem}, so it was read back to compare" : "")
                : options.Level == "auto" && !inc && head is not null ? "full because " + why : null,
            NewBitmap = repo.BitmapPrefix + id,
            FinalName = id + ".qcow2",
            PartialPath = Path.Combine(dir, id + ".qcow2" + Repository.PartialSuffix),
        };
    }

    // Persistent where the image can store it, so that the chain survives a clean restart of the source.
    private static JsonNode BitmapAdd(DiskPlan p) =>
        Action("block-dirty-bitmap-add", new JsonObject { ["node"] = p.Disk, ["name"] = p.NewBitmap, ["persistent"] = p.Node.Driver == "qcow2" });

    /// <summary>
    /// One transaction action, typed as a <see cref="JsonNode"/> so that <c>JsonArray.Add</c> takes it as a node:
    /// the generic overload a <see cref="JsonObject"/> would pick goes through reflection-based serialisation,
    /// which native AOT cannot compile.
    /// </summary>
    private static JsonNode Action(string type, JsonObject data) => new JsonObject { ["type"] = type, ["data"] = data };

    private void CreateTarget(DiskPlan p, string path, bool withBacking)
    {
        var create = new Qcow2CreateOptions
        {
            Size = p.Node.VirtualSize,
            ClusterSize = PointClusterSize,
            BackingFile = withBacking && p.Incremental ? p.Head!.File : null,
            BackingFormat = withBacking && p.Incremental ? "qcow2" : null,
        };
        Qcow2Image.Create(path, create).Dispose();
    }

    // ------------------------------------------------------------------ push

    private async Task PushAsync(QmpSource source, List<DiskPlan> plans)
    {
        var actions = new JsonArray();
        foreach (var p in plans)
        {
            CreateTarget(p, p.PartialPath, withBacking: true);
            JsonNode file = new JsonObject { ["driver"] = "file", ["filename"] = p.PartialPath };
            if (options.InjectTargetErrno is { } errno)
                file = new JsonObject { ["driver"] = "blkdebug", ["image"] = file, ["inject-error"] = new JsonArray(new JsonObject { ["event"] = "write_aio", ["errno"] = errno }) };
            await source.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = p.TargetNode, ["file"] = file });
            actions.Add(BitmapAdd(p));
            var backup = new JsonObject { ["job-id"] = p.JobId, ["device"] = p.Disk, ["target"] = p.TargetNode };
            if (p.Incremental)
            {
                // bitmap-mode=never: the old bitmap keeps every bit until the new point is committed.
                backup["sync"] = "bitmap";
                backup["bitmap"] = p.Head!.Bitmap;
                backup["bitmap-mode"] = "never";
            }
            else backup["sync"] = "full";
            actions.Add(Action("blockdev-backup", backup));
        }
        try
        {
            await TransactionAsync(source, actions);
            foreach (var p in plans) progress.Start(p.Disk, p.Node.VirtualSize);
            var outcomes = await source.WaitJobsAsync(plans.Select(p => p.JobId), async () =>
            {
                foreach (var (jobId, _, offset, len) in await source.JobsAsync())
                    if (plans.FirstOrDefault(p => p.JobId == jobId) is { } p) { progress.Start(p.Disk, len); progress.Advance(p.Disk, offset); }
            });
            foreach (var p in plans) progress.Finish(p.Disk);
            ThrowIfAnyFailed(plans, outcomes);
        }
        finally
        {
            foreach (var p in plans) await DeleteNodeAsync(source, p.TargetNode);
        }
    }

    private static async Task TransactionAsync(QmpSource source, JsonArray actions)
    {
        // Not completion-mode=grouped: QEMU refuses it next to bitmap actions. A run is all disks or nothing anyway,
        // since any failed job discards every file of the run and leaves every old bitmap whole.
        var args = new JsonObject { ["actions"] = actions };
        try
        {
            await source.ExecuteAsync("transaction", args);
        }
        catch (QmpException e)
        {
            throw new BackupException($"the source refused the backup transaction: {e.Message} ({e.ErrorClass})", "nothing was started; check the disk names and bitmaps with query-named-block-nodes", BackupExitCodes.Source);
        }
    }

    private static void ThrowIfAnyFailed(List<DiskPlan> plans, IReadOnlyDictionary<string, JobOutcome> outcomes)
    {
        var failed = plans.Where(p => !outcomes[p.JobId].Ok).ToList();
        if (failed.Count == 0) return;
        string why = string.Join("; ", failed.Select(p => $"{p.Disk}: {outcomes[p.JobId].Error ?? "cancelled"}"));
        throw new BackupException($"backup failed: {why}", "nothing was committed and the bitmaps still hold every change; run again once the cause is fixed");
    }

    private static async Task DeleteNodeAsync(QmpSource source, string node)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                await source.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = node });
                return;
            }
            catch (QmpException e) when (e.ErrorClass == "DeviceNotFound" || e.ErrorClass == "GenericError" &&
                                         (e.Message.StartsWith("Failed to find node", StringComparison.Ordinal) || e.Message.Contains("not found", StringComparison.OrdinalIgnoreCase)))
            {
                return; // already gone (QEMU and strata daemon both say "Failed to find node with node-name=…")
            }
            catch (QmpException) when (attempt < 40)
            {
                // A job that just ended may hold the node for a moment longer.
                await Task.Delay(50);
            }
        }
    }

    // ------------------------------------------------------------------ pull

    private async Task PullAsync(QmpSource source, List<DiskPlan> plans)
    {
        string? ownSocket = null;
        string nbd = options.Nbd ?? (ownSocket = SocketPaths.ForRun(Path.Combine(repo.Root, $".nbd-{Environment.ProcessId}.sock"), "pull"));
        if (ownSocket is not null)
        {
            try
            {
                await source.ExecuteAsync("nbd-server-start", new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = ownSocket } } });
            }
            catch (QmpException e)
            {
                throw new BackupException($"cannot start an NBD server on the source: {e.Message}",
                    _mode != options.Mode
                        ? "a differential by comparison reads the disk over NBD: pass the source's NBD server with --nbd (or --level full)"
                        : "if it already runs one, pass its address with --nbd", BackupExitCodes.Source);
            }
        }
        var started = new List<DiskPlan>();
        try
        {
            var actions = new JsonArray();
            foreach (var p in plans)
            {
                p.FleecePath = Path.Combine(repo.DiskDir(p.Disk), Repository.FleecePrefix + p.FinalName);
                CreateTarget(p, p.FleecePath, withBacking: false);
                await source.ExecuteAsync("blockdev-add", new JsonObject
                {
                    ["driver"] = "qcow2", ["node-name"] = p.TargetNode,
                    ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = p.FleecePath },
                    ["backing"] = p.Disk,
                });
                actions.Add(BitmapAdd(p));
                // The old bitmap stops at the freeze point, so that it can be exported read-only; on failure the
                // new one is merged back into it.
                if (p.Incremental && !p.Differential) actions.Add(Action("block-dirty-bitmap-disable", new JsonObject { ["node"] = p.Disk, ["name"] = p.Head!.Bitmap }));
                actions.Add(Action("blockdev-backup", new JsonObject { ["job-id"] = p.JobId, ["device"] = p.Disk, ["target"] = p.TargetNode, ["sync"] = "none" }));
            }
            await TransactionAsync(source, actions);
            started.AddRange(plans);
            foreach (var p in plans)
            {
                var export = new JsonObject { ["type"] = "nbd", ["id"] = p.ExportId, ["node-name"] = p.TargetNode, ["name"] = p.ExportName, ["writable"] = false };
                if (p.Incremental && !p.Differential) export["bitmaps"] = new JsonArray(new JsonObject { ["node"] = p.Disk, ["name"] = p.Head!.Bitmap });
                await source.ExecuteAsync("block-export-add", export);
            }
            await Task.WhenAll(plans.Select(p => PullDiskAsync(p, nbd)));
        }
        finally
        {
            foreach (var p in started)
            {
                try { await source.ExecuteAsync("block-export-del", new JsonObject { ["id"] = p.ExportId, ["mode"] = "hard" }); } catch (QmpException) { }
                await source.WaitEventAsync("BLOCK_EXPORT_DELETED", e => e["data"]?["id"]?.GetValue<string>() == p.ExportId, TimeSpan.FromSeconds(5));
                try { await source.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = p.JobId, ["force"] = true }); } catch (QmpException) { }
            }
            if (started.Count > 0) await source.WaitJobsAsync(started.Select(p => p.JobId), timeout: TimeSpan.FromMinutes(1));
            foreach (var p in plans) await DeleteNodeAsync(source, p.TargetNode);
            foreach (var p in plans) if (p.FleecePath is not null) File.Delete(p.FleecePath);
            if (ownSocket is not null)
            {
                try { await source.ExecuteAsync("nbd-server-stop"); } catch (QmpException) { }
                File.Delete(ownSocket);
            }
        }
    }

    private async Task PullDiskAsync(DiskPlan p, string nbd)
    {
        string? context = p.Incremental && !p.Differential ? "qemu:dirty-bitmap:" + p.Head!.Bitmap : null;
        CreateTarget(p, p.PartialPath, withBacking: true);
        // A differential against digests writes whole clusters only: the last point (the backing file) stays closed.
        bool byDigests = p.Differential && p.HeadDigests is not null;
        using var target = ImageOpener.Open(p.PartialPath, "qcow2", readOnly: false, openBacking: !byDigests);
        // The partial file is thrown away if anything fails, so only the final flush needs to reach the disk.
        if (target is Qcow2Image q) q.File.FlushEnabled = false;
        progress.Start(p.Disk, 0);
        void Progress(long done, long total)
        {
            progress.Start(p.Disk, total);
            progress.Advance(p.Disk, done);
        }
        if (byDigests)
        {
            using var frozen = OpenExport(nbd, p.ExportName);
            (p.Copied, p.DiskDigests) = await Task.Run(() => new DifferentialCopier(frozen).CopyDifferences(target, p.HeadDigests!, Progress));
        }
        else if (p.Differential)
        {
            using var frozen = OpenExport(nbd, p.ExportName);
            using var lastPoint = ImageOpener.Open(repo.FilePath(p.Head!), "qcow2", readOnly: true);
            (p.Copied, p.DiskDigests) = await Task.Run(() =>
                new DifferentialCopier(frozen).CopyDifferences(target, lastPoint, DigestGranularityFor(frozen.Size), Progress));
        }
        else
        {
            p.Copied = await new PullCopier(nbd, p.ExportName, context).CopyAsync(target, Progress);
        }
        if (target is Qcow2Image q2) q2.File.FlushEnabled = true;
        target.Flush();
        progress.Finish(p.Disk);
    }

    /// <summary>The frozen disk as an image read over NBD (unix path or HOST:PORT).</summary>
    private static BlockImage OpenExport(string nbd, string export)
    {
        int colon = nbd.LastIndexOf(':');
        bool tcp = !nbd.Contains('/') && colon > 0 && int.TryParse(nbd[(colon + 1)..], out _);
        try
        {
            return tcp ? Protocol.Nbd.NbdImage.Connect(null, nbd[..colon], int.Parse(nbd[(colon + 1)..]), export, readOnly: true)
                : Protocol.Nbd.NbdImage.Connect(nbd, null, 0, export, readOnly: true);
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException or BlockException)
        {
            throw new BackupException($"cannot read export '{export}' at '{nbd}': {e.Message}", "is the NBD server address right (--nbd)?", BackupExitCodes.Source);
        }
    }

    // ------------------------------------------------------------------ commit and recovery

    private BackupManifest Commit(DiskPlan p, string id, DateTimeOffset time) =>
        PointCommit.Commit(repo, progress, new BackupManifest
        {
            Id = id,
            Disk = p.Disk,
            Time = time,
            Level = p.Incremental ? "inc" : "full",
            Parent = p.Head?.Id,
            File = p.FinalName,
            Mode = _mode,
            Source = options.Socket.Contains('/') || File.Exists(options.Socket) ? Path.GetFullPath(options.Socket) : options.Socket,
            Node = p.Disk,
            Bitmap = p.NewBitmap,
            VirtualSize = p.Node.VirtualSize,
            Note = p.Note,
            CopiedBytes = 0,
            FileSize = 0,
            FileSha256 = "",
            Extents = [],
        }, p.PartialPath, Path.Combine(repo.DiskDir(p.Disk), p.FinalName), p.HeadDigests, p.HeadDigestsProblem, p.DiskDigests);

    /// <summary>On failure: the new bitmaps go, the old ones get back every write (merged) and record again.</summary>
    private async Task RestoreBitmapsAsync(QmpSource source, List<DiskPlan> plans)
    {
        foreach (var p in plans)
        {
            try
            {
                var node = await source.NodeAsync(p.Disk);
                if (node.Bitmaps.All(b => b.Name != p.NewBitmap)) continue;
                var actions = new JsonArray();
                if (p.Incremental && !p.Differential && node.Bitmaps.Any(b => b.Name == p.Head!.Bitmap))
                {
                    actions.Add(Action("block-dirty-bitmap-merge", new JsonObject { ["node"] = p.Disk, ["target"] = p.Head!.Bitmap, ["bitmaps"] = new JsonArray(p.NewBitmap) }));
                    actions.Add(Action("block-dirty-bitmap-enable", new JsonObject { ["node"] = p.Disk, ["name"] = p.Head!.Bitmap }));
                }
                actions.Add(Action("block-dirty-bitmap-remove", new JsonObject { ["node"] = p.Disk, ["name"] = p.NewBitmap }));
                await source.ExecuteAsync("transaction", new JsonObject { ["actions"] = actions });
            }
            catch (Exception e) when (e is QmpException or BackupException)
            {
                progress.Message($"{p.Disk}: could not tidy the bitmaps ({e.Message}); the next run will");
            }
        }
    }

    /// <summary>
    /// Undoes what a killed run left on the source for these disks: our jobs are cancelled, our exports and nodes
    /// removed, and every bitmap of ours other than the head's is merged into the head's (which records again).
    /// Extra bits only make the next incremental larger, never wrong.
    /// </summary>
    private async Task RecoverAsync(QmpSource source)
    {
        var disks = options.Disks.ToHashSet();
        var ours = (await source.JobsAsync()).Where(j => j.Id.StartsWith("strata-job-", StringComparison.Ordinal) && disks.Contains(j.Id["strata-job-".Length..])).Select(j => j.Id).ToList();
        foreach (var job in ours)
        {
            progress.Message($"cancelling {job}, left running by an interrupted run");
            try { await source.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = job, ["force"] = true }); } catch (QmpException) { }
        }
        if (ours.Count > 0) await source.WaitJobsAsync(ours, timeout: TimeSpan.FromMinutes(1));
        foreach (var export in (await source.ExportsAsync()).Where(e => e.StartsWith("strata-exp-", StringComparison.Ordinal) && disks.Contains(e["strata-exp-".Length..])))
        {
            try { await source.ExecuteAsync("block-export-del", new JsonObject { ["id"] = export, ["mode"] = "hard" }); } catch (QmpException) { }
            await source.WaitEventAsync("BLOCK_EXPORT_DELETED", e => e["data"]?["id"]?.GetValue<string>() == export, TimeSpan.FromSeconds(5));
        }
        var nodes = await source.NodesAsync();
        foreach (var n in nodes.Where(n => n.Name.StartsWith("strata-tgt-", StringComparison.Ordinal) && disks.Contains(n.Name["strata-tgt-".Length..])))
            await DeleteNodeAsync(source, n.Name);
        foreach (string disk in disks)
        {
            if (nodes.FirstOrDefault(n => n.Name == disk) is not { } node) continue;
            string? headBitmap = repo.Points(disk).LastOrDefault()?.Bitmap;
            bool headPresent = node.Bitmaps.Any(b => b.Name == headBitmap && !b.Inconsistent);
            var actions = new JsonArray();
            foreach (var stray in node.Bitmaps.Where(b => b.Name.StartsWith(repo.BitmapPrefix, StringComparison.Ordinal) && b.Name != headBitmap))
            {
                if (headPresent && !stray.Inconsistent)
                    actions.Add(Action("block-dirty-bitmap-merge", new JsonObject { ["node"] = disk, ["target"] = headBitmap, ["bitmaps"] = new JsonArray(stray.Name) }));
                actions.Add(Action("block-dirty-bitmap-remove", new JsonObject { ["node"] = disk, ["name"] = stray.Name }));
            }
            // A head bitmap stopped by our own pull (a stray was merged into it) records again; one disabled by
            // someone else stays so, and the plan takes a full.
            if (actions.Count > 0 && headPresent && node.Bitmaps.First(b => b.Name == headBitmap) is { Recording: false })
                actions.Add(Action("block-dirty-bitmap-enable", new JsonObject { ["node"] = disk, ["name"] = headBitmap }));
            if (actions.Count == 0) continue;
            progress.Message($"{disk}: folding bitmaps left by an interrupted run into {headBitmap ?? "nothing (a full follows)"}");
            await source.ExecuteAsync("transaction", new JsonObject { ["actions"] = actions });
        }
    }
}
