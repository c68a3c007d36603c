namespace Strata.Block.Operations;

/// <summary>What <c>qemu-img measure</c> reports: file sizes a new image needs. <see cref="BitmapsSize"/> is null
/// where qemu-img leaves the line out (no source, or a source or target without persistent bitmaps).</summary>
public readonly record struct MeasureResult(long Required, long FullyAllocated, long? BitmapsSize);

/// <summary>The target format's layout choices that change its size.</summary>
public sealed record MeasureTarget
{
    public required string Format { get; init; }
    public int ClusterSize { get; init; } = 65536;
    public int RefcountBits { get; init; } = 16;
    public bool ExtendedL2 { get; init; }
    /// <summary>qcow2 version 3 (compat=1.1); version 2 cannot hold bitmaps.</summary>
    public bool Version3 { get; init; } = true;
    /// <summary>The new image gets a backing file: nothing of the source can be assumed shared, all of it counts.</summary>
    public bool HasBackingFile { get; init; }
    /// <summary>preallocation=falloc or full: the data is all allocated.</summary>
    public bool PreallocatesData { get; init; }
}

/// <summary>The size computations of qemu-img measure, for raw and qcow2 targets (QEMU's formulas, so the
/// numbers agree to the byte).</summary>
public static class ImageMeasure
{
    private const int L1EntrySize = 8;
    private const long MaxL1Bytes = 32L << 20;
    private static long L2EntrySize(bool extendedL2) => extendedL2 ? 16 : 8;
    private const int RefTableEntrySize = 8;
    private const int BitmapTableEntrySize = 8;
    private const int BitmapDirEntryHeader = 24;

    /// <summary>Measures for a new image of <paramref name="size"/> bytes (--size), or converted from
    /// <paramref name="source"/> (then <paramref name="size"/> is ignored).</summary>
    public static MeasureResult Measure(MeasureTarget target, BlockImage? source, long size)
    {
        if (target.Format == "raw")
        {
            long raw = source?.Size ?? RoundUp(size, 512);
            return new MeasureResult(raw, raw, null);
        }
        long cluster = target.ClusterSize;
        long virtualSize = RoundUp(source?.Size ?? size, cluster);
        // QEMU's limit: an L1 table of at most 32 MiB.
        long l2Tables = (virtualSize / cluster + cluster / L2EntrySize(target.ExtendedL2) - 1) / (cluster / L2EntrySize(target.ExtendedL2));
        if (l2Tables * L1EntrySize > MaxL1Bytes)
            throw new BlockException("The image size is too large (try using a larger cluster size)");
        long required = 0;
        if (source is not null)
            required = target.HasBackingFile ? virtualSize : AllocatedClusterBytes(source, cluster);
        if (target.PreallocatesData) required = virtualSize;
        long fully = FullyAllocatedQcow2(virtualSize, cluster, System.Numerics.BitOperations.Log2((uint)target.RefcountBits), target.ExtendedL2);
        long? bitmaps = target.Version3 && source?.FormatName == "qcow2" ? BitmapsSize(source, cluster) : null;
        // The metadata of the fully allocated image stays counted: required overestimates, as qemu-img's does.
        return new MeasureResult(fully - virtualSize + required, fully, bitmaps);
    }

    /// <summary>Bytes of whole target clusters the source's data touches (zero ranges need none: the new image has
    /// no backing file).</summary>
    private static long AllocatedClusterBytes(BlockImage source, long cluster)
    {
        long required = 0;
        for (long offset = 0, n; offset < source.Size; offset += n)
        {
            var e = ChainStatus.Get(source, offset, source.Size - offset);
            n = e.Length;
            if (e.Zero || !(e.Present && e.Data)) continue;
            // The rest of the last cluster is part of it: the next extent starts at the cluster end.
            n = RoundUp(offset + n, cluster) - offset;
            required += offset % cluster + n;
        }
        return required;
    }

    /// <summary>A qcow2 image with every cluster allocated: header, L1 and L2 tables, refcount structures, data.</summary>
    public static long FullyAllocatedQcow2(long virtualSize, long cluster, int refcountOrder, bool extendedL2)
    {
        long alignedSize = RoundUp(virtualSize, cluster);
        long l2EntrySize = L2EntrySize(extendedL2);
        long meta = cluster; // header
        long l2Entries = RoundUp(alignedSize / cluster, cluster / l2EntrySize);
        meta += l2Entries * l2EntrySize;
        long l1Entries = RoundUp(l2Entries * l2EntrySize / cluster, cluster / L1EntrySize);
        meta += l1Entries * L1EntrySize;
        meta += RefcountMetadataSize((meta + alignedSize) / cluster, cluster, refcountOrder);
        return meta + alignedSize;
    }

    /// <summary>Refcount table and blocks for <paramref name="clusters"/> clusters, themselves counted too: the
    /// fixed point where no further block or table cluster is needed.</summary>
    private static long RefcountMetadataSize(long clusters, long cluster, int refcountOrder)
    {
        long blocksPerTableCluster = cluster / RefTableEntrySize;
        long refcountsPerBlock = cluster * 8 / (1L << refcountOrder);
        long table = 0, blocks = 0, n = 0, last;
        do
        {
            last = n;
            blocks = DivRoundUp(clusters + table + blocks, refcountsPerBlock);
            table = DivRoundUp(blocks, blocksPerTableCluster);
            n = clusters + blocks + table;
        } while (n != last);
        return (blocks + table) * cluster;
    }

    /// <summary>Room for the source's persistent bitmaps in a target of this cluster size: every bitmap fully
    /// allocated, its table, and the bitmap directory.</summary>
    private static long BitmapsSize(BlockImage source, long cluster)
    {
        long size = 0, directory = 0;
        foreach (var b in source.Bitmaps.All)
        {
            if (!b.Persistent || b.Name is null) continue;
            long bytes = DivRoundUp(DivRoundUp(b.DiskSize, b.Granularity), 8);
            long clusters = DivRoundUp(bytes, cluster);
            size += clusters * cluster;
            size += RoundUp(clusters * BitmapTableEntrySize, cluster);
            directory += RoundUp(BitmapDirEntryHeader + System.Text.Encoding.UTF8.GetByteCount(b.Name), 8);
        }
        return size + RoundUp(directory, cluster);
    }

    private static long RoundUp(long value, long unit) => (value + unit - 1) / unit * unit;

    private static long DivRoundUp(long value, long unit) => (value + unit - 1) / unit;
}
