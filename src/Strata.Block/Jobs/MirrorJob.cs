using System.Buffers;
using Strata.Block.Bitmaps;

namespace Strata.Block.Jobs;

public enum MirrorSync { Full, Top, None }

/// <summary>What a mirror job copies where, and how it switches over.</summary>
public sealed record MirrorOptions
{
    public required BlockImage Source { get; init; }
    public required BlockImage Target { get; init; }
    public MirrorSync Sync { get; init; }
    /// <summary>Dirty-tracking granularity (QEMU: the target's cluster size clamped to 4 KiB..64 KiB by default).</summary>
    public long Granularity { get; init; } = 65536;
    public long Speed { get; init; }
    public int Workers { get; init; } = 4;
    /// <summary>on-source-error / on-target-error: report (fail), stop (pause until resumed, then retry), ignore
    /// (report and retry), enospc (stop on ENOSPC, report otherwise).</summary>
    public string OnSourceError { get; init; } = "report";
    public string OnTargetError { get; init; } = "report";
    /// <summary>copy-mode=write-blocking: a guest write returns only once it is on the target too, so the two
    /// converge however fast the guest writes.</summary>
    public bool WriteBlocking { get; init; }
    /// <summary>How long a background mirror may go on without converging once its first pass is done before it
    /// turns write-blocking (see <see cref="MirrorJob"/>).</summary>
    public TimeSpan ConvergeWithin { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>The switch-over: stop the source's writers, run the given final copy, point the writers at the
    /// target, let them go. Supplied by the daemon, which knows who writes to the source.</summary>
    public Func<Func<Task>, Task>? Pivot { get; init; }
    /// <summary>Called in Clean: release the target.</summary>
    public Action? Release { get; init; }
}

/// <summary>
/// A mirror (blockdev-mirror / drive-mirror): copies the source to the target while the source keeps changing —
/// every write after it lands marks its clusters to copy again — until the two are in step (ready: the job
/// keeps them so); job-complete then stops the writers, copies what is left and moves them to the target.
/// A soft cancel once ready ends it with the target a point-in-time copy and no switch.
/// <para>
/// Where QEMU 7.2's background mirror never becomes ready while guests dirty clusters faster than it copies them
/// (each 4 KiB guest write costs the mirror a whole granule), this one turns write-blocking when its dirty set has
/// not once emptied within <see cref="MirrorOptions.ConvergeWithin"/> after the first pass: from then on a guest
/// write waits for the copy of what it wrote, the dirty set only shrinks, and the job gets ready and completes in
/// bounded time. This is the switch QEMU 8.2 lets a client make by hand (block-job-change copy-mode); a guest that
/// writes slower than the copy never meets it.
/// </para>
/// </summary>
public sealed class MirrorJob : Job
{
    private readonly MirrorOptions _o;
    private readonly long _cluster;
    private readonly HierarchicalBitmap _dirty;
    private readonly object _lock = new();
    /// <summary>Clusters being copied: a copy of a cluster never overlaps another copy of it, so an older read can
    /// never land on the target after a newer one.</summary>
    private readonly HashSet<long> _inFlight = new();
    private readonly SemaphoreSlim _work = new(0);
    private volatile int _finish; // 0: run on, 1: complete with pivot, 2: complete without
    private volatile bool _pivoting;
    /// <summary>Write-blocking: guest writes copy their own clusters (asked for, or turned on to converge).</summary>
    private volatile bool _active;
    /// <summary>Before ready: when the first pass over the dirty set ended (Environment.TickCount64), 0 before.</summary>
    private long _firstPassEnded;
    private volatile bool _ready;
    private bool _hooked;
    private long _next;

    public override bool IsBlockJob => true;
    protected internal override bool SupportsComplete => true;

    /// <summary>Whether the switch-over happened.</summary>
    public bool Pivoted { get; private set; }

    public BlockImage TargetImage => _o.Target;

    /// <summary>The image read (QEMU blocks resizing it while the job runs).</summary>
    public BlockImage SourceImage => _o.Source;

