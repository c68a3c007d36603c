namespace Strata.Block;

/// <summary>The null-co driver: a disk of a given size that forgets writes. Reads return zeros either way; only
/// with read-zeroes=on does it also promise zeros in block status (QEMU's default is off: a plain hole).</summary>
public sealed class NullImage : BlockImage
{
    private readonly long _size;
    private readonly bool _readOnly;
    private readonly bool _readZeroes;

    public NullImage(long size, bool readOnly, bool readZeroes = false)
    {
        _size = size;
        _readOnly = readOnly;
        _readZeroes = readZeroes;
        Bitmaps = new Bitmaps.BitmapSet(size, Strata.Block.Bitmaps.BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (_, _) => "Operation not supported",
        };
    }

    public override string FormatName => "null-co";
    public override bool ServesCachedReads => true;
    public override long Size => _size;
    public override bool ReadOnly => _readOnly;
    public override string FileName => "null-co://";

    protected override void DriverRead(long offset, Span<byte> buffer) => buffer.Clear();

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap)
    {
    }

    protected override void DriverDiscard(long offset, long length)
    {
    }

    protected override void DriverFlush()
    {
    }

    public override LayerExtent GetLayerStatus(long offset, long maxLength) =>
        new(offset, Math.Min(maxLength, _size - offset), LayerState.Unallocated, -1);

    public override bool ReadsZeroesWhereUnallocated => _readZeroes;

    public override void Resize(long newSize) => throw new BlockException("null-co nodes cannot be resized");
}
