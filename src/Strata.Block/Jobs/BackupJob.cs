using Strata.Block.Bitmaps;
using Strata.Block.Filters;

namespace Strata.Block.Jobs;

public enum BackupSync { Full, Top, None, Bitmap }

public enum BitmapMode { OnSuccess, Always, Never }

/// <summary>What a backup job copies, where, and what happens to its bitmap.</summary>
public sealed record BackupOptions
{
    public required BlockImage Source { get; init; }
    public required BlockImage Target { get; init; }
    public BackupSync Sync { get; init; }
    public DirtyBitmap? Bitmap { get; init; }
    public BitmapMode Mode { get; init; }
    public bool Compress { get; init; }
    public long Speed { get; init; }
    public int Workers { get; init; } = 4;
    /// <summary>on-source-error / on-target-error: report (fail the job), stop (pause until resumed, then retry),
    /// ignore (report and retry), enospc (stop on ENOSPC, report otherwise).</summary>
    public string OnSourceError { get; init; } = "report";
    public string OnTargetError { get; init; } = "report";
    /// <summary>Called in Clean: release the target (a job-owned image is disposed, a node is released).</summary>
    public Action? Release { get; init; }
}

/// <summary>
/// A push backup (blockdev-backup / drive-backup). At start a "to copy" map of job clusters is fixed (every
/// cluster, the top layer's allocated ones, or the bitmap's dirty ones) in a <see cref="CopyBeforeWrite"/> on the
/// source, which copies a cluster's old contents before any guest write may change it; a background loop copies the
/// rest. Every cluster is copied exactly once, so the target holds the disk as it was when the job started.
/// The bitmap's successor records new writes; its fate on success, failure or cancel follows bitmap-mode.
/// </summary>
public sealed class BackupJob : Job
{
    private readonly BackupOptions _o;
    private readonly CopyBeforeWrite _cbw;
    /// <summary>Largest run the background loop copies at once (in job clusters; 2 MiB at 64 KiB).</summary>
    private readonly long RunClusters;
    /// <summary>A copy a guest write waited for failed: the guest's write failed, and the job fails with it.</summary>
    private Exception? _guestCopyError;
    private bool _attached;
    private InternalBitmap? _copyListing;

    /// <summary>The filter node's view while the job runs (the daemon lists it); set by <see cref="Prepare"/>.</summary>
    public BackupFilterImage? Filter { get; private set; }

    public override bool IsBlockJob => true;

    /// <summary>The image being written (a node may be the target of one backup at a time).</summary>
    public BlockImage TargetImage => _o.Target;

    /// <summary>The image read (QEMU blocks resizing it while the job runs).</summary>
    public BlockImage SourceImage => _o.Source;

    public BackupJob(string id, BackupOptions options, bool autoFinalize, bool autoDismiss) : base(id, "backup", autoFinalize, autoDismiss)
    {
        _o = options;
        Speed = options.Speed;
        _cbw = new CopyBeforeWrite(options.Source, options.Target, new CopyBeforeWriteOptions { Compress = options.Compress });
        // Guest writes' copies and the loop's count alike; a guest write's failed copy fails the job.
        _cbw.Copied += AddProgress;
        _cbw.CopyFailed += e => _guestCopyError ??= e;
        RunClusters = Math.Max(1, (2L << 20) / _cbw.ClusterSize);
        // A speed limit wants small steps; compression works cluster by cluster anyway.
        if (options.Compress) RunClusters = 1;
    }

    /// <summary>Fixes the point in time: builds the copy map, freezes the bitmap, attaches copy-before-write. Runs when
    /// the job (or its transaction) commits, before any other write can happen.</summary>
    public void Prepare(BitmapSet sourceBitmaps)
    {
        switch (_o.Sync)
        {
            case BackupSync.Full:
            case BackupSync.None:
                _cbw.MarkAllToCopy();
                break;
            case BackupSync.Top:
                foreach (var (off, len) in _o.Source.AllocatedInThisLayer()) _cbw.MarkToCopy(off, len);
                break;
            case BackupSync.Bitmap:
                foreach (var (off, len) in _o.Bitmap!.DirtyExtents()) _cbw.MarkToCopy(off, len);
                break;
        }
        if (_o.Bitmap is not null) sourceBitmaps.CreateSuccessor(_o.Bitmap);
        // QEMU lists the job's copy map on the source (after the successor) and the filter's maps on the filter.
        _copyListing = new InternalBitmap(_cbw.ClusterSize, () => _cbw.ToCopyClusterBytes, () => false);
        sourceBitmaps.AddInternal(_copyListing);
        Filter = new BackupFilterImage(_cbw);
        SetTotal(_o.Sync == BackupSync.None ? 0 : _cbw.ToCopyBytes);
        // sync=none is fleecing: the target is read (through to the source) while this job fills it.
        if (_o.Sync == BackupSync.None) _o.Target.ReadSerialiser ??= new RangeLock();
        _cbw.Attach();
        _attached = true;
    }

