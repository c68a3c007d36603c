namespace Strata.Block;

/// <summary>Where a range of a whole chain comes from, as <c>qemu-img map</c> reports it.</summary>
public readonly record struct ChainExtent(long Offset, long Length, int Depth, bool Present, bool Zero, bool Data, long HostOffset, bool Compressed)
{
    public bool SameKind(in ChainExtent next) =>
        Depth == next.Depth && Present == next.Present && Zero == next.Zero && Data == next.Data && Compressed == next.Compressed &&
        (HostOffset < 0 ? next.HostOffset < 0 : next.HostOffset == HostOffset + Length);
}

public static class ChainStatus
{
    /// <summary>Status of the range at <paramref name="offset"/> looking down the chain until a layer has it.</summary>
    public static ChainExtent Get(BlockImage top, long offset, long maxLength)
    {
        maxLength = Math.Min(maxLength, top.Size - offset);
        int depth = 0;
        BlockImage image = top;
        while (true)
        {
            if (offset >= image.Size)
            {
                // Past the end of a shorter backing file: reads as zeros.
                return new ChainExtent(offset, maxLength, depth - 1, false, true, false, -1, false);
            }
            if (CachedReads.Active && !image.ServesCachedReads) CachedReads.ThrowIfActive(); // its status may ask a remote server
            var ext = image.GetLayerStatus(offset, Math.Min(maxLength, image.Size - offset));
            maxLength = ext.Length;
            switch (ext.State)
            {
                case LayerState.Data:
                    return new ChainExtent(offset, ext.Length, depth, true, false, true, ext.HostOffset, ext.Compressed);
                case LayerState.Zero:
                    return new ChainExtent(offset, ext.Length, depth, true, true, ext.ZeroOverData, ext.HostOffset, false);
            }
            if (image.Backing is null)
                // (An unallocated range can still have a host offset: qcow2 subclusters preallocated but unwritten.)
                return new ChainExtent(offset, ext.Length, depth, false, image.ReadsZeroesWhereUnallocated, false, ext.HostOffset, false);
            image = image.Backing;
            depth++;
        }
    }

    /// <summary>Every extent of [offset, offset+length), adjacent extents of the same kind merged.</summary>
    public static IEnumerable<ChainExtent> Map(BlockImage top, long offset, long length)
    {
        long end = offset + length;
        ChainExtent? pending = null;
        while (offset < end)
        {
            var e = Get(top, offset, end - offset);
            if (e.Length <= 0) break;
            if (pending is { } p && p.SameKind(e))
                pending = p with { Length = p.Length + e.Length };
            else
            {
                if (pending is { } done) yield return done;
                pending = e;
            }
            offset += e.Length;
        }
        if (pending is { } last) yield return last;
    }
}
