namespace Strata.Block.Filters;

/// <summary>A throttle group (--object throttle-group): a byte rate shared by every throttle node in it.</summary>
public sealed class ThrottleGroup(string id, long bytesPerSecond)
{
    private readonly object _lock = new();
    private DateTime _next = DateTime.MinValue;

    public string Id { get; } = id;
    public long BytesPerSecond { get; } = bytesPerSecond;

    /// <summary>Waits until <paramref name="bytes"/> may pass (0 bytes/s: unlimited).</summary>
    public void Take(long bytes)
    {
        if (BytesPerSecond <= 0 || bytes <= 0) return;
        TimeSpan wait;
        lock (_lock)
        {
            var now = DateTime.UtcNow;
            if (_next < now) _next = now;
            wait = _next - now;
            _next += TimeSpan.FromSeconds((double)bytes / BytesPerSecond);
        }
        if (wait > TimeSpan.Zero) Thread.Sleep(wait);
    }
}

/// <summary>QEMU's throttle filter driver: I/O to its child passes at the group's rate.</summary>
public sealed class ThrottleImage : BlockImage
{
    private readonly BlockImage _child;
    private readonly ThrottleGroup _group;

    public ThrottleImage(BlockImage child, ThrottleGroup group)
    {
        _child = child;
        _group = group;
        child.AddParent(this);
        Bitmaps = new Strata.Block.Bitmaps.BitmapSet(child.Size, Strata.Block.Bitmaps.BitmapSet.DefaultGranularityFor(0)) { PersistenceCheck = (_, _) => "Operation not supported" };
    }

    public override string FormatName => "throttle";
    public override long Size => _child.Size;
    public override bool ReadOnly => _child.ReadOnly;
    public override string FileName => _child.FileName;
    public override int ClusterSize => _child.ClusterSize;

    public override IEnumerable<BlockImage> Children => [_child];

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        _group.Take(buffer.Length);
        _child.Read(offset, buffer);
    }

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
        _group.Take(data.Length);
        _child.Write(offset, data);
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => _child.WriteZeroes(offset, length, mayUnmap);

    protected override void DriverDiscard(long offset, long length) => _child.Discard(offset, length);

    protected override void DriverFlush() => _child.Flush();
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => _child.GetLayerStatus(offset, maxLength);
    public override void Resize(long newSize) => throw new BlockException("Cannot resize through a throttle node");

    public override void Dispose()
    {
        _child.RemoveParent(this); // the child belongs to its own node
        GC.SuppressFinalize(this);
    }
}