    /// <summary>The error policy that applies to an I/O error, by the side it happened on.</summary>
    private string Policy(BlockIOException e)
    {
        string policy = e.Operation == "write" ? _o.OnTargetError : _o.OnSourceError;
        return policy switch
        {
            "enospc" => e.Errno == 28 ? "stop" : "report",
            "auto" => "report",
            _ => policy,
        };
    }

    /// <summary>Taking a run and its ticket is one step: tickets follow the order runs were taken in.</summary>
    private readonly object _takeLock = new();
    private readonly object _turnLock = new();
    private long _nextTicket, _readsStarted;

    /// <summary>The background loop's runs start their reads in the order they were taken (they still overlap):
    /// which run meets an injected or real error does not depend on thread scheduling.</summary>
    private void WaitForTurn(long ticket)
    {
        lock (_turnLock)
        {
            while (_readsStarted < ticket) Monitor.Wait(_turnLock);
            _readsStarted = ticket + 1;
            Monitor.PulseAll(_turnLock);
        }
    }

    protected internal override async Task RunAsync(CancellationToken ct)
    {
        if (_o.Sync == BackupSync.None)
        {
            // Nothing to copy in the background: copy-before-write runs until the job is cancelled.
            await Task.Delay(Timeout.Infinite, ct);
            return;
        }
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        var workers = Enumerable.Range(0, Math.Max(1, _o.Workers)).Select(_ => Task.Run(async () =>
        {
            while (true)
            {
                if (stop.IsCancellationRequested) { ct.ThrowIfCancellationRequested(); return; }
                await PausePointAsync();
                // A drained source holds the job here, between copies (QEMU pauses its jobs while their nodes are
                // drained); once a copy is taken it runs to the end inside the graph, since a guest write that a
                // drain waits for may be waiting for that very copy.
                await _o.Source.Requests.WhileDrainedAsync();
                if (_guestCopyError is not null) throw _guestCopyError;
                // A run whose copy failed is put back at once but stays in flight until its error is handled (reported,
                // the job paused or stopped): no sibling takes it again in between.
                TakenRun? failed = null;
                try
                {
                    bool allTaken = false;
                    if (Speed > 0)
                    {
                        // Under a speed limit, runs are QEMU's 1 MiB chunks, each waiting for its turn before it is
                        // taken (a guest write never waits behind a throttled copy).
                        long runLimit = Math.Max(1, Math.Min(RunClusters, (1L << 20) / _cbw.ClusterSize));
                        await ThrottleAsync(runLimit * _cbw.ClusterSize, ct);
                        await CopyInsideGraphAsync(() => allTaken = CopyRuns(stop.Token, runLimit, maxRuns: 1, ref failed));
                    }
                    else await CopyInsideGraphAsync(() => allTaken = CopyRuns(stop.Token, RunClusters, int.MaxValue, ref failed));
                    if (allTaken) return;
                }
                catch (BlockIOException e) when (Policy(e) is "stop" or "ignore")
                {
                    // Not copied: back into the map, reported, and retried after a resume (stop) or at once (ignore).
                    lock (_takeLock) _next = 0;
                    IoError(e.Operation ?? "read", Policy(e));
                    if (Policy(e) == "ignore") await Task.Delay(10, CancellationToken.None); // do not spin on a lasting error
                }
                catch
                {
                    stop.Cancel(); // one failure ends the loop: the rest stays "not copied"
                    throw;
                }
                finally
                {
                    if (failed is { } f) _cbw.Release(f.Cluster, f.Count);
                }
            }
        }, CancellationToken.None)).ToArray();
        try
        {
            await Task.WhenAll(workers);
        }
        catch
        {
            // Report the first real failure, not a sibling's cancellation.
            var real = workers.Where(w => w.IsFaulted).Select(w => w.Exception!.InnerException!).FirstOrDefault(e => e is not OperationCanceledException);
            if (real is not null) throw real;
            throw;
        }
        // Clusters a guest write was copying when the loop ended are done once they leave the in-flight set.
        _cbw.WaitForCopies();
        if (_guestCopyError is not null) throw _guestCopyError;
        _o.Target.Flush();
    }

    /// <summary>A run of adjacent clusters taken to copy, with its turn among the reads.</summary>
    private readonly record struct TakenRun(long Cluster, long Count, long Ticket);

    /// <summary>Where the next search for clusters to copy starts (under <see cref="_takeLock"/>).</summary>
    private long _next;

    /// <summary>Takes the next run of at most <paramref name="limit"/> clusters still to copy (one read and one write
    /// for all of them). Null when there is none to take now: <paramref name="allTaken"/> once every cluster is copied
    /// or being copied, otherwise the clusters found were in flight (a failed copy on its way back) — look again.</summary>
    private TakenRun? TakeRun(long limit, out bool allTaken)
    {
        lock (_takeLock)
        {
            long count = _cbw.TryTake(ref _next, limit, out long cluster);
            allTaken = count < 0;
            if (count <= 0) return null;
            // Looked at again once the run is taken: a failed run is released only after its error paused the job,
            // so a worker that takes it now (its pause check came just before) sees the pause here and lets go.
            if (!PausePointAsync().IsCompleted)
            {
                _cbw.PutBack(cluster, count);
                _cbw.Release(cluster, count);
                _next = cluster;
                return null;
            }
            return new TakenRun(cluster, count, _nextTicket++);
        }
    }

