using Strata.Block.Bitmaps;

namespace Strata.Block.Filters;

/// <summary>
/// The copy-before-write filter node a backup job shows while it runs (QEMU inserts one above the source, named by
/// filter-node-name or automatically): the graph's view of the job's <see cref="CopyBeforeWrite"/>, which sits in the
/// source's request path itself. Reads and writes pass to the source, and it lists the filter's two internal bitmaps as
/// QEMU does — the access map (everything) and the clusters copy-before-write has handled.
/// </summary>
public sealed class BackupFilterImage : FilterImage
{
    internal BackupFilterImage(CopyBeforeWrite copyBeforeWrite) : base(copyBeforeWrite.Source)
    {
        long cluster = copyBeforeWrite.ClusterSize, size = copyBeforeWrite.Source.Size;
        Bitmaps = new BitmapSet(size, cluster) { PersistenceCheck = (_, _) => "Operation not supported" };
        long whole = (size + cluster - 1) / cluster * cluster;
        Bitmaps.AddInternal(new InternalBitmap(cluster, () => copyBeforeWrite.HandledBytes, () => false));
        Bitmaps.AddInternal(new InternalBitmap(cluster, () => whole, () => false));
    }

    public override string FormatName => "copy-before-write";
}
