namespace Strata.Block.Filters;

/// <summary>
/// A filter node over one child (copy-before-write and the backup job's view of it): guest I/O passes straight to
/// the child, which belongs to its own node; QEMU reports the child as the filter's backing image.
/// </summary>
public abstract class FilterImage(BlockImage child) : BlockImage
{
    protected BlockImage Child { get; } = child;

    public override long Size => Child.Size;
    public override bool ReadOnly => Child.ReadOnly;
    public override string FileName => Child.FileName;
    public override int ClusterSize => Child.ClusterSize;
    public override BlockImage? FilteredChild => Child;

    public override void Read(long offset, Span<byte> buffer) => Child.Read(offset, buffer);
    public override void Write(long offset, ReadOnlySpan<byte> data) => Child.Write(offset, data);
    public override void WriteZeroes(long offset, long length, bool mayUnmap) => Child.WriteZeroes(offset, length, mayUnmap);
    public override void Discard(long offset, long length) => Child.Discard(offset, length);
    public override void Flush() => Child.Flush();
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => Child.GetLayerStatus(offset, maxLength);
    public override void Resize(long newSize) => throw new BlockException($"Cannot resize a node under {FormatName}");
}
