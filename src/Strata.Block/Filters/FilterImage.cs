namespace Strata.Block.Filters;

/// <summary>
/// A filter node over one child (copy-before-write and the backup job's view of it): guest I/O passes straight to
/// the child, which belongs to its own node; QEMU reports the child as the filter's backing image.
/// </summary>
public abstract class FilterImage : BlockImage
{
    protected FilterImage(BlockImage child)
    {
        Child = child;
        child.AddParent(this);
        // A filter's own bitmaps (none unless someone adds one) are marked by the request path like any node's.
        Bitmaps = new Bitmaps.BitmapSet(child.Size, Strata.Block.Bitmaps.BitmapSet.DefaultGranularityFor(0)) { PersistenceCheck = (_, _) => "Operation not supported" };
    }

    protected BlockImage Child { get; }

    public override IEnumerable<BlockImage> Children => [Child];

    public override long Size => Child.Size;
    public override bool ReadOnly => Child.ReadOnly;
    public override string FileName => Child.FileName;
    public override int ClusterSize => Child.ClusterSize;
    public override BlockImage? FilteredChild => Child;

    protected override void DriverRead(long offset, Span<byte> buffer) => Child.Read(offset, buffer);
    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => Child.Write(offset, data);
    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => Child.WriteZeroes(offset, length, mayUnmap);
    protected override void DriverDiscard(long offset, long length) => Child.Discard(offset, length);
    protected override void DriverFlush() => Child.Flush();

    /// <summary>The child belongs to its own node: only the link to it goes.</summary>
    public override void Dispose()
    {
        Child.RemoveParent(this);
        GC.SuppressFinalize(this);
    }
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => Child.GetLayerStatus(offset, maxLength);
    public override void Resize(long newSize) => throw new BlockException($"Cannot resize a node under {FormatName}");
}
