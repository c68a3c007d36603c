using Strata.Block.Bitmaps;

namespace Strata.Block.Filters;

/// <summary>What a copy-before-write does besides copying.</summary>
internal sealed record CopyBeforeWriteOptions
{
    /// <summary>on-cbw-error=break-snapshot: a failed copy breaks the snapshot and lets the guest write through;
    /// otherwise (break-guest-write, QEMU's default) the guest write fails and the snapshot stays.</summary>
    public bool BreakSnapshot { get; init; }

    /// <summary>cbw-timeout: a copy that takes longer counts as failed (infinite: no limit).</summary>
    public TimeSpan Timeout { get; init; } = System.Threading.Timeout.InfiniteTimeSpan;

    /// <summary>Clusters are written to the target compressed (a backup with compress: true).</summary>
    public bool Compress { get; init; }
}

/// <summary>
/// Copy-before-write, the one mechanism behind a push backup, fleecing and the copy-before-write filter node: from
/// the moment it is attached to the source's request path, the old contents of every cluster still "to copy" are
/// copied to the target before a guest write may change them. Every cluster is copied exactly once — by a guest
/// write that comes first, or by whoever takes it with <see cref="TryTake"/> (a backup's background loop) — so the
/// target, together with what is still to copy on the source, is the disk as it was when it was attached
/// (<see cref="ReadSnapshot"/> reads that view). Like QEMU's block-copy state under its copy-before-write filter.
/// </summary>
internal sealed class CopyBeforeWrite
{
    private readonly CopyBeforeWriteOptions _options;
    private readonly HierarchicalBitmap _toCopy;
    /// <summary>Clusters whose old contents are on the target (what the snapshot reads from there).</summary>
    private readonly HierarchicalBitmap _copied;
    /// <summary>Clusters guest writes have come through (the filter's "done" map, for listing).</summary>
    private readonly HierarchicalBitmap _handled;
    /// <summary>Clusters being copied: a guest write, a snapshot read and another copy of one wait for it.</summary>
    private readonly HashSet<long> _inFlight = new();
    /// <summary>Snapshot reads of clusters still on the source: a guest write to one waits until they are done.</summary>
    private readonly Dictionary<long, int> _readers = new();
    private readonly object _lock = new();
    private volatile bool _broken;

    /// <summary>Creates it with nothing to copy yet (<see cref="MarkAllToCopy"/>, <see cref="MarkToCopy"/>); guest
    /// writes are intercepted once it is <see cref="Attach"/>ed.</summary>
    public CopyBeforeWrite(BlockImage source, BlockImage target, CopyBeforeWriteOptions? options = null)
    {
        if (target.Size < source.Size) throw new BlockException("The target must be at least as large as the source");
        Source = source;
        Target = target;
        _options = options ?? new CopyBeforeWriteOptions();
        ClusterSize = Math.Max(65536, target.ClusterSize);
        long clusters = (source.Size + ClusterSize - 1) / ClusterSize;
        _toCopy = new HierarchicalBitmap(clusters);
        _copied = new HierarchicalBitmap(clusters);
        _handled = new HierarchicalBitmap(clusters);
    }

    public BlockImage Source { get; }
    public BlockImage Target { get; }

    /// <summary>The unit of copying: the target's cluster size, at least 64 KiB.</summary>
    public long ClusterSize { get; }

    /// <summary>Length of the maps, in clusters.</summary>
    public long Clusters => _toCopy.Length;

    /// <summary>Bytes of every run copied, by a guest write or by <see cref="CopyRun"/> (a backup's progress).</summary>
    public event Action<long>? Copied;

    /// <summary>A copy a guest write waited for failed (before the guest write is failed or, with break-snapshot,
    /// let through).</summary>
    public event Action<Exception>? CopyFailed;

    /// <summary>Bytes still to copy, counted in whole clusters (QEMU's listing of the copy map).</summary>
    public long ToCopyClusterBytes => _toCopy.Count * ClusterSize;

    /// <summary>Bytes still to copy, the last cluster counted only up to the end of the source (a backup's length).</summary>
    public long ToCopyBytes
    {
        get
        {
            long total = 0;
            lock (_lock)
                foreach (var (start, count) in _toCopy.SetRuns())
                    total += Math.Min((start + count) * ClusterSize, Source.Size) - start * ClusterSize;
            return total;
        }
    }

