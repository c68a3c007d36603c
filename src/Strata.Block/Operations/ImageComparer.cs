using System.Buffers;

namespace Strata.Block.Operations;

public enum CompareOutcome { Identical, ContentMismatch, SizeMismatchStrict, StatusMismatchStrict }

/// <summary>Result of comparing two images. <see cref="Offset"/> is the first differing 512-byte sector, in bytes.</summary>
public readonly record struct CompareResult(CompareOutcome Outcome, long Offset, bool SizesDiffer);

/// <summary>A read of one of the compared images failed (<see cref="InFirstImage"/> says which) in the chunk at
/// <see cref="Offset"/>: qemu-img reports it and exits 4.</summary>
public sealed class CompareReadException(long offset, bool inFirstImage, string reason) : BlockException(reason)
{
    public long Offset { get; } = offset;
    public bool InFirstImage { get; } = inFirstImage;
}

/// <summary>Compares what two images read as, the way <c>qemu-img compare</c> does.</summary>
public static class ImageComparer
{
    public static CompareResult Compare(BlockImage a, BlockImage b, bool strict, Action<long, long>? progress = null, int chunkSize = 4 << 20)
    {
        bool sizesDiffer = a.Size != b.Size;
        if (sizesDiffer && strict) return new CompareResult(CompareOutcome.SizeMismatchStrict, 0, true);
        long common = Math.Min(a.Size, b.Size);
        long total = Math.Max(a.Size, b.Size);

        // Chunks are compared in parallel; the earliest mismatch wins.
        long firstMismatch = long.MaxValue;
        long strictMismatch = long.MaxValue;
        long done = 0;
        int workers = Math.Max(2, Environment.ProcessorCount);
        long next = 0;
        Exception? failure = null;
        var threads = new Thread[workers];
        for (int w = 0; w < workers; w++)
        {
            threads[w] = new Thread(() =>
            {
                var bufA = ArrayPool<byte>.Shared.Rent(chunkSize);
                var bufB = ArrayPool<byte>.Shared.Rent(chunkSize);
                try
                {
                    while (true)
                    {
                        long start = Interlocked.Add(ref next, chunkSize) - chunkSize;
                        if (start >= common || start >= Interlocked.Read(ref firstMismatch) || start >= Interlocked.Read(ref strictMismatch)) break;
                        long len = Math.Min(chunkSize, common - start);
                        long found = CompareRange(a, b, start, len, strict, bufA, bufB, out bool statusMismatch);
                        if (found >= 0)
                        {
                            ref long target = ref statusMismatch ? ref strictMismatch : ref firstMismatch;
                            long cur;
                            while (found < (cur = Interlocked.Read(ref target)))
                                if (Interlocked.CompareExchange(ref target, found, cur) == cur) break;
                        }
                        progress?.Invoke(Interlocked.Add(ref done, len), total);
                    }
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref failure, e, null);
                    Interlocked.Exchange(ref firstMismatch, -1);
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(bufA);
                    ArrayPool<byte>.Shared.Return(bufB);
                }
            }) { IsBackground = true };
            threads[w].Start();
        }
        foreach (var t in threads) t.Join();
        if (failure is not null) throw failure is BlockException ? failure : new BlockException($"error while comparing: {failure.Message}");
        bool firstIsLarger = a.Size > b.Size;
        if (strictMismatch != long.MaxValue && strictMismatch <= firstMismatch)
            return new CompareResult(CompareOutcome.StatusMismatchStrict, strictMismatch, sizesDiffer);
        if (firstMismatch != long.MaxValue)
            return new CompareResult(CompareOutcome.ContentMismatch, firstMismatch, sizesDiffer);

        if (sizesDiffer)
        {
            // The extra part of the larger image must read as zeros.
            var larger = a.Size > b.Size ? a : b;
            var buf = ArrayPool<byte>.Shared.Rent(chunkSize);
            try
            {
                for (long pos = common; pos < larger.Size;)
                {
                    var ext = ChainStatus.Get(larger, pos, larger.Size - pos);
                    if (!ext.Zero)
                    {
                        for (long p = pos; p < pos + ext.Length; p += chunkSize)
                        {
                            int n = (int)Math.Min(chunkSize, pos + ext.Length - p);
                            ReadChecked(larger, firstIsLarger, p, buf.AsSpan(0, n), p);
                            int nz = buf.AsSpan(0, n).IndexOfAnyExcept((byte)0);
                            if (nz >= 0) return new CompareResult(CompareOutcome.ContentMismatch, (p + nz) & ~511L, true);
                        }
                    }
                    pos += ext.Length;
                }
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(buf);
            }
        }
        progress?.Invoke(total, total);
        return new CompareResult(CompareOutcome.Identical, 0, sizesDiffer);
    }

    /// <summary>Returns the first mismatching sector offset in the range, or -1.</summary>
    private static long CompareRange(BlockImage a, BlockImage b, long start, long length, bool strict, byte[] bufA, byte[] bufB, out bool statusMismatch)
    {
        statusMismatch = false;
        long pos = start, end = start + length;
        while (pos < end)
        {
            var ea = ChainStatus.Get(a, pos, end - pos);
            var eb = ChainStatus.Get(b, pos, end - pos);
            long n = Math.Min(ea.Length, eb.Length);
            if (strict && (ea.Present != eb.Present || ea.Zero != eb.Zero || ea.Data != eb.Data))
            {
                // qemu-img -s compares allocation, not only content.
                statusMismatch = ea.Zero != eb.Zero || ea.Present != eb.Present;
                if (statusMismatch) return pos;
            }
            if (!(ea.Zero && eb.Zero))
            {
                var sa = bufA.AsSpan(0, (int)n);
                var sb = bufB.AsSpan(0, (int)n);
                if (ea.Zero) sa.Clear(); else ReadChecked(a, true, pos, sa, start);
                if (eb.Zero) sb.Clear(); else ReadChecked(b, false, pos, sb, start);
                if (!sa.SequenceEqual(sb))
                {
                    int i = 0;
                    // Narrow down to the first differing byte, then round down to its sector.
                    int step = 4096;
                    while (i < n && sa.Slice(i, (int)Math.Min(step, n - i)).SequenceEqual(sb.Slice(i, (int)Math.Min(step, n - i)))) i += step;
                    while (i < n && sa[i] == sb[i]) i++;
                    return (pos + i) & ~511L;
                }
            }
            pos += n;
        }
        return -1;
    }

    /// <summary>A read whose I/O error names the image and the chunk, as qemu-img reports it.</summary>
    private static void ReadChecked(BlockImage image, bool first, long offset, Span<byte> buffer, long chunkOffset)
    {
        try
        {
            image.Read(offset, buffer);
        }
        catch (BlockIOException e)
        {
            throw new CompareReadException(chunkOffset, first, e.Message);
        }
    }
}
