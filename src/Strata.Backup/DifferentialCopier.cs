using System.Buffers;
using Strata.Block;

namespace Strata.Backup;

/// <summary>
/// A differential by comparison: when the bitmap that should say what changed since the last point is gone
/// (missing, inconsistent after a crash, disabled), the frozen disk is read whole and compared, granule by
/// granule, with what the last point reads as; only the granules that differ go into the new incremental (data, or
/// zeros where the disk now reads zeros). Ranges that read as zeros on both sides cost no read.
/// </summary>
public sealed class DifferentialCopier(BlockImage disk, BlockImage lastPoint, long granularity = 65536)
{
    public int Chunk { get; init; } = 4 << 20;

    /// <summary>Writes the differing granules into <paramref name="target"/> (backed by the last point); returns
    /// the bytes of data written.</summary>
    public long CopyDifferences(BlockImage target, Action<long, long> progress)
    {
        if (disk.Size != lastPoint.Size) throw new BackupException($"the disk is {disk.Size} bytes but the last point {lastPoint.Size}");
        int chunk = (int)Math.Max(granularity, Chunk - Chunk % granularity);
        var a = ArrayPool<byte>.Shared.Rent(chunk);
        var b = ArrayPool<byte>.Shared.Rent(chunk);
        long copied = 0;
        try
        {
            progress(0, disk.Size);
            for (long start = 0; start < disk.Size; start += chunk)
            {
                int length = (int)Math.Min(chunk, disk.Size - start);
                var now = a.AsSpan(0, length);
                var then = b.AsSpan(0, length);
                if (Read(start, now, then))
                {
                    for (int g = 0; g < length; g += (int)granularity)
                    {
                        int n = (int)Math.Min(granularity, length - g);
                        var granule = now.Slice(g, n);
                        if (granule.SequenceEqual(then.Slice(g, n))) continue;
                        if (granule.IndexOfAnyExcept((byte)0) < 0) target.WriteZeroes(start + g, n, mayUnmap: false);
                        else
                        {
                            target.Write(start + g, granule);
                            copied += n;
                        }
                    }
                }
                progress(start + length, disk.Size);
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(a);
            ArrayPool<byte>.Shared.Return(b);
        }
        return copied;
    }

    /// <summary>Both sides' bytes at <paramref name="start"/>, zeros without a read where a side's block status
    /// says so; false when both read as zeros throughout.</summary>
    private bool Read(long start, Span<byte> now, Span<byte> then)
    {
        bool any = false;
        long end = start + now.Length;
        for (long pos = start; pos < end;)
        {
            var d = ChainStatus.Get(disk, pos, end - pos);
            var p = ChainStatus.Get(lastPoint, pos, end - pos);
            long n = Math.Min(d.Length, p.Length);
            var sd = now.Slice((int)(pos - start), (int)n);
            var sp = then.Slice((int)(pos - start), (int)n);
            if (d.Zero) sd.Clear(); else disk.Read(pos, sd);
            if (p.Zero) sp.Clear(); else lastPoint.Read(pos, sp);
            any |= !(d.Zero && p.Zero);
            pos += n;
        }
        return any;
    }
}