    /// <summary>Bytes of the clusters guest writes have come through, in whole clusters.</summary>
    public long HandledBytes => _handled.Count * ClusterSize;

    /// <summary>True once a failed copy broke the snapshot (break-snapshot) or the filter went away.</summary>
    public bool IsBroken => _broken;

    public void MarkAllToCopy()
    {
        lock (_lock) _toCopy.SetRange(0, _toCopy.Length);
    }

    /// <summary>Marks the clusters touching [offset, offset+length) to copy.</summary>
    public void MarkToCopy(long offset, long length)
    {
        if (length <= 0) return;
        long first = offset / ClusterSize, last = (offset + length - 1) / ClusterSize;
        lock (_lock) _toCopy.SetRange(first, last - first + 1);
    }

    /// <summary>The runs of clusters never copied.</summary>
    public List<(long Start, long Count)> NotCopied()
    {
        lock (_lock) return _toCopy.SetRuns().ToList();
    }

    /// <summary>Puts itself in the source's request path: from now on a guest write first copies what it would change.
    /// Call it with the source drained, so no write is half-way past the point in time this fixes.</summary>
    public void Attach()
    {
        // The source's writes come down into the target: draining the target holds them too.
        Target.AddParent(Source);
        Source.AttachCopyBeforeWrite(this);
    }

    /// <summary>Leaves the source's request path. A guest write that entered before still finishes its copy: detach
    /// with the source drained when the target may go away right after.</summary>
    public void Detach()
    {
        Source.DetachCopyBeforeWrite(this);
        Target.RemoveParent(Source);
    }

    /// <summary>Ends the snapshot: nothing more is copied, and its reads fail.</summary>
    public void Break() => _broken = true;

    /// <summary>Called by the source's request path before a guest write to [offset, offset+length) reaches its driver:
    /// the clusters of the range still to copy are copied first (or, being copied, waited for).</summary>
    internal void BeforeGuestWrite(long offset, long length)
    {
        if (length <= 0 || _broken) return;
        long first = offset / ClusterSize, last = Math.Min((offset + length - 1) / ClusterSize, _toCopy.Length - 1);
        lock (_lock) _handled.SetRange(first, last - first + 1);
        for (long c = first; c <= last; c++)
        {
            lock (_lock)
            {
                while (_inFlight.Contains(c) || _readers.GetValueOrDefault(c) > 0) Monitor.Wait(_lock);
                if (_broken || !_toCopy.Get(c)) continue;
                _toCopy.ResetRange(c, 1);
                _inFlight.Add(c);
            }
            try
            {
                if (_options.Timeout == Timeout.InfiniteTimeSpan) CopyRun(c, 1);
                else if (!Task.Run(() =>
                         {
                             // Part of the guest write waiting for it: a drain of the source must not hold it.
                             using var inside = NodeRequests.Internal();
                             CopyRun(c, 1);
                         }).Wait(_options.Timeout))
                    throw new BlockIOException("copy-before-write timed out", 110);
                lock (_lock) _copied.SetRange(c, 1);
            }
            catch (Exception e)
            {
                var cause = (e as AggregateException)?.InnerException ?? e;
                CopyFailed?.Invoke(cause);
                if (_options.BreakSnapshot)
                {
                    // The guest's write wins; the snapshot is gone (its reads fail from now on).
                    _broken = true;
                    return;
                }
                lock (_lock) _toCopy.SetRange(c, 1);
                throw new BlockIOException($"copy-before-write failed: {cause.Message}", (cause as BlockIOException)?.Errno ?? 5);
            }
            finally
            {
                Release(c, 1);
            }
        }
    }

    /// <summary>
    /// Takes a run of up to <paramref name="limit"/> adjacent clusters still to copy that no copy holds, looking from
    /// <paramref name="next"/> on (then from the start, for clusters put back behind it), and moves
    /// <paramref name="next"/> past it. Returns the run's length: -1 when nothing is left to copy, 0 when the first
    /// cluster found is being copied (try again).
    /// </summary>
    public long TryTake(ref long next, long limit, out long cluster)
    {
        lock (_lock)
        {
            cluster = _toCopy.NextSet(next);
            if (cluster < 0) cluster = _toCopy.NextSet(0);
            if (cluster < 0) return -1;
            long count = 0;
            while (count < limit && cluster + count < _toCopy.Length && _toCopy.Get(cluster + count) && !_inFlight.Contains(cluster + count))
                count++;
            if (count == 0)
            {
                next = cluster + 1;
                return 0;
            }
            _toCopy.ResetRange(cluster, count);
            for (long c = cluster; c < cluster + count; c++) _inFlight.Add(c);
            next = cluster + count;
            return count;
        }
    }

