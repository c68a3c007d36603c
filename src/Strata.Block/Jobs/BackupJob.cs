using System.Buffers;
using Strata.Block.Bitmaps;

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
/// cluster, the top layer's allocated ones, or the bitmap's dirty ones), and a copy-before-write hook on the
/// source copies a cluster's old contents before any guest write may change it; a background loop copies the
/// rest. Every cluster is copied exactly once, so the target holds the disk as it was when the job started.
/// The bitmap's successor records new writes; its fate on success, failure or cancel follows bitmap-mode.
/// </summary>
public sealed class BackupJob : Job
{
    private readonly BackupOptions _o;
    private readonly long _cluster;
    private readonly HierarchicalBitmap _toCopy;
    private readonly HashSet<long> _inFlight = new();
    private readonly object _lock = new();
    /// <summary>Largest run the background loop copies at once (in job clusters; 2 MiB at 64 KiB).</summary>
    private readonly long RunClusters;
    private Exception? _hookError;
    private bool _hooked;
    /// <summary>Clusters copy-before-write has handled (the filter's "done" map, for listing).</summary>
    private readonly HierarchicalBitmap _handled;
    private InternalBitmap? _copyListing;

    /// <summary>The filter node's view while the job runs (the daemon lists it); set by <see cref="Prepare"/>.</summary>
    public Filters.BackupFilterImage? Filter { get; private set; }

    public override bool IsBlockJob => true;

    /// <summary>The image being written (a node may be the target of one backup at a time).</summary>
    public BlockImage TargetImage => _o.Target;

    /// <summary>The image read (QEMU blocks resizing it while the job runs).</summary>
    public BlockImage SourceImage => _o.Source;

    public BackupJob(string id, BackupOptions options, bool autoFinalize, bool autoDismiss) : base(id, "backup", autoFinalize, autoDismiss)
    {
        _o = options;
        Speed = options.Speed;
        _cluster = Math.Max(65536, options.Target.ClusterSize);
        long size = options.Source.Size;
        _toCopy = new HierarchicalBitmap((size + _cluster - 1) / _cluster);
        _handled = new HierarchicalBitmap((size + _cluster - 1) / _cluster);
        RunClusters = Math.Max(1, (2L << 20) / _cluster);
        // A speed limit wants small steps; compression works cluster by cluster anyway.
        if (options.Compress) RunClusters = 1;
    }

    /// <summary>Fixes the point in time: builds the copy map, freezes the bitmap, installs the hook. Runs when the
    /// job (or its transaction) commits, before any other write can happen.</summary>
    public void Prepare(BitmapSet sourceBitmaps)
    {
        switch (_o.Sync)
        {
            case BackupSync.Full:
            case BackupSync.None:
                _toCopy.SetRange(0, _toCopy.Length);
                break;
            case BackupSync.Top:
                foreach (var (off, len) in _o.Source.AllocatedInThisLayer()) MarkRange(off, len);
                break;
            case BackupSync.Bitmap:
                foreach (var (off, len) in _o.Bitmap!.DirtyExtents()) MarkRange(off, len);
                break;
        }
        if (_o.Bitmap is not null) sourceBitmaps.CreateSuccessor(_o.Bitmap);
        // QEMU lists the job's copy map on the source (after the successor) and the filter's maps on the filter.
        _copyListing = new InternalBitmap(_cluster, () => _toCopy.Count * _cluster, () => false);
        sourceBitmaps.AddInternal(_copyListing);
        Filter = new Filters.BackupFilterImage(_o.Source, _cluster, () => _handled.Count * _cluster);
        SetTotal(_o.Sync == BackupSync.None ? 0 : CountBytes());
        // sync=none is fleecing: the target is read (through to the source) while this job fills it.
        if (_o.Sync == BackupSync.None) _o.Target.ReadSerialiser ??= new RangeLock();
        // Copy-before-write writes into the target from inside the source's writes: draining the target holds them.
        _o.Target.AddParent(_o.Source);
        _o.Source.AddBeforeWriteHook(CopyBeforeWrite);
        _hooked = true;
    }

    private long CountBytes()
    {
        long total = 0;
        foreach (var (start, count) in _toCopy.SetRuns())
            total += Math.Min((start + count) * _cluster, _o.Source.Size) - start * _cluster;
        return total;
    }