    public MirrorJob(string id, MirrorOptions options, bool autoFinalize, bool autoDismiss) : base(id, "mirror", autoFinalize, autoDismiss)
    {
        _o = options;
        Speed = options.Speed;
        _cluster = CopyUnit(options);
        _dirty = new HierarchicalBitmap((options.Source.Size + _cluster - 1) / _cluster);
        _active = options.WriteBlocking;
    }

    /// <summary>
    /// What one dirty bit stands for and a copy covers: the granularity, or the target's cluster when the target's
    /// header names a backing file it was opened without (blockdev-add backing: null) and its clusters are larger.
    /// Such a target cannot copy on write: a part of a cluster written alone gets zeros around it, and a zeroed part
    /// of an unallocated cluster stays unallocated, where the file read over its backing must show the backing's
    /// data. QEMU's mirror copies around to whole target clusters then (its COW bitmap, which after a cluster's first
    /// copy goes back to the granularity; this one stays at whole clusters, more copying for the same result).
    /// </summary>
    private static long CopyUnit(MirrorOptions o)
    {
        long targetCluster = o.Target.ClusterSize;
        bool copiesAround = o.Target.BackingFileName is not null && o.Target.Backing is null && targetCluster > o.Granularity;
        return copiesAround ? targetCluster : o.Granularity;
    }

    /// <summary>Whether guest writes copy their own clusters to the target before they complete.</summary>
    public bool WriteBlocking => _active;

    /// <summary>Starts tracking writes and marks what the chosen sync copies.</summary>
    public void Prepare()
    {
        switch (_o.Sync)
        {
            case MirrorSync.Full:
                _dirty.SetRange(0, _dirty.Length);
                break;
            case MirrorSync.Top:
                foreach (var (off, len) in _o.Source.AllocatedInThisLayer()) Mark(off, len);
                break;
        }
        SetTotal(DirtyBytes());
        _o.Source.AddAfterWriteHook(OnSourceWritten);
        _hooked = true;
    }

    private long DirtyBytes() => Math.Min(_dirty.Count * _cluster, _o.Source.Size);

    private void Mark(long offset, long length)
    {
        if (length <= 0) return;
        long first = offset / _cluster, last = Math.Min((offset + length - 1) / _cluster, _dirty.Length - 1);
        _dirty.SetRange(first, last - first + 1);
    }

    private void OnSourceWritten(long offset, long length)
    {
        Mark(offset, length);
        if (_active && length > 0)
        {
            // The guest's write waits for its copy: take each cluster (after any copy of it in flight) and copy it now.
            long first = offset / _cluster, last = Math.Min((offset + length - 1) / _cluster, _dirty.Length - 1);
            for (long c = first; c <= last; c++)
            {
                lock (_lock)
                {
                    while (_inFlight.Contains(c)) Monitor.Wait(_lock);
                    if (!_dirty.Get(c)) continue;
                    _dirty.ResetRange(c, 1);
                    _inFlight.Add(c);
                }
                try
                {
                    CopyRange(c * _cluster, (int)Math.Min(_cluster, _o.Source.Size - c * _cluster));
                    AddProgress(Math.Min(_cluster, _o.Source.Size - c * _cluster));
                }
                catch
                {
                    lock (_lock) _dirty.SetRange(c, 1);
                    throw;
                }
                finally
                {
                    Release(c, 1);
                }
            }
        }
        SetTotal(Progress + DirtyBytes());
        _work.Release();
    }

    private void Release(long cluster, long count)
    {
        lock (_lock)
        {
            for (long c = cluster; c < cluster + count; c++) _inFlight.Remove(c);
            Monitor.PulseAll(_lock);
        }
    }

    private void CopyRange(long offset, int length)
    {
        string side = "read";
        try
        {
            var status = ChainStatus.Get(_o.Source, offset, length);
            if (status.Zero && status.Length == length)
            {
                side = "write";
                _o.Target.WriteZeroes(offset, length, mayUnmap: false);
                return;
            }
            using var lease = AlignedBuffers.Rent(length);
            var buffer = lease.Memory.Span[..length];
            _o.Source.Read(offset, buffer);
            side = "write";
            _o.Target.Write(offset, buffer);
        }
        catch (BlockIOException e)
        {
            e.Operation ??= side;
            throw;
        }
    }