    /// <summary>A taken run was not copied: it is to copy again (and counts as not copied meanwhile).</summary>
    public void PutBack(long cluster, long count)
    {
        lock (_lock) _toCopy.SetRange(cluster, count);
    }

    /// <summary>A taken run is no longer being copied (copied, or put back): whoever waits for it goes on.</summary>
    public void Release(long cluster, long count)
    {
        lock (_lock)
        {
            for (long c = cluster; c < cluster + count; c++) _inFlight.Remove(c);
            Monitor.PulseAll(_lock);
        }
    }

    /// <summary>Waits until no copy is in flight (the guest writes' copies still running when a backup's loop ended).</summary>
    public void WaitForCopies()
    {
        lock (_lock)
            while (_inFlight.Count > 0) Monitor.Wait(_lock);
    }

    /// <summary>
    /// Copies a taken run with one read and one write per extent (zero areas as write-zeroes, so a sparse disk gives a
    /// sparse copy). <paramref name="beforeFirstRead"/> runs once before the first read, or at the end if there was
    /// none (a backup's reads start in the order its runs were taken). I/O errors leave tagged with the side they met.
    /// </summary>
    public void CopyRun(long cluster, long count, Action? beforeFirstRead = null)
    {
        bool readStarted = false;
        long offset = cluster * ClusterSize;
        int length = (int)Math.Min(ClusterSize * count, Source.Size - offset);
        if (length <= 0) return;
        string side = "read";
        try
        {
            long runEnd = offset + length;
            for (long pos = offset; pos < runEnd;)
            {
                var status = ChainStatus.Get(Source, pos, runEnd - pos);
                bool zero = status.Zero;
                long end = pos + status.Length;
                if (end < runEnd)
                {
                    // Every piece ends on a copy unit (QEMU's rule): zeros are written in whole units only, and a zero run
                    // shorter than a unit is copied as data with the rest of its unit. A target without its backing
                    // (blockdev-add backing: null, as a backup chain's next file is added) takes a partial zeroing of an
                    // unallocated cluster for a no-op, and the chain would then read the last point's data there.
                    long down = end / ClusterSize * ClusterSize;
                    if (zero && down > pos) end = down;
                    else
                    {
                        zero = false;
                        end = Math.Min((end + ClusterSize - 1) / ClusterSize * ClusterSize, runEnd);
                    }
                }
                int n = (int)(end - pos);
                using var serialised = Target.ReadSerialiser?.Exclusive(pos, n);
                if (zero)
                {
                    side = "write";
                    Target.WriteZeroes(pos, n, mayUnmap: true);
                }
                else
                {
                    using var lease = AlignedBuffers.Rent(n);
                    var buffer = lease.Memory.Span[..n];
                    side = "read";
                    if (!readStarted)
                    {
                        beforeFirstRead?.Invoke();
                        readStarted = true;
                    }
                    Source.Read(pos, buffer);
                    side = "write";
                    if (_options.Compress)
                    {
                        // A compressed write covers one target cluster, and a copy unit may hold several (64 KiB
                        // over a target of 32 KiB clusters).
                        int tc = Target.ClusterSize;
                        for (int o = 0; o < n; o += tc)
                        {
                            var piece = buffer.Slice(o, Math.Min(tc, n - o));
                            if ((pos + o) % tc == 0) Target.WriteCompressed(pos + o, piece);
                            else Target.Write(pos + o, piece);
                        }
                    }
                    else Target.Write(pos, buffer);
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
            if (!readStarted) beforeFirstRead?.Invoke();
        }
        Copied?.Invoke(length);
    }

    /// <summary>Reads the view frozen at attachment: copied clusters from the target, untouched ones from the source
    /// (held against guest writes while being read); clusters never to copy cannot be read.</summary>
    public void ReadSnapshot(long offset, Span<byte> buffer)
    {
        // QEMU answers both of these with EACCES.
        if (_broken) throw new BlockIOException("The snapshot is no longer valid", 13);
        long pos = offset, end = offset + buffer.Length;
        while (pos < end)
        {
            long c = pos / ClusterSize;
            int n = (int)(Math.Min((c + 1) * ClusterSize, end) - pos);
            var slice = buffer.Slice((int)(pos - offset), n);
            bool fromTarget, fromSource;
            lock (_lock)
            {
                while (_inFlight.Contains(c)) Monitor.Wait(_lock);
                fromTarget = _copied.Get(c);
                fromSource = !fromTarget && _toCopy.Get(c);
                if (fromSource) _readers[c] = _readers.GetValueOrDefault(c) + 1;
            }
            if (!fromTarget && !fromSource)
                throw new BlockIOException($"Cannot read offset {pos}: it is outside the copy-before-write bitmap", 13);
            try
            {
                if (fromTarget) Target.Read(pos, slice);
                else Source.Read(pos, slice);
            }
            finally
            {
                if (fromSource)
                    lock (_lock)
                    {
                        if (--_readers[c] == 0) _readers.Remove(c);
                        Monitor.PulseAll(_lock);
                    }
            }
            pos += n;
        }
    }
}

/// <summary>
/// The copy-before-write filter node (QEMU's driver=copy-before-write, added by blockdev-add): inserting it attaches a
/// <see cref="CopyBeforeWrite"/> from the source to the target, keeping the clusters of the bitmap (or all of them);
/// <see cref="SnapshotAccessImage"/> reads the frozen view. Reads and writes through the filter go to the source.
/// </summary>
public sealed class CopyBeforeWriteImage : FilterImage
{
    private readonly CopyBeforeWrite _cbw;

    /// <param name="breakSnapshot">on-cbw-error=break-snapshot (see <see cref="CopyBeforeWriteOptions.BreakSnapshot"/>).</param>
    /// <param name="timeoutSeconds">cbw-timeout: a copy that takes longer counts as failed (0: no limit).</param>
    public CopyBeforeWriteImage(BlockImage source, BlockImage target, DirtyBitmap? bitmap, bool breakSnapshot = false, uint timeoutSeconds = 0)
        : base(source)
    {
        _cbw = new CopyBeforeWrite(source, target, new CopyBeforeWriteOptions
        {
            BreakSnapshot = breakSnapshot,
            Timeout = timeoutSeconds == 0 ? Timeout.InfiniteTimeSpan : TimeSpan.FromSeconds(timeoutSeconds),
        });
        if (bitmap is null) _cbw.MarkAllToCopy();
        else
            foreach (var (off, len) in bitmap.DirtyExtents()) _cbw.MarkToCopy(off, len);
        _cbw.Attach();
    }

    public override string FormatName => "copy-before-write";

    internal CopyBeforeWrite Mechanism => _cbw;

    public override void Dispose()
    {
        _cbw.Detach();
        _cbw.Break();
        base.Dispose();
    }
}

/// <summary>QEMU's snapshot-access driver: the read-only point-in-time view of a copy-before-write filter.</summary>
public sealed class SnapshotAccessImage : BlockImage
{
    private readonly CopyBeforeWrite _cbw;

    public SnapshotAccessImage(CopyBeforeWriteImage filter)
    {
        _cbw = filter.Mechanism;
        Bitmaps = new BitmapSet(_cbw.Source.Size, BitmapSet.DefaultGranularityFor(0)) { PersistenceCheck = (_, _) => "Operation not supported" };
    }

    public override string FormatName => "snapshot-access";
    public override long Size => _cbw.Source.Size;
    public override bool ReadOnly => true;
    public override string FileName => _cbw.Source.FileName;

    protected override void DriverRead(long offset, Span<byte> buffer) => _cbw.ReadSnapshot(offset, buffer);

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverDiscard(long offset, long length) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverFlush() { }
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => new(offset, Math.Min(maxLength, Size - offset), LayerState.Data, -1);
    public override void Resize(long newSize) => throw new BlockException("snapshot-access nodes cannot be resized");

    public override void Dispose() => GC.SuppressFinalize(this);
}