    private void MarkRange(long offset, long length)
    {
        long first = offset / _cluster, last = (offset + length - 1) / _cluster;
        _toCopy.SetRange(first, last - first + 1);
    }

    /// <summary>The copy-before-write hook: clusters of [offset, offset+length) still to copy are copied now.</summary>
    private void CopyBeforeWrite(long offset, long length)
    {
        if (length <= 0) return;
        long first = offset / _cluster, last = Math.Min((offset + length - 1) / _cluster, _toCopy.Length - 1);
        _handled.SetRange(first, last - first + 1);
        for (long c = first; c <= last; c++)
        {
            if (!Claim(c, wait: true)) continue;
            try
            {
                CopyCluster(c);
            }
            catch (Exception e)
            {
                Unclaim(c);
                _hookError ??= e;
                throw new BlockException($"copy-before-write failed: {e.Message}");
            }
            finally
            {
                Release(c);
            }
        }
    }

    /// <summary>Takes a cluster for copying if it is still to copy; waits for one being copied by someone else.</summary>
    private bool Claim(long cluster, bool wait)
    {
        lock (_lock)
        {
            while (_inFlight.Contains(cluster))
            {
                if (!wait) return false;
                Monitor.Wait(_lock);
            }
            if (!_toCopy.Get(cluster)) return false;
            _toCopy.ResetRange(cluster, 1);
            _inFlight.Add(cluster);
            return true;
        }
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

    /// <summary>A copy failed: the cluster is still to copy (it counts as not copied for bitmap-mode=always).</summary>
    private void Unclaim(long cluster)
    {
        lock (_lock) _toCopy.SetRange(cluster, 1);
    }

    private void Release(long cluster)
    {
        lock (_lock)
        {
            _inFlight.Remove(cluster);
            Monitor.PulseAll(_lock);
        }
    }

    private void CopyCluster(long cluster) => CopyClusters(cluster, 1, ticket: -1);

    private long _nextTicket, _readsStarted;

    /// <summary>The background loop's runs start their reads in the order they were taken (they still overlap):
    /// which run meets an injected or real error does not depend on thread scheduling.</summary>
    private void WaitForTurn(long ticket)
    {
        if (ticket < 0) return;
        lock (_lock)
        {
            while (Interlocked.Read(ref _readsStarted) < ticket) Monitor.Wait(_lock);
            Interlocked.Exchange(ref _readsStarted, ticket + 1);
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Copies a run of job clusters with one read and one write (zero runs as write-zeroes).</summary>
    private void CopyClusters(long cluster, long count, long ticket)
    {
        bool turnTaken = false;
        long offset = cluster * _cluster;
        int length = (int)Math.Min(_cluster * count, _o.Source.Size - offset);
        if (length <= 0) return;
        string side = "read";
        try
        {
            // Zero areas go out as write-zeroes so a sparse disk gives a sparse backup; data is read and written
            // in as few requests as the extents allow.
            for (long pos = offset; pos < offset + length;)
            {
                var status = ChainStatus.Get(_o.Source, pos, offset + length - pos);
                int n = (int)status.Length;
                using var serialised = _o.Target.ReadSerialiser?.Exclusive(pos, n);
                if (status.Zero)
                {
                    side = "write";
                    _o.Target.WriteZeroes(pos, n, mayUnmap: true);
                }
                else
                {
                    using var lease = AlignedBuffers.Rent(n);
                    var buffer = lease.Memory.Span[..n];
                    side = "read";
                    if (!turnTaken)
                    {
                        WaitForTurn(ticket);
                        turnTaken = true;
                    }
                    _o.Source.Read(pos, buffer);
                    side = "write";
                    if (_o.Compress && pos % _o.Target.ClusterSize == 0) _o.Target.WriteCompressed(pos, buffer);
                    else _o.Target.Write(pos, buffer);
                }
                pos += n;
            }
        }
        catch (BlockIOException e)
        {
            e.Operation ??= side;
            throw;
        }
        finally
        {
            // A run that read nothing (zeros only, or failed early) still passes its turn on.
            if (!turnTaken) WaitForTurn(ticket);
        }
        AddProgress(length);
    }

    protected internal override async Task RunAsync(CancellationToken ct)
    {
        if (_o.Sync == BackupSync.None)
        {
            // Nothing to copy in the background: copy-before-write runs until the job is cancelled.
            await Task.Delay(Timeout.Infinite, ct);
            return;
        }
        long next = 0;
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
                if (_hookError is not null) throw _hookError;
                // Under a speed limit, runs are QEMU's 1 MiB chunks, each waiting for its turn before it is taken
                // (a guest write never waits behind a throttled copy).
                long runLimit = RunClusters;
                if (Speed > 0)
                {
                    runLimit = Math.Max(1, Math.Min(RunClusters, (1L << 20) / _cluster));
                    await ThrottleAsync(runLimit * _cluster, ct);
                }
                long cluster, count, ticket;
                lock (_lock)
                {
                    // Take a run of adjacent clusters still to copy: one read and one write for all of them.
                    cluster = _toCopy.NextSet(Interlocked.Read(ref next));
                    // Clusters put back after an error may sit behind the cursor: look from the start once more.
                    if (cluster < 0) cluster = _toCopy.NextSet(0);
                    if (cluster < 0) return;
                    count = 0;
                    while (count < runLimit && cluster + count < _toCopy.Length && _toCopy.Get(cluster + count) && !_inFlight.Contains(cluster + count))
                        count++;
                    if (count == 0)
                    {
                        Interlocked.Exchange(ref next, cluster + 1);
                        continue;
                    }
                    _toCopy.ResetRange(cluster, count);
                    for (long c = cluster; c < cluster + count; c++) _inFlight.Add(c);
                    Interlocked.Exchange(ref next, cluster + count);
                    ticket = _nextTicket++;
                }
                try
                {
                    await CopyInsideGraphAsync(() => CopyClusters(cluster, count, ticket));
                }
                catch (BlockIOException e) when (Policy(e) is "stop" or "ignore")
                {
                    // Not copied: back into the map, reported, and retried after a resume (stop) or at once (ignore).
                    lock (_lock) _toCopy.SetRange(cluster, count);
                    Interlocked.Exchange(ref next, 0);
                    IoError(e.Operation ?? "read", Policy(e));
                    if (Policy(e) == "ignore") await Task.Delay(10, CancellationToken.None); // do not spin on a lasting error
                }
                catch
                {
                    lock (_lock) _toCopy.SetRange(cluster, count);
                    stop.Cancel(); // one failure ends the loop: the rest stays "not copied"
                    throw;
                }
                finally
                {
                    lock (_lock)
                    {
                        for (long c = cluster; c < cluster + count; c++) _inFlight.Remove(c);
                        Monitor.PulseAll(_lock);
                    }
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
        lock (_lock)
            while (_inFlight.Count > 0) Monitor.Wait(_lock);
        if (_hookError is not null) throw _hookError;
        _o.Target.Flush();
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

    private void Unhook()
    {
        _o.Source.Bitmaps.RemoveInternal(_copyListing);
        _copyListing = null;
        if (!_hooked) return;
        _hooked = false;
        // Removed drained, as QEMU removes its filter: a guest write that took the hook list before the removal is
        // still copying into the target, and the target may be closed as soon as this job lets it go.
        using (DrainedSection.Begin([_o.Source], drainerPasses: false))
            _o.Source.RemoveBeforeWriteHook(CopyBeforeWrite);
        _o.Target.RemoveParent(_o.Source);
    }

    protected internal override void Commit()
    {
        Unhook();
        if (_o.Bitmap is not { Successor: not null } b) return;
        var set = _o.Source.Bitmaps;
        if (_o.Mode == BitmapMode.Never) set.Reclaim(b);
        else set.Abdicate(b);
    }

    protected internal override void Abort()
    {
        Unhook();
        if (_o.Bitmap is not { Successor: not null } b) return;
        var set = _o.Source.Bitmaps;
        switch (_o.Mode)
        {
            case BitmapMode.Always:
                // New writes, plus everything this job never copied.
                set.Abdicate(b);
                foreach (var (start, count) in _toCopy.SetRuns()) b.MarkDirty(start * _cluster, count * _cluster);
                break;
            default:
                set.Reclaim(b);
                break;
        }
    }

    protected internal override void Clean()
    {
        Unhook();
        _o.Release?.Invoke();
    }
}
