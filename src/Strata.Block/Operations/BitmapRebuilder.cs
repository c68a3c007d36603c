using System.Buffers;
using Strata.Block.Bitmaps;

namespace Strata.Block.Operations;

/// <summary>
/// Rebuilds a dirty bitmap from two images: every granule where a disk reads differently from an earlier point in
/// time (a backup) is marked. Allocation is compared first — a range that reads as zeros in both costs no read —
/// then data. The bitmap then says what an incremental from that point must copy, as if it had tracked the writes.
/// </summary>
public static class BitmapRebuilder
{
    /// <summary>Marks in <paramref name="bitmap"/> (covering <paramref name="disk"/>) every granule whose bytes differ
    /// from <paramref name="point"/>'s; past the point's end the disk is compared with zeros. Returns the bytes
    /// marked.</summary>
    public static long MarkDifferences(BlockImage disk, BlockImage point, DirtyBitmap bitmap, int chunkSize = 4 << 20)
    {
        long granule = bitmap.Granularity;
        int chunk = (int)Math.Max(granule, chunkSize - chunkSize % granule);
        var diskBuf = ArrayPool<byte>.Shared.Rent(chunk);
        var pointBuf = ArrayPool<byte>.Shared.Rent(chunk);
        long marked = 0;
        try
        {
            for (long start = 0; start < disk.Size; start += chunk)
            {
                int length = (int)Math.Min(chunk, disk.Size - start);
                var a = diskBuf.AsSpan(0, length);
                var b = pointBuf.AsSpan(0, length);
                if (!FillBoth(disk, point, start, a, b)) continue;
                for (int g = 0; g < length; g += (int)granule)
                {
                    int n = (int)Math.Min(granule, length - g);
                    if (a.Slice(g, n).SequenceEqual(b.Slice(g, n))) continue;
                    bitmap.MarkDirty(start + g, n);
                    marked += n;
                }
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(diskBuf);
            ArrayPool<byte>.Shared.Return(pointBuf);
        }
        return marked;
    }

    /// <summary>Reads both images' bytes at <paramref name="start"/>, leaving zeros where an image's chain says so
    /// (no read). Returns false when both read as zeros throughout: nothing to compare.</summary>
    private static bool FillBoth(BlockImage disk, BlockImage point, long start, Span<byte> a, Span<byte> b)
    {
        bool anyData = false;
        long end = start + a.Length;
        for (long pos = start; pos < end;)
        {
            var ea = ChainStatus.Get(disk, pos, end - pos);
            bool pointZero;
            long n = ea.Length;
            if (pos >= point.Size)
            {
                pointZero = true;
            }
            else
            {
                var eb = ChainStatus.Get(point, pos, Math.Min(end, point.Size) - pos);
                pointZero = eb.Zero;
                n = Math.Min(n, eb.Length);
            }
            var sa = a.Slice((int)(pos - start), (int)n);
            var sb = b.Slice((int)(pos - start), (int)n);
            if (ea.Zero) sa.Clear(); else disk.Read(pos, sa);
            if (pointZero) sb.Clear(); else point.Read(pos, sb);
            anyData |= !(ea.Zero && pointZero);
            pos += n;
        }
        return anyData;
    }
}
