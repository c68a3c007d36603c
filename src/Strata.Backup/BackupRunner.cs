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
        /// with them) as they are being read, once something started them (<see cref="BackupRunner.HeadDigests"/>);
        /// null digests when it has none (a point from before they were recorded) or they are damaged, with why in the
        /// problem.</summary>
        public Task<(GranuleDigests? Digests, string? Problem)>? HeadDigestsRead;
        /// <summary>The disk's digests as a differential read them (the new point's, with no need to build them).</summary>
        public GranuleDigests? DiskDigests;
        public string? Note;
        public required string NewBitmap;
        public required string PartialPath;
        public required string FinalName;
        public string JobId => FrozenSource.JobId(Disk);
        public string TargetNode => FrozenSource.TargetNode(Disk);
        public long Copied;
        /// <summary>A descriptor on the target from its creation to its commit, which fsyncs the file through it (see
        /// <see cref="PointCommit.Commit"/>).</summary>
        public Microsoft.Win32.SafeHandles.SafeFileHandle? Held;
        /// <summary>The target was made and added to the source early (<see cref="EarlyTarget"/>).</summary>
        public bool TargetAdded;
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
        QmpSource source = await QmpSource.ConnectAsync(options.Socket);
        await using var connected = source;
        // Recovery's queries go out at once (behind the negotiation, on the same round trip), and what the repository
        // knows is read here while the source answers them: on two cores, the source needs the other one now.
        var state = SourceBitmaps.Query(source);
        var heads = options.Disks.ToDictionary(d => d, d => repo.Points(d).LastOrDefault());
        string id = repo.NewId(DateTimeOffset.UtcNow);
        var plans = new List<DiskPlan>();
        var early = new List<EarlyTarget>();
        try
        {
            AddEarlyTargets(source, heads, id, early);
            return await RunAsync(source, state, heads, id, plans, early);
        }
        finally
        {
            // Any early target the run did not take (it failed first) is gone before the lock is.
            foreach (var e in early) await DiscardAsync(source, e);
            // None still reading when the lock goes. A failure of theirs was the commit's to report, if it got there.
            foreach (var p in plans)
                if (p.HeadDigestsRead is { } digests)
                    try { await digests; } catch (Exception) { }
        }
    }

    /// <summary>
    /// A push incremental's target, made and sent to the source before the plan says it is wanted: its size and backing
    /// file are the last point's, which is what the plan finds nearly always (an incremental on the last point of a
    /// disk of the same size). Its blockdev-add goes out behind recovery's queries and is answered during the same
    /// wait, where the run used to make the file and add it one round trip after the plan. A plan that wants anything
    /// else (a full, a differential, a disk that changed size) or a recovery that changed the source discards it and
    /// makes its own.
    /// </summary>
    private sealed class EarlyTarget
    {
        public required string Disk;
        public required string Path;
        public required BackupManifest Head;
        public required Microsoft.Win32.SafeHandles.SafeFileHandle Held;
        /// <summary>The blockdev-add's reply; faulted when the source refused it.</summary>
        public required Task<JsonNode?> Added;
    }

    /// <summary>Makes the early targets, into a list the caller cleans up whatever happens. A disk whose target cannot be
    /// made here gets none: its plan makes its own, and reports what stops it.</summary>
    private void AddEarlyTargets(QmpSource source, Dictionary<string, BackupManifest?> heads, string id, List<EarlyTarget> early)
    {
        if (options.Mode != "push" || options.Level == "full") return;
        foreach (var (disk, head) in heads)
        {
            if (head is null || !File.Exists(repo.FilePath(head))) continue;
            string path = PartialPathOf(disk, id);
            Microsoft.Win32.SafeHandles.SafeFileHandle? held = null;
            try
            {
                // A new file even where a killed run of the same second left its partial one: that run's job may still
                // write into its file until recovery cancels it. Removed, the old file is no longer this path's.
                File.Delete(path);
                held = CreateTarget(path, head.VirtualSize, head);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or BlockException)
            {
                held?.Dispose();
                DeleteQuietly(path);
                continue;
            }
            var added = source.ExecuteAsync("blockdev-add", TargetBlockdev(FrozenSource.TargetNode(disk), path, source.OnThisHost));
            // Observed here: a run that fails before it looks at the reply must not leave the failure unobserved.
            _ = added.ContinueWith(t => t.Exception, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously);
            early.Add(new EarlyTarget { Disk = disk, Path = path, Head = head, Held = held, Added = added });
        }
    }

    /// <summary>Early targets the plan does not want go, before a target of their path is made; the others become their
    /// disk's push target. A recovery that changed the source may have removed them (it removes nodes by their name),
    /// or their add failed (a node of that name was still there): none is taken then.</summary>
    private async Task TakeEarlyTargetsAsync(QmpSource source, List<DiskPlan> plans, List<EarlyTarget> early, bool recoveryChangedSource)
    {
        foreach (var e in early.ToList())
        {
            var p = plans.First(p => p.Disk == e.Disk);
            if (!recoveryChangedSource && _mode == "push" && p.Incremental && !p.Differential && p.Head == e.Head && p.Node.VirtualSize == e.Head.VirtualSize
                && p.PartialPath == e.Path && await IsAddedAsync(e))
            {
                p.Held = e.Held;
                p.TargetAdded = true;
            }
            else await DiscardAsync(source, e);
            early.Remove(e);
        }
    }

    /// <summary>An early target's node (if the source added it) and file go. Never throws: it runs on the way out of
    /// failed runs too.</summary>
    private static async Task DiscardAsync(QmpSource source, EarlyTarget e)
    {
        e.Held.Dispose();
        try
        {
            if (await IsAddedAsync(e)) await SourceBitmaps.DeleteNodeAsync(source, FrozenSource.TargetNode(e.Disk));
        }
        catch (Exception x) when (x is QmpException or BackupException)
        {
            // Left on a source that is gone or refuses: the next run's recovery removes a node of that name.
        }
        DeleteQuietly(e.Path);
    }

    /// <summary>A file of this run removed; one that cannot be is a leftover the next run removes.</summary>
    private static void DeleteQuietly(string path)
    {
        try { File.Delete(path); } catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
    }

    private static async Task<bool> IsAddedAsync(EarlyTarget e)
    {
        try
        {
            await e.Added;
            return true;
        }
        catch (QmpException)
        {
            return false;
        }
    }

    private static readonly Task<(GranuleDigests?, string?)> NoDigests = Task.FromResult<(GranuleDigests?, string?)>((null, null));

    /// <summary>The last point's digests, read on a thread of their own from the first call on (once per plan): a
    /// differential's plan waits for them, any other run starts them once its job runs (when the source leaves a core
    /// idle: their SHA-256 check loads OpenSSL, a few milliseconds of CPU) and its commit waits for them. Whatever goes
    /// wrong reading them is a reason for the point to have none (the next full or differential by comparison records
    /// them again), never a failure of a run whose backup may already be done by the time it is seen.</summary>
    private Task<(GranuleDigests? Digests, string? Problem)> HeadDigests(DiskPlan p) =>
        p.HeadDigestsRead ??= !p.Incremental ? NoDigests : ReadDigestsAside(p.Head!);

    private Task<(GranuleDigests?, string?)> ReadDigestsAside(BackupManifest head) =>
        Task.Factory.StartNew(() =>
        {
            try
            {
                return PointCommit.HeadDigests(repo, head);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException or InvalidDataException or ArgumentException)
            {
                return (null, $"the last point's digests could not be read: {e.Message}");
            }
        }, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);

    private async Task<IReadOnlyList<BackupManifest>> RunAsync(QmpSource source, SourceBitmaps.SourceState state,
        Dictionary<string, BackupManifest?> heads, string id, List<DiskPlan> plans, List<EarlyTarget> early)
    {
        var nodes = await SourceBitmaps.RecoverAsync(source, state, heads.ToDictionary(h => h.Key, h => h.Value?.Bitmap), repo.BitmapPrefix, progress);
        // After recovery: a leftover job or export of a killed run may have had its files open until then.
        foreach (var leftover in repo.CleanLeftovers(keep: early.Select(e => e.Path).ToHashSet()))
            progress.Message($"removed {leftover}, left by an interrupted run");
        var now = DateTimeOffset.UtcNow;
        foreach (string disk in options.Disks) await PlanAsync(source, disk, id, nodes, heads[disk], plans);
        // A differential reads the frozen disk itself: the run pulls.
        _mode = plans.Any(p => p.Differential) ? "pull" : options.Mode;
        foreach (var p in plans)
            progress.Message($"{p.Disk}: {(p.Incremental ? $"incremental on {p.Head!.Id}" : "full")} ({_mode}){(p.Note is null ? "" : " — " + p.Note)}");

        bool ok = false;
        var manifests = new List<BackupManifest>();
        try
        {
            try
            {
                await TakeEarlyTargetsAsync(source, plans, early, recoveryChangedSource: nodes is null);
                if (_mode == "push") await PushAsync(source, plans);
                else await PullAsync(source, plans);
                ok = true;
            }
            finally
            {
                if (!ok)
                {
                    // Keep every bitmap able to produce a correct next incremental, drop the unfinished files.
                    foreach (var p in plans)
                        await SourceBitmaps.RollBackAsync(source, p.Disk, p.NewBitmap, p.Incremental && !p.Differential ? p.Head!.Bitmap : null, progress);
                    foreach (var p in plans.Where(p => p.TargetAdded))
                        try { await SourceBitmaps.DeleteNodeAsync(source, p.TargetNode); } catch (BackupException) { }
                    foreach (var p in plans) File.Delete(p.PartialPath);
                }
            }
            foreach (var p in plans) manifests.Add(Commit(p, id, now));
        }
        finally
        {
            foreach (var p in plans) p.Held?.Dispose();
        }
        // Only now that the new points are on disk may the bitmaps of the old ones go.
        // The plan's view of the bitmaps is still the source's: the lock keeps other runs of this repository away,
        // and only they touch its bitmaps.
        foreach (var p in plans) await SourceBitmaps.DropOldAsync(source, p.Disk, repo.BitmapPrefix, p.NewBitmap, p.Node.Bitmaps);
        return manifests;
    }

    /// <param name="nodes">The source's nodes as recovery found them, when it changed nothing; null asks the source.</param>
    /// <param name="head">The disk's last point.</param>
    /// <param name="plans">Where the plan goes, as soon as it may have started reading the last point's digests.</param>
    private async Task PlanAsync(QmpSource source, string disk, string id, IReadOnlyList<SourceNode>? nodes, BackupManifest? head, List<DiskPlan> plans)
    {
        var node = nodes?.FirstOrDefault(n => n.Name == disk) ?? await source.NodeAsync(disk);
        if (node.VirtualSize <= 0) throw new BackupException($"node '{disk}' has no size", "name a format node (qcow2, raw), not a protocol node", BackupExitCodes.Usage);
        string? why = null, bitmapLost = null;
        if (head is null) why = "no earlier backup of this disk";
        else if (options.Level == "full") why = null;
        else if (node.VirtualSize != head.VirtualSize) why = $"the disk changed size ({head.VirtualSize} -> {node.VirtualSize} bytes)";
        else if (!File.Exists(repo.FilePath(head))) why = $"the previous backup file {head.File} is missing";
        else bitmapLost = SourceBitmaps.WhyUnusable(node, head.Bitmap);
        bool inc = options.Level != "full" && why is null;
        if (options.Level == "inc" && !inc)
            throw new BackupException($"{disk}: cannot take an incremental: {why}", "run with --level full (or auto) to start a new chain", BackupExitCodes.Failed);
        string dir = repo.DiskDir(disk);
        Directory.CreateDirectory(dir);
        bool differential = inc && bitmapLost is not null;
        var plan = new DiskPlan
        {
            Disk = disk,
            Node = node,
            Head = inc ? head : null,
            Incremental = inc,
            // Without its bitmap the last point is still there to compare with: only what differs is copied.
            Differential = differential,
            NewBitmap = repo.BitmapPrefix + id,
            FinalName = id + ".qcow2",
            PartialPath = PartialPathOf(disk, id),
        };
        plans.Add(plan);
        if (differential)
        {
            var (digestsNow, digestsProblem) = await HeadDigests(plan);
            plan.Note = "differential by comparison because " + bitmapLost + (digestsNow is null ? $"; {digestsProblem}, so it was read back to compare" : "");
        }
        else if (options.Level == "auto" && !inc && head is not null) plan.Note = "full because " + why;
    }

    private string PartialPathOf(string disk, string id) => Path.Combine(repo.DiskDir(disk), id + ".qcow2" + Repository.PartialSuffix);

    /// <summary>Makes a point's file: a qcow2 of <paramref name="size"/> bytes backed by the last point (an incremental's
    /// <paramref name="head"/>) or by nothing; returns a descriptor on it, opened before the source or this tool writes
    /// a byte of data, held until the commit fsyncs through it.</summary>
    private Microsoft.Win32.SafeHandles.SafeFileHandle CreateTarget(string path, long size, BackupManifest? head)
    {
        var create = new Qcow2CreateOptions
        {
            Size = size,
            ClusterSize = PointClusterSize,
            // qcow2 v3: zeros stay zero clusters over the backing file (a v2 image without a backing file at hand, as the
            // source opens this one, would unmap them, and the last point would show through).
            Version = 3,
            BackingFile = head?.File,
            BackingFormat = head is null ? null : "qcow2",
            // Not fsynced here: the partial file is deleted unless the run succeeds, and the commit fsyncs the whole
            // file, header included, through the descriptor returned here. Two fsyncs fewer on the clock of every run.
            Durable = false,
        };
        Qcow2Image.Create(path, create).Dispose();
        return File.OpenHandle(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
    }

    private void CreateTarget(DiskPlan p) => p.Held = CreateTarget(p.PartialPath, p.Node.VirtualSize, p.Incremental ? p.Head : null);

    /// <summary>The push target's blockdev-add: the partial file as a qcow2 node of its own.</summary>
    private JsonObject TargetBlockdev(string node, string path, bool onThisHost)
    {
        // cache.no-flush: the source writes the qcow2 metadata at blockdev-del but leaves the fsync to this tool, which
        // does it while it hashes the file (the partial file is thrown away unless the run commits it). Given on both
        // nodes: QEMU passes a parent's cache modes to an inline child, older strata daemons did not. Only for a
        // source on this host: another host's writes to shared storage are not made durable by an fsync here.
        var cache = new JsonObject { ["no-flush"] = onThisHost };
        JsonNode file = new JsonObject { ["driver"] = "file", ["filename"] = path, ["cache"] = cache.DeepClone() };
        if (options.InjectTargetErrno is { } errno)
            file = new JsonObject { ["driver"] = "blkdebug", ["image"] = file, ["inject-error"] = new JsonArray(new JsonObject { ["event"] = "write_aio", ["errno"] = errno }) };
        // backing: null. The job writes whole clusters (QEMU's copy size is at least the target's cluster size, and a
        // target without a backing is what it sizes for) and zeroes as zero clusters, so it never reads the target's
        // backing file; opened, the whole chain would be: every point of the chain, each a qcow2 to open and lock,
        // 7 ms of blockdev-add for a chain of 30 against 1 ms for the file alone. The header still names the
        // last point, which is how everything else reads the chain.
        return new JsonObject { ["driver"] = "qcow2", ["node-name"] = node, ["cache"] = cache, ["file"] = file, ["backing"] = null };
    }

    // ------------------------------------------------------------------ push

    private async Task PushAsync(QmpSource source, List<DiskPlan> plans)
    {
        try
        {
            await PushJobsAsync(source, plans);
        }
        finally
        {
            // Every target node of the run goes, the jobs' and any added before a failure (one never added is not found).
            foreach (var p in plans) await SourceBitmaps.DeleteNodeAsync(source, p.TargetNode);
        }
    }

    /// <summary>QEMU's backup jobs take x-perf (experimental tuning) since 6.0.</summary>
    private static readonly Version XPerfSince = new(6, 0);

    private async Task PushJobsAsync(QmpSource source, List<DiskPlan> plans)
    {
        // x-perf.use-copy-range: the job copies with copy_file_range(2) instead of reading each chunk into a buffer of
        // its own and writing it out, and once a copy has worked, in chunks of up to 16 MiB instead of 1 MiB. Against
        // qemu-storage-daemon 7.2 with source and repository on one filesystem, a 1 % incremental's job (10 MiB) went
        // from 9.4 to 6.8 ms and a 1 GiB full's from 625 to 326 ms (median of 12 and 4 alternating runs), the files
        // byte-identical. Where it cannot (the kernel refuses a repository on another filesystem; QEMU's block layer
        // an encrypted image or a compressed cluster), QEMU copies by read and write, for that chunk and the rest of
        // the job, by itself. QEMU's default is off (since 6.1: it is not faster on every storage); strata daemon takes
        // the member and copies its own way. Asked only where the call copies rather than clones (CopyOffload, on the
        // target's own folder): a point must not share blocks with the disk.
        bool copyRangeKnown = source.OnThisHost && source.ServerVersion >= XPerfSince;
        bool copyRange = false;
        var actions = new JsonArray();
        foreach (var p in plans)
        {
            if (!p.TargetAdded)
            {
                CreateTarget(p);
                await source.ExecuteAsync("blockdev-add", TargetBlockdev(p.TargetNode, p.PartialPath, source.OnThisHost));
            }
            actions.Add(SourceBitmaps.AddAction(p.Disk, p.NewBitmap, p.Node));
            var backup = new JsonObject { ["job-id"] = p.JobId, ["device"] = p.Disk, ["target"] = p.TargetNode };
            if (p.Incremental)
            {
                // bitmap-mode=never: the old bitmap keeps every bit until the new point is committed.
                backup["sync"] = "bitmap";
                backup["bitmap"] = p.Head!.Bitmap;
                backup["bitmap-mode"] = "never";
            }
            else backup["sync"] = "full";
            if (copyRangeKnown && CopyOffload.Copies(Path.GetDirectoryName(p.PartialPath)!))
            {
                backup["x-perf"] = new JsonObject { ["use-copy-range"] = true };
                copyRange = true;
            }
            actions.Add(SourceBitmaps.Action("blockdev-backup", backup));
        }
        int mark = source.EventMark;
        try
        {
            await SourceBitmaps.TransactionAsync(source, actions);
        }
        catch (BackupException e) when (copyRange && e.Message.Contains("x-perf", StringComparison.Ordinal))
        {
            // A QEMU whose version says x-perf but which refuses it (the member is experimental): a refused
            // transaction did nothing, so the same one goes again without it.
            progress.Message("the source refused x-perf (copy offload): backing up without it");
            var without = (JsonArray)actions.DeepClone();
            foreach (var action in without) (action!["data"] as JsonObject)?.Remove("x-perf");
            await SourceBitmaps.TransactionAsync(source, without);
        }
        // Read while the job runs: the commit needs them.
        foreach (var p in plans) _ = HeadDigests(p);
        foreach (var p in plans) progress.Start(p.Disk, p.Node.VirtualSize);
        var outcomes = await source.WaitJobsAsync(plans.Select(p => p.JobId), mark, async () =>
        {
            foreach (var (jobId, _, offset, len) in await source.JobsAsync())
                if (plans.FirstOrDefault(p => p.JobId == jobId) is { } p) { progress.Start(p.Disk, len); progress.Advance(p.Disk, offset); }
        });
        foreach (var p in plans) progress.Finish(p.Disk);
        ThrowIfAnyFailed(plans, outcomes);
    }

    private static void ThrowIfAnyFailed(List<DiskPlan> plans, IReadOnlyDictionary<string, JobOutcome> outcomes)
    {
        var failed = plans.Where(p => !outcomes[p.JobId].Ok).ToList();
        if (failed.Count == 0) return;
        string why = string.Join("; ", failed.Select(p => $"{p.Disk}: {outcomes[p.JobId].Error ?? "cancelled"}"));
        throw new BackupException($"backup failed: {why}", "nothing was committed and the bitmaps still hold every change; run again once the cause is fixed");
    }

    // ------------------------------------------------------------------ pull

    private async Task PullAsync(QmpSource source, List<DiskPlan> plans)
    {
        // Read while the disks are frozen and copied: the commit needs them.
        foreach (var p in plans) _ = HeadDigests(p);
        var disks = plans.Select(p => new FrozenSource.Disk(p.Disk, p.Node, p.NewBitmap, p.Incremental && !p.Differential ? p.Head!.Bitmap : null,
            Path.Combine(repo.DiskDir(p.Disk), Repository.FleecePrefix + p.FinalName))).ToList();
        string ownSocket = SocketPaths.ForRun(Path.Combine(repo.Root, $".nbd-{Environment.ProcessId}.sock"), "pull");
        await using var frozen = await FrozenSource.FreezeAsync(source, disks, options.Nbd, ownSocket,
            _mode != options.Mode
                ? "a differential by comparison reads the disk over NBD: pass the source's NBD server with --nbd (or --level full)"
                : "if it already runs one, pass its address with --nbd");
        await Task.WhenAll(plans.Select(p => PullDiskAsync(p, frozen.NbdAddress, frozen.DirtyContext(p.Disk))));
    }

    private async Task PullDiskAsync(DiskPlan p, string nbd, string? context)
    {
        CreateTarget(p);
        // A differential against digests writes whole clusters only: the last point (the backing file) stays closed.
        // A differential's plan has waited for them already; any other pull does not need them before its commit.
        var headDigests = p.Differential ? (await HeadDigests(p)).Digests : null;
        bool byDigests = p.Differential && headDigests is not null;
        using var target = ImageOpener.Open(p.PartialPath, "qcow2", readOnly: false, openBacking: !byDigests);
        // The partial file is thrown away if anything fails, so none of its writes need to reach the disk before the
        // commit fsyncs the finished file.
        if (target is Qcow2Image q) q.File.FlushEnabled = false;
        progress.Start(p.Disk, 0);
        void Progress(long done, long total)
        {
            progress.Start(p.Disk, total);
            progress.Advance(p.Disk, done);
        }
        if (byDigests)
        {
            using var frozen = OpenExport(nbd, FrozenSource.ExportName(p.Disk));
            (p.Copied, p.DiskDigests) = await Task.Run(() => new DifferentialCopier(frozen).CopyDifferences(target, headDigests!, Progress));
        }
        else if (p.Differential)
        {
            using var frozen = OpenExport(nbd, FrozenSource.ExportName(p.Disk));
            using var lastPoint = ImageOpener.Open(repo.FilePath(p.Head!), "qcow2", readOnly: true);
            (p.Copied, p.DiskDigests) = await Task.Run(() =>
                new DifferentialCopier(frozen).CopyDifferences(target, lastPoint, DigestGranularityFor(frozen.Size), Progress));
        }
        else
        {
            p.Copied = await new PullCopier(nbd, FrozenSource.ExportName(p.Disk), context).CopyAsync(target, Progress);
        }
        // Metadata written out; the fsync is the commit's, beside the hashing.
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

    private BackupManifest Commit(DiskPlan p, string id, DateTimeOffset time)
    {
        var (headDigests, headDigestsProblem) = HeadDigests(p).GetAwaiter().GetResult();
        return PointCommit.Commit(repo, progress,
            new PointFacts(id, p.Disk, time, p.Incremental, p.Head?.Id, p.FinalName, _mode,
                options.Socket.Contains('/') || File.Exists(options.Socket) ? Path.GetFullPath(options.Socket) : options.Socket,
                p.Disk, p.NewBitmap, p.Node.VirtualSize, p.Note),
            p.PartialPath, Path.Combine(repo.DiskDir(p.Disk), p.FinalName), headDigests, headDigestsProblem, p.DiskDigests, p.Held);
    }
}