    /// <summary>The error policy for an I/O error, by the side it happened on.</summary>
    private string Policy(BlockIOException e) => (e.Operation == "write" ? _o.OnTargetError : _o.OnSourceError) switch
    {
        "enospc" => e.Errno == 28 ? "stop" : "report",
        "auto" => "report",
        var p => p,
    };

    protected internal override void OnComplete(bool pivot)
    {
        _finish = pivot ? 1 : 2;
        _work.Release();
    }

    protected internal override async Task RunAsync(CancellationToken ct)
    {
        // As QEMU: accepted, then failed by the job itself.
        if (_o.Target.Size != _o.Source.Size) throw new BlockException("Source and target image have different sizes");
        bool ready = false;
        while (true)
        {
            await CopyDirtyAsync(ct);
            _o.Target.Flush();
            if (!ready)
            {
                ready = _ready = true;
                BecomeReady();
            }
            if (_finish == 1)
            {
                if (_o.Pivot is null) throw new BlockException("this mirror has nothing to switch over");
                _pivoting = true;
                await _o.Pivot(async () =>
                {
                    // Writers are stopped: what is dirty now is all there is. The source and target are drained for
                    // the switch: the job's own requests are the ones inside the graph.
                    await CopyDirtyAsync(ct, finalCopy: true);
                    using var inside = NodeRequests.Internal();
                    _o.Target.Flush();
                });
                Pivoted = true;
                return;
            }
            if (_finish == 2)
            {
                await CopyDirtyAsync(ct, finalCopy: true);
                _o.Target.Flush();
                return;
            }
            if (_dirty.Count == 0) await _work.WaitAsync(TimeSpan.FromMilliseconds(100), ct);
        }
    }

    /// <summary>Copies every dirty cluster with a few workers, in runs of up to 1 MiB; writes that land meanwhile
    /// mark their clusters again, so a copy that read old data is repeated.</summary>
    /// <param name="finalCopy">The copy after job-complete or a soft cancel, which runs until nothing is dirty.</param>
    private async Task CopyDirtyAsync(CancellationToken ct, bool finalCopy = false)
    {
        long runLimit = Math.Max(1, (1L << 20) / _cluster);
        var workers = Enumerable.Range(0, Math.Max(1, _o.Workers)).Select(_ => Task.Run(async () =>
        {
            while (true)
            {
                ct.ThrowIfCancellationRequested();
                await PausePointAsync();
                // Held while the source is drained, except for the switch-over's own final copy (the pivot drains).
                if (!_pivoting) await _o.Source.Requests.WhileDrainedAsync();
                try
                {
                    bool allTaken = false;
                    long copied = 0;
                    if (Speed > 0)
                    {
                        await CopyInsideGraphAsync(() => allTaken = CopyRuns(runLimit, finalCopy, maxRuns: 1, ct, ref copied));
                        if (copied > 0) await Task.Delay(TimeSpan.FromSeconds(Math.Min(1.0, copied / (double)Speed)), ct);
                    }
                    else await CopyInsideGraphAsync(() => allTaken = CopyRuns(runLimit, finalCopy, int.MaxValue, ct, ref copied));
                    if (allTaken) return;
                }
                catch (BlockIOException e) when (Policy(e) is "stop" or "ignore")
                {
                    // Still dirty (CopyTakenRun marked it again): reported, and copied again after a resume (stop) or
                    // at once (ignore).
                    IoError(e.Operation ?? "read", Policy(e));
                    if (Policy(e) == "ignore") await Task.Delay(10, CancellationToken.None);
                }
            }
        }, CancellationToken.None)).ToArray();
        await Task.WhenAll(workers);
        SetTotal(Progress + DirtyBytes());
    }

