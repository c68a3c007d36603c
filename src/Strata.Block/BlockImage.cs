namespace Strata.Block;

/// <summary>An error from the block layer with a message fit to show a user.</summary>
public class BlockException(string message) : Exception(message);

/// <summary>What one layer of a chain says about a range, without looking at its backing file.</summary>
public enum LayerState : byte
{
    /// <summary>This layer has nothing: the backing file (or zeros) decides.</summary>
    Unallocated,
    /// <summary>This layer holds data.</summary>
    Data,
    /// <summary>This layer says the range reads as zeros.</summary>
    Zero,
}

/// <summary>A run of bytes in one layer with the same state. <see cref="HostOffset"/> is -1 when there is no
/// host mapping (or it is not contiguous, as for compressed data). <see cref="ZeroOverData"/>: a zero run that is
/// allocated data all the same (a hole in the host file under allocated qcow2 clusters), which QEMU reports as
/// both data and zero.</summary>
public readonly record struct LayerExtent(long Offset, long Length, LayerState State, long HostOffset, bool Compressed = false, bool ZeroOverData = false);

/// <summary>
/// One image layer: a format driver (raw, qcow2) over a host file. Reads fall through to the backing
/// image where this layer is unallocated. All methods are thread-safe.
/// </summary>
public abstract class BlockImage : IDisposable
{
    public abstract string FormatName { get; }
    public abstract long Size { get; }
    public abstract bool ReadOnly { get; }
    public abstract string FileName { get; }

    /// <summary>The node's dirty bitmaps: every write marks the recording ones before it is acknowledged.</summary>
    public Bitmaps.BitmapSet Bitmaps { get; protected set; } = null!;

    /// <summary>Reopens the image read-only (QEMU does this to the old top of an external snapshot): pending metadata
    /// and persistent bitmaps are written, then writes are refused. Drivers that cannot do it say so.</summary>
    public virtual void SwitchToReadOnly() => throw new BlockException($"Cannot reopen '{FileName}' read-only");

    /// <summary>Writes back the persistent bitmaps now (QEMU does so on close); no-op for formats without them.</summary>
    public virtual void StoreBitmaps()
    {
    }

    /// <summary>The persistent bitmaps survive a crash as a superset of the truth (a write-intent record is kept).</summary>
    public virtual bool BitmapsCrashSafe => false;

    /// <summary>Crash-safe tracking: stores the persistent bitmaps now (still in_use) and starts a new intent epoch.</summary>
    public virtual void CheckpointBitmaps()
    {
    }

    /// <summary>Crash-safe tracking: a bitmap changed by a command is durable before the command returns.</summary>
    public virtual void PersistBitmapChanges()
    {
    }

    private Filters.CopyBeforeWrite[] _copyBeforeWrite = [];

    /// <summary>Whether this driver reads only through <see cref="HostFile"/>s (and nodes it reads through, each checked
    /// in its turn), so that a <see cref="CachedReads"/> read can be served without waiting.</summary>
    public virtual bool ServesCachedReads => false;

    /// <summary>Set while this image is a fleecing target: its reads hold their range shared, and copy-before-write
    /// holds it exclusively while it fills it (see <see cref="RangeLock"/>).</summary>
    public RangeLock? ReadSerialiser { get; set; }

    /// <summary>Runs before any change to guest data reaches the format driver: the old contents of the range are
    /// copied first (copy-before-write), which makes a backup or a fleecing snapshot point-in-time.</summary>
    internal void AttachCopyBeforeWrite(Filters.CopyBeforeWrite copyBeforeWrite)
    {
        lock (this) _copyBeforeWrite = [.. _copyBeforeWrite, copyBeforeWrite];
    }

    internal void DetachCopyBeforeWrite(Filters.CopyBeforeWrite copyBeforeWrite)
    {
        lock (this) _copyBeforeWrite = _copyBeforeWrite.Where(c => c != copyBeforeWrite).ToArray();
    }

    private Action<long, long>[] _afterWrite = [];

    /// <summary>Runs once a change to guest data has landed (whether or not it succeeded): a mirror marks the range
    /// to copy again. After, not before: a copy racing the write then always sees the mark.</summary>
    public void AddAfterWriteHook(Action<long, long> hook)
    {
        lock (this) _afterWrite = [.. _afterWrite, hook];
    }

    public void RemoveAfterWriteHook(Action<long, long> hook)
    {
        lock (this) _afterWrite = _afterWrite.Where(h => h != hook).ToArray();
    }

    // ------------------------------------------------------------------ the request path
    //
    // Every read, write, zero write, discard and flush of a node enters here, as in QEMU's block/io.c: range and
    // permission checks, the request counted in flight (what Drain waits for), copy-before-write and the dirty
    // marking, then the driver, which only moves data. Host errors leave as BlockIOException with their errno.