    /// <summary>
    /// Takes and copies up to <paramref name="maxRuns"/> runs one after another on this copy thread, until none is
    /// left (true) or the loop must go back to its pause, drain and cancel points (false). One trip to a copy thread
    /// for many runs, not one per run: a hand-over between threads costs tens of microseconds on a VM, as much as
    /// copying 64 KiB, and an incremental backup of scattered clusters is made of such small runs. A run that fails
    /// is put back and left in <paramref name="failed"/>, still in flight, for the caller to release.
    /// </summary>
    private bool CopyRuns(CancellationToken stop, long limit, int maxRuns, ref TakenRun? failed)
    {
        for (int i = 0; i < maxRuns; i++)
        {
            if (stop.IsCancellationRequested || !PausePointAsync().IsCompleted || _guestCopyError is not null
                || (maxRuns > 1 && Speed > 0))
                return false;
            // Counted in flight on the source before the run is taken: a drain that begins later waits for this copy,
            // and one already begun sends the loop back to wait for its end.
            if (!_o.Source.Requests.TryAdmit()) return false;
            try
            {
                var taken = TakeRun(limit, out bool allTaken);
                if (allTaken) return true;
                if (taken is not { } run) continue;
                failed = run;
                try
                {
                    _cbw.CopyRun(run.Cluster, run.Count, () => WaitForTurn(run.Ticket));
                }
                catch
                {
                    _cbw.PutBack(run.Cluster, run.Count);
                    throw;
                }
                failed = null;
                _cbw.Release(run.Cluster, run.Count);
            }
            finally
            {
                _o.Source.Requests.LeaveAdmitted();
            }
        }
        return false;
    }

    private readonly object _rateLock = new();
    private DateTime _sliceStart, _sliceEnd;
    private double _sliceDispatched;
    private static readonly TimeSpan Slice = TimeSpan.FromMilliseconds(100);

    /// <summary>QEMU's rate limit: each 100 ms slice may start speed/10 bytes; a chunk that overdraws it stretches
    /// the slice by as much as it overdrew, and nothing else starts before the slice ends. Re-reads the speed so block-job-set-speed applies at once.</summary>
    private async Task ThrottleAsync(long bytes, CancellationToken ct)
    {
        while (true)
        {
            TimeSpan wait;
            lock (_rateLock)
            {
                long speed = Speed;
                if (speed <= 0) return;
                var now = DateTime.UtcNow;
                if (now >= _sliceEnd)
                {
                    // The previous (possibly extended) slice is over: start afresh.
                    _sliceStart = now;
                    _sliceEnd = now + Slice;
                    _sliceDispatched = 0;
                }
                double quota = speed * Slice.TotalSeconds;
                if (_sliceDispatched < quota)
                {
                    _sliceDispatched += bytes;
                    return;
                }
                _sliceEnd = _sliceStart + Slice * (_sliceDispatched / quota);
                wait = _sliceEnd - now;
            }
            // Wake at least every 100 ms: cancel, pause and a new speed take effect promptly.
            Sleeping = true;
            try { await Task.Delay(wait < Slice ? wait : Slice, ct); }
            finally { Sleeping = false; }
            await PausePointAsync();
        }
    }

    private void DetachCopyBeforeWrite()
    {
        _o.Source.Bitmaps.RemoveInternal(_copyListing);
        _copyListing = null;
        if (!_attached) return;
        _attached = false;
        // Detached drained, as QEMU removes its filter: a guest write that entered before the removal is still
        // copying into the target, and the target may be closed as soon as this job lets it go.
        using (DrainedSection.Begin([_o.Source], drainerPasses: false))
            _cbw.Detach();
    }

    protected internal override void Commit()
    {
        DetachCopyBeforeWrite();
        if (_o.Bitmap is not { Successor: not null } b) return;
        var set = _o.Source.Bitmaps;
        if (_o.Mode == BitmapMode.Never) set.Reclaim(b);
        else set.Abdicate(b);
    }

    protected internal override void Abort()
    {
        DetachCopyBeforeWrite();
        if (_o.Bitmap is not { Successor: not null } b) return;
        var set = _o.Source.Bitmaps;
        switch (_o.Mode)
        {
            case BitmapMode.Always:
                // New writes, plus everything this job never copied.
                set.Abdicate(b);
                foreach (var (start, count) in _cbw.NotCopied()) b.MarkDirty(start * _cbw.ClusterSize, count * _cbw.ClusterSize);
                break;
            default:
                set.Reclaim(b);
                break;
        }
    }

    protected internal override void Clean()
    {
        DetachCopyBeforeWrite();
        _o.Release?.Invoke();
    }
}
