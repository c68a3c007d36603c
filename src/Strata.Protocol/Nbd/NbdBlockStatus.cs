using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>The extents NBD_CMD_BLOCK_STATUS reports for one meta context: base:allocation (NBD_STATE_HOLE 1,
/// NBD_STATE_ZERO 2), qemu:allocation-depth (0 unallocated, else the layer's depth from 1) and
/// qemu:dirty-bitmap:NAME (1 dirty). Neighbours with equal flags merge.</summary>
internal static class NbdBlockStatus
{
    /// <summary>At most this many extents per context in one reply, as QEMU's server.</summary>
    private const int MaxExtents = 1 << 16;

    /// <summary>Fills <paramref name="list"/> with the extents of <paramref name="context"/> from
    /// <paramref name="offset"/>; <paramref name="one"/> (NBD_CMD_FLAG_REQ_ONE) keeps only the first.</summary>
    public static void Collect(NbdExport export, string context, long offset, long length, bool one, List<NbdExtent> list)
    {
        list.Clear();
        long end = offset + length;
        if (context.StartsWith(NbdExport.DirtyBitmapPrefix, StringComparison.Ordinal))
        {
            DirtyBitmap? bitmap = null;
            foreach (var b in export.Bitmaps)
                if (context.AsSpan(NbdExport.DirtyBitmapPrefix.Length).SequenceEqual(b.Name)) bitmap = b;
            long pos = offset;
            foreach (var (o, l) in bitmap!.DirtyExtents(offset, length))
            {
                if (o > pos) Add(list, o - pos, 0);
                Add(list, l, 1);
                pos = o + l;
                if (one || list.Count >= MaxExtents) break;
            }
            if (pos < end && !(one && list.Count > 0) && list.Count < MaxExtents) Add(list, end - pos, 0);
        }
        else
        {
            long pos = offset;
            while (pos < end && list.Count < MaxExtents)
            {
                var e = ChainStatus.Get(export.Image, pos, end - pos);
                uint flags = context == NbdExport.AllocationDepthContext
                    ? (e.Present ? (uint)(e.Depth + 1) : 0)
                    : (e.Data ? 0u : 1u) | (e.Zero ? 2u : 0u);
                Add(list, e.Length, flags);
                pos += e.Length;
                if (one) break;
            }
        }
        if (one && list.Count > 0) list.RemoveRange(1, list.Count - 1);
    }

    private static void Add(List<NbdExtent> list, long length, uint flags)
    {
        if (list.Count > 0 && list[^1].Flags == flags) list[^1] = new((uint)(list[^1].Length + length), flags);
        else list.Add(new((uint)length, flags));
    }
}
