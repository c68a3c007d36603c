namespace Strata.Block;

/// <summary>
/// The raw format over a protocol node that is not a host file (nbd, null-co), as qemu-img opens
/// <c>nbd://…</c> or <c>null-co://</c>: guest bytes are the node's bytes and the image calls itself "raw".
/// </summary>
public sealed class RawOverNode : BlockImage
{
    private readonly BlockImage _node;

    public RawOverNode(BlockImage node)
    {
        _node = node;
        Bitmaps = new Bitmaps.BitmapSet(node.Size, Strata.Block.Bitmaps.BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (_, _) => "Operation not supported",
        };
    }

    public override string FormatName => "raw";
    public override long Size => _node.Size;
    public override bool ReadOnly => _node.ReadOnly;
    public override string FileName => _node.FileName;
    public override bool ReadsZeroesWhereUnallocated => _node.ReadsZeroesWhereUnallocated;

    protected override void DriverRead(long offset, Span<byte> buffer) => _node.Read(offset, buffer);
    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => _node.Write(offset, data);
    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => _node.WriteZeroes(offset, length, mayUnmap);
    protected override void DriverDiscard(long offset, long length) => _node.Discard(offset, length);
    protected override void DriverFlush() => _node.Flush();

    /// <summary>The node's status, each byte at its own offset: QEMU's raw format and its nbd and null-co protocols
    /// all report the offset as valid, so `map` shows it.</summary>
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => _node.GetLayerStatus(offset, maxLength) is var e && e.Length > 0
        ? e with { HostOffset = e.Offset }
        : e;

    public override void Resize(long newSize) => _node.Resize(newSize);

    public override void Dispose()
    {
        base.Dispose();
        _node.Dispose();
    }
}