    /// <summary>Takes the next run of dirty clusters no copy holds (up to <paramref name="limit"/>), clearing them
    /// before the read: a write landing after this point marks them again. Null when there is nothing to take, or
    /// the job was asked to complete and this is not the final copy (the rest is the switch-over's).</summary>
    private (long Cluster, long Count)? TakeDirtyRun(long limit, bool finalCopy)
    {
        lock (_lock)
        {
            if (_finish != 0 && !finalCopy) return null;
            long cluster = NextFree(Interlocked.Read(ref _next));
            if (cluster < 0)
            {
                PassEnded();
                cluster = NextFree(0);
            }
            if (cluster < 0) return null;
            if (!_active && !_ready && _firstPassEnded != 0 && Environment.TickCount64 - _firstPassEnded > _o.ConvergeWithin.TotalMilliseconds)
                _active = true; // guest writes outpace the copy: see the class comment
            long count = 1;
            while (count < limit && cluster + count < _dirty.Length && _dirty.Get(cluster + count) && !_inFlight.Contains(cluster + count)) count++;
            _dirty.ResetRange(cluster, count);
            for (long c = cluster; c < cluster + count; c++) _inFlight.Add(c);
            Interlocked.Exchange(ref _next, cluster + count);
            return (cluster, count);
        }
    }

    /// <summary>Copies a taken run on the current copy thread and returns its length; a run that fails is dirty again.</summary>
    private int CopyTakenRun((long Cluster, long Count) run)
    {
        long offset = run.Cluster * _cluster;
        int length = (int)Math.Min(run.Count * _cluster, _o.Source.Size - offset);
        try
        {
            CopyRange(offset, length);
        }
        catch
        {
            lock (_lock) _dirty.SetRange(run.Cluster, run.Count);
            Release(run.Cluster, run.Count);
            throw;
        }
        Release(run.Cluster, run.Count);
        AddProgress(length);
        return length;
    }

    /// <summary>
    /// Takes and copies up to <paramref name="maxRuns"/> dirty runs one after another on this copy thread, until none
    /// is left (true) or the loop must go back to its pause, drain and cancel points (false): one trip to a copy
    /// thread for many runs, as a backup's loop does, since a hand-over between threads costs as much as copying a
    /// small run. <paramref name="copied"/> adds up the bytes copied.
    /// </summary>
    private bool CopyRuns(long runLimit, bool finalCopy, int maxRuns, CancellationToken ct, ref long copied)
    {
        for (int i = 0; i < maxRuns; i++)
        {
            if (ct.IsCancellationRequested || !PausePointAsync().IsCompleted || (maxRuns > 1 && Speed > 0)) return false;
            // Counted in flight on the source before the run is taken: a drain that begins later waits for this copy,
            // and one already begun sends the loop back to wait for its end. The switch-over's final copy runs inside
            // the pivot's own drain.
            bool admitted = !_pivoting;
            if (admitted && !_o.Source.Requests.TryAdmit()) return false;
            try
            {
                if (TakeDirtyRun(runLimit, finalCopy) is not { } run) return true;
                copied += CopyTakenRun(run);
            }
            finally
            {
                if (admitted) _o.Source.Requests.LeaveAdmitted();
            }
        }
        return false;
    }

    /// <summary>A worker found nothing dirty after the cursor: a pass over the dirty set ended (caller holds the lock).</summary>
    private void PassEnded()
    {
        if (_firstPassEnded == 0) _firstPassEnded = Math.Max(1, Environment.TickCount64);
    }

    /// <summary>The next dirty cluster at or after <paramref name="from"/> that no copy holds (caller holds the lock).</summary>
    private long NextFree(long from)
    {
        for (long c = _dirty.NextSet(from); c >= 0; c = _dirty.NextSet(c + 1))
            if (!_inFlight.Contains(c)) return c;
        return -1;
    }

    private void Unhook()
    {
        if (!_hooked) return;
        _hooked = false;
        _o.Source.RemoveAfterWriteHook(OnSourceWritten);
    }

    protected internal override void Commit() => Unhook();

    protected internal override void Abort() => Unhook();

    protected internal override void Clean()
    {
        Unhook();
        _o.Release?.Invoke();
    }
}