    /// <summary>Reads exactly buffer.Length bytes at <paramref name="offset"/> (must lie inside the image).</summary>
    public void Read(long offset, Span<byte> buffer)
    {
        CheckRange(offset, buffer.Length);
        if (buffer.IsEmpty) return;
        var serialiser = ReadSerialiser; // once: a backup may set it meanwhile
        if (CachedReads.Active && (!ServesCachedReads || serialiser is not null)) CachedReads.ThrowIfActive();
        using var request = Requests.Enter();
        using var serialised = serialiser?.Shared(offset, buffer.Length);
        try
        {
            DriverRead(offset, buffer);
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "read");
        }
    }

    public void Write(long offset, ReadOnlySpan<byte> data) =>
        WriteRequest(offset, data.Length, data, static (image, at, bytes) => image.DriverWrite(at, bytes));

    /// <summary>Makes the range read as zeros; <paramref name="mayUnmap"/> lets the driver free storage.</summary>
    public void WriteZeroes(long offset, long length, bool mayUnmap) =>
        WriteRequest(offset, length, (length, mayUnmap), static (image, at, a) => image.DriverWriteZeroes(at, a.length, a.mayUnmap));

    /// <summary>The guest no longer needs the data: after this the range reads as zeros or as the backing file.</summary>
    public void Discard(long offset, long length) =>
        WriteRequest(offset, length, length, static (image, at, n) => image.DriverDiscard(at, n));

    /// <summary>Writes one whole cluster compressed (at a cluster-aligned offset; the last one may be short).</summary>
    public void WriteCompressed(long offset, ReadOnlySpan<byte> cluster)
    {
        if (!SupportsCompression) throw new BlockException($"Compression is not supported by the {FormatName} format");
        WriteRequest(offset, cluster.Length, cluster, static (image, at, bytes) => image.DriverWriteCompressed(at, bytes));
    }

    /// <summary>A driver call with what it needs (a span included: the state may be a ref struct).</summary>
    private delegate void DriverCall<TState>(BlockImage image, long offset, TState state) where TState : allows ref struct;

    /// <summary>Every change to guest data: checked, counted in flight, copy-before-write run and the recording
    /// bitmaps marked before the driver is called, the after-write hooks when it returns or fails.</summary>
    private void WriteRequest<TState>(long offset, long length, TState state, DriverCall<TState> call) where TState : allows ref struct
    {
        CachedReads.ThrowIfActive(); // before copy-before-write and the bitmaps: a cached-only read changes nothing
        CheckWritable();
        CheckRange(offset, length);
        if (length == 0) return;
        using var request = Requests.Enter();
        foreach (var copyBeforeWrite in _copyBeforeWrite) copyBeforeWrite.BeforeGuestWrite(offset, length);
        Bitmaps.MarkDirty(offset, length);
        try
        {
            call(this, offset, state);
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "write");
        }
        finally
        {
            foreach (var hook in _afterWrite) hook(offset, length);
        }
    }

    /// <summary>Writes back metadata and makes everything written so far durable.</summary>
    public void Flush()
    {
        CachedReads.ThrowIfActive();
        using var request = Requests.Enter();
        try
        {
            DriverFlush();
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "write");
        }
    }

    /// <summary>The driver's read: exactly buffer.Length bytes, inside the image, already checked and counted.</summary>
    protected abstract void DriverRead(long offset, Span<byte> buffer);

    /// <summary>The driver's write: copy-before-write has run and bitmaps are marked; it only moves data.</summary>
    protected abstract void DriverWrite(long offset, ReadOnlySpan<byte> data);

    protected abstract void DriverWriteZeroes(long offset, long length, bool mayUnmap);

    protected abstract void DriverDiscard(long offset, long length);

    protected abstract void DriverFlush();

    protected virtual void DriverWriteCompressed(long offset, ReadOnlySpan<byte> cluster) =>
        throw new BlockException($"Compression is not supported by the {FormatName} format");

    // ------------------------------------------------------------------ in flight and drain

    /// <summary>This node's requests in flight and its drain gate.</summary>
    public NodeRequests Requests { get; } = new();

    private readonly List<BlockImage> _parents = [];

    /// <summary>Nodes whose requests come down to this one (filters above it, overlays, a copy-before-write source
    /// that writes into it): draining this node holds them too, as QEMU quiesces a node's parents.</summary>
    public IReadOnlyList<BlockImage> Parents
    {
        get { lock (_parents) return _parents.ToArray(); }
    }

    /// <summary>Records that <paramref name="parent"/> sends requests to this node (undone by <see cref="RemoveParent"/>).</summary>
    public void AddParent(BlockImage parent)
    {
        lock (_parents) _parents.Add(parent);
    }

    public void RemoveParent(BlockImage parent)
    {
        lock (_parents) _parents.Remove(parent);
    }

    /// <summary>The nodes this one sends requests to: its backing image and a filter's child.</summary>
    public virtual IEnumerable<BlockImage> Children
    {
        get
        {
            if (Backing is { } b) yield return b;
        }
    }

    /// <summary>Quiesces this node: new requests from outside the graph wait, and every request in flight here, in the
    /// nodes above and in the nodes below has ended when this returns. Dispose the section to let requests go on.</summary>
    public DrainedSection Drain() => DrainedSection.Begin([this]);

    /// <summary>The ranges this layer itself holds (data or zeros), not what it reads through to: what sync=top copies.</summary>
    public IEnumerable<(long Offset, long Length)> AllocatedInThisLayer()
    {
        for (long pos = 0; pos < Size;)
        {
            var e = GetLayerStatus(pos, Size - pos);
            if (e.Length <= 0) yield break;
            if (e.State != LayerState.Unallocated) yield return (e.Offset, e.Length);
            pos += e.Length;
        }
    }

    /// <summary>Whether a range this image (with no backing) does not have is known to read as zeros; block status
    /// says "zero" only then.</summary>
    public virtual bool ReadsZeroesWhereUnallocated => true;

    /// <summary>For a filter (copy-before-write), the node it sits on: QEMU reports it as the backing image.</summary>
    public virtual BlockImage? FilteredChild => null;

    /// <summary>The opened backing image, if any (owned by this image).</summary>
    public BlockImage? Backing
    {
        get => _backing;
        protected set
        {
            _backing?.RemoveParent(this);
            _backing = value;
            value?.AddParent(this);
        }
    }

    private BlockImage? _backing;

    /// <summary>Backing file name as stored in the image header (unresolved).</summary>
    public virtual string? BackingFileName => null;

    /// <summary>Backing format as stored in the image header.</summary>
    public virtual string? BackingFormat => null;

    /// <summary>Cluster size, or 0 for formats without clusters.</summary>
    public virtual int ClusterSize => 0;

    /// <summary>Preferred unit of I/O for copying (the cluster size, or 64 KiB).</summary>
    public int CopyGranularity => ClusterSize > 0 ? ClusterSize : 65536;

    /// <summary>State of the range starting at <paramref name="offset"/> in this layer only; the extent returned
    /// starts at <paramref name="offset"/> and is at most <paramref name="maxLength"/> long.</summary>
    public abstract LayerExtent GetLayerStatus(long offset, long maxLength);

    public abstract void Resize(long newSize);

    /// <summary>True when the format can write compressed clusters (<see cref="WriteCompressed"/>).</summary>
    public virtual bool SupportsCompression => false;

    /// <summary>Reads the range as this layer alone would, with unallocated parts as zeros (no backing).</summary>
    public virtual void ReadLayerOnly(long offset, Span<byte> buffer)
    {
        long pos = 0;
        while (pos < buffer.Length)
        {
            var ext = GetLayerStatus(offset + pos, buffer.Length - pos);
            var slice = buffer.Slice((int)pos, (int)ext.Length);
            if (ext.State == LayerState.Data) Read(offset + pos, slice);
            else slice.Clear();
            pos += ext.Length;
        }
    }

    /// <summary>Changes the backing file recorded in the header (no data is touched).</summary>
    public virtual void SetBackingFile(string? backingFile, string? backingFormat) =>
        throw new BlockException($"The {FormatName} format does not support backing files");

    private bool _ownsBacking = true;

    /// <summary>Replaces the opened backing image (after a rebase); this image owns the new one.</summary>
    public void ReplaceBacking(BlockImage? backing)
    {
        if (_ownsBacking) Backing?.Dispose();
        Backing = backing;
        _ownsBacking = true;
    }

    /// <summary>Uses another node's image as the backing image (blockdev-add "backing": NODE); not owned.</summary>
    public void UseBackingNode(BlockImage backing)
    {
        if (_ownsBacking) Backing?.Dispose();
        Backing = backing;
        _ownsBacking = false;
    }

    /// <summary>Reads bytes of the image that this layer does not have: from the backing chain, or zeros.</summary>
    protected void ReadFromBacking(long offset, Span<byte> buffer) => ReadOrZeros(Backing, offset, buffer);

    /// <summary>Reads from <paramref name="image"/> where it has bytes; past its end (or with no image) zeros.</summary>
    public static void ReadOrZeros(BlockImage? image, long offset, Span<byte> buffer)
    {
        long inside = image is null ? 0 : Math.Clamp(image.Size - offset, 0, buffer.Length);
        if (inside > 0) image!.Read(offset, buffer[..(int)inside]);
        buffer[(int)inside..].Clear();
    }

    protected void CheckRange(long offset, long length)
    {
        if (offset < 0 || length < 0 || offset > Size || length > Size - offset)
            throw new BlockException($"Request [{offset}, +{length}) is outside the image (size {Size})");
    }

    protected void CheckWritable()
    {
        if (ReadOnly) throw new BlockException($"Image '{FileName}' is read-only");
    }

    public virtual void Dispose()
    {
        if (_ownsBacking) Backing?.Dispose();
        Backing = null;
        GC.SuppressFinalize(this);
    }
}
