using Strata.Block.Bitmaps;

namespace Strata.Block.Filters;

/// <summary>
/// The copy-before-write filter node a backup job shows while it runs (QEMU inserts one above the source,
/// named by filter-node-name or automatically). The job itself intercepts the source's writes; this node is
/// the graph's view of that: reads and writes pass to the source, and it lists the filter's two internal
/// bitmaps as QEMU does — the access map (everything) and the clusters copy-before-write has handled.
/// </summary>
public sealed class BackupFilterImage : BlockImage
{
    private readonly BlockImage _source;

    public BackupFilterImage(BlockImage source, long cluster, Func<long> handledBytes)
    {
        _source = source;
        Bitmaps = new BitmapSet(source.Size, cluster) { PersistenceCheck = (_, _) => "Operation not supported" };
        long whole = (source.Size + cluster - 1) / cluster * cluster;
        Bitmaps.AddInternal(new InternalBitmap(cluster, handledBytes, () => false));
        Bitmaps.AddInternal(new InternalBitmap(cluster, () => whole, () => false));
    }

    public override string FormatName => "copy-before-write";
    public override long Size => _source.Size;
    public override bool ReadOnly => _source.ReadOnly;
    public override string FileName => _source.FileName;
    public override int ClusterSize => _source.ClusterSize;
    public override BlockImage? FilteredChild => _source;

    public override void Read(long offset, Span<byte> buffer) => _source.Read(offset, buffer);
    public override void Write(long offset, ReadOnlySpan<byte> data) => _source.Write(offset, data);
    public override void WriteZeroes(long offset, long length, bool mayUnmap) => _source.WriteZeroes(offset, length, mayUnmap);
    public override void Discard(long offset, long length) => _source.Discard(offset, length);
    public override void Flush() => _source.Flush();
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => _source.GetLayerStatus(offset, maxLength);
    public override void Resize(long newSize) => throw new BlockException("Cannot resize a node under a backup job");

    /// <summary>The source belongs to its own node.</summary>
    public override void Dispose() => GC.SuppressFinalize(this);
}
