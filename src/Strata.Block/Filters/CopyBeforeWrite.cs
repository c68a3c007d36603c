using System.Buffers;
using Strata.Block.Bitmaps;

namespace Strata.Block.Filters;

/// <summary>
/// The copy-before-write filter (QEMU's driver=copy-before-write): from the moment it is inserted, the old
/// contents of every cluster still "to copy" are copied to the target before any write may change them. With a
/// bitmap, only the bitmap's dirty clusters are kept. <see cref="SnapshotAccessImage"/> reads the frozen view.
/// Reads and writes through the filter go to the source.
/// </summary>
public sealed class CopyBeforeWriteImage : FilterImage
{
    private readonly BlockImage _target;
    private readonly long _cluster;
    private readonly HierarchicalBitmap _toCopy;
    private readonly HierarchicalBitmap _copied;
    private readonly HashSet<long> _inFlight = new();
    private readonly Dictionary<long, int> _readers = new();
    private readonly object _lock = new();
    private volatile bool _broken;
    private readonly bool _breakSnapshot;
    private readonly TimeSpan _timeout;

    /// <param name="breakSnapshot">on-cbw-error=break-snapshot: a failed copy breaks the snapshot and lets the guest
    /// write through; otherwise (break-guest-write, QEMU's default) the guest write fails and the snapshot stays.</param>
    /// <param name="timeoutSeconds">cbw-timeout: a copy that takes longer counts as failed (0: no limit).</param>
    public CopyBeforeWriteImage(BlockImage source, BlockImage target, DirtyBitmap? bitmap, bool breakSnapshot = false, uint timeoutSeconds = 0)
        : base(source)
    {
        _breakSnapshot = breakSnapshot;
        _timeout = timeoutSeconds == 0 ? Timeout.InfiniteTimeSpan : TimeSpan.FromSeconds(timeoutSeconds);
        if (target.Size < source.Size) throw new BlockException("The target must be at least as large as the source");
        _target = target;
        _cluster = Math.Max(65536, target.ClusterSize);
        long clusters = (source.Size + _cluster - 1) / _cluster;
        _toCopy = new HierarchicalBitmap(clusters);
        _copied = new HierarchicalBitmap(clusters);
        if (bitmap is null) _toCopy.SetRange(0, clusters);
        else
            foreach (var (off, len) in bitmap.DirtyExtents())
            {
                long first = off / _cluster, last = (off + len - 1) / _cluster;
                _toCopy.SetRange(first, last - first + 1);
            }
        // The source's writes come down into the target: draining the target holds them too.
        target.AddParent(source);
        source.AddBeforeWriteHook(OnSourceWrite);
    }

    public override string FormatName => "copy-before-write";
    /// <summary>Before a write reaches the source: copy the old contents of its clusters still to copy.</summary>
    private void OnSourceWrite(long offset, long length)
    {
        if (length <= 0 || _broken) return;
        long first = offset / _cluster, last = Math.Min((offset + length - 1) / _cluster, _toCopy.Length - 1);
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
                long at = c * _cluster;
                int n = (int)Math.Min(_cluster, Child.Size - at);
                if (_timeout == Timeout.InfiniteTimeSpan) CopyCluster(at, n);
                else if (!Task.Run(() =>
                         {
                             // Part of the guest write waiting for it: a drain of the source must not hold it.
                             using var inside = NodeRequests.Internal();
                             CopyCluster(at, n);
                         }).Wait(_timeout))
                    throw new BlockIOException("copy-before-write timed out", 110);
                lock (_lock) _copied.SetRange(c, 1);
            }
            catch (Exception e) when (e is BlockException or AggregateException)
            {
                var cause = (e as AggregateException)?.InnerException ?? e;
                if (_breakSnapshot)
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
                lock (_lock)
                {
                    _inFlight.Remove(c);
                    Monitor.PulseAll(_lock);
                }
            }
        }
    }

    private void CopyCluster(long at, int n)
    {
        var buffer = ArrayPool<byte>.Shared.Rent(n);
        try
        {
            Child.Read(at, buffer.AsSpan(0, n));
            _target.Write(at, buffer.AsSpan(0, n));
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Reads the view frozen at insertion: copied clusters from the target, untouched ones from the
    /// source (held against writes while being read); clusters outside the bitmap cannot be read.</summary>
    internal void ReadSnapshot(long offset, Span<byte> buffer)
    {
        // QEMU answers both of these with EACCES.
        if (_broken) throw new BlockIOException("The snapshot is no longer valid", 13);
        long pos = offset, end = offset + buffer.Length;
        while (pos < end)
        {
            long c = pos / _cluster;
            int n = (int)(Math.Min((c + 1) * _cluster, end) - pos);
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
                if (fromTarget) _target.Read(pos, slice);
                else Child.Read(pos, slice);
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

    internal long SnapshotSize => Child.Size;

    public override void Dispose()
    {
        Child.RemoveBeforeWriteHook(OnSourceWrite);
        _target.RemoveParent(Child);
        _broken = true;
        base.Dispose();
    }
}

/// <summary>QEMU's snapshot-access driver: the read-only point-in-time view of a copy-before-write filter.</summary>
public sealed class SnapshotAccessImage : BlockImage
{
    private readonly CopyBeforeWriteImage cbw;

    public SnapshotAccessImage(CopyBeforeWriteImage filter)
    {
        cbw = filter;
        Bitmaps = new BitmapSet(filter.SnapshotSize, BitmapSet.DefaultGranularityFor(0)) { PersistenceCheck = (_, _) => "Operation not supported" };
    }

    public override string FormatName => "snapshot-access";
    public override long Size => cbw.SnapshotSize;
    public override bool ReadOnly => true;
    public override string FileName => cbw.FileName;

    protected override void DriverRead(long offset, Span<byte> buffer) => cbw.ReadSnapshot(offset, buffer);

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverDiscard(long offset, long length) => throw new BlockException("snapshot-access nodes are read-only");
    protected override void DriverFlush() { }
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => new(offset, Math.Min(maxLength, Size - offset), LayerState.Data, -1);
    public override void Resize(long newSize) => throw new BlockException("snapshot-access nodes cannot be resized");

    public override void Dispose() => GC.SuppressFinalize(this);
}
