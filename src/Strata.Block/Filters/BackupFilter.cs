using Strata.Block.Bitmaps;

namespace Strata.Block.Filters;

/// <summary>
/// The copy-before-write filter node a backup job shows while it runs (QEMU inserts one above the source,
/// named by filter-node-name or automatically). The job itself intercepts the source's writes; this node is
/// the graph's view of that: reads and writes pass to the source, and it lists the filter's two internal
/// bitmaps as QEMU does — the access map (everything) and the clusters copy-before-write has handled.
/// </summary>
public sealed class BackupFilterImage : FilterImage
{
    public BackupFilterImage(BlockImage source, long cluster, Func<long> handledBytes) : base(source)
    {
        Bitmaps = new BitmapSet(source.Size, cluster) { PersistenceCheck = (_, _) => "Operation not supported" };
        long whole = (source.Size + cluster - 1) / cluster * cluster;
        Bitmaps.AddInternal(new InternalBitmap(cluster, handledBytes, () => false));
        Bitmaps.AddInternal(new InternalBitmap(cluster, () => whole, () => false));
    }

    public override string FormatName => "copy-before-write";
}
