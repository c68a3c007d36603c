using System.Buffers;
using Strata.Block;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>
/// A differential by comparison: when the bitmap that should say what changed since the last point is gone
/// (missing, inconsistent after a crash, disabled), the frozen disk is read whole and each granule's digest compared
/// with the one the last point recorded; only the granules that differ go into the new incremental (data, or zeros
/// where the disk now reads zeros). The backup is not read back: the digests stand for it. Ranges the disk's block
/// status says are zeros get the zero digest without a read. Either way the disk's digests come out, for the new point.
/// </summary>
/// <remarks>A last point from before digests were recorded is compared the old way, by reading it back
/// (<see cref="CopyDifferences(BlockImage, BlockImage, long, Action{long, long})"/>).</remarks>
public sealed class DifferentialCopier(BlockImage disk)
{
    public int Chunk { get; init; } = 4 << 20;

    /// <summary>Writes the granules whose digests differ from <paramref name="last"/>'s into <paramref name="target"/>
    /// (backed by the last point, which is never opened: every write covers whole granules, and granules are whole
    /// clusters of the target); returns the bytes of data written and the disk's digests.</summary>
    public (long Copied, GranuleDigests Digests) CopyDifferences(BlockImage target, GranuleDigests last, Action<long, long> progress)
    {
        if (disk.Size != last.DiskSize) throw new BackupException($"the disk is {disk.Size} bytes but the last point's digests cover {last.DiskSize}");
        return Copy(target, last.Granularity, progress, (granule, _, _, digest) => !digest.SequenceEqual(last[granule]));
    }

    /// <summary>The same comparison against <paramref name="lastPoint"/>'s bytes, read back through its chain (for a
    /// last point without digests).</summary>
    public (long Copied, GranuleDigests Digests) CopyDifferences(BlockImage target, BlockImage lastPoint, long granularity, Action<long, long> progress)
    {
        if (disk.Size != lastPoint.Size) throw new BackupException($"the disk is {disk.Size} bytes but the last point {lastPoint.Size}");
        var then = ArrayPool<byte>.Shared.Rent((int)granularity);
        try
        {
            return Copy(target, granularity, progress, (_, offset, now, _) =>
            {
                var old = then.AsSpan(0, now.Length);
                if (ChainStatus.Get(lastPoint, offset, now.Length) is { Zero: true } z && z.Length >= now.Length) old.Clear();
                else lastPoint.Read(offset, old);
                return !now.SequenceEqual(old);
            });
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(then);
        }
    }

    /// <summary>Decides whether a granule differs: its index, offset, bytes now and digest now.</summary>
    private delegate bool Differs(int granule, long offset, ReadOnlySpan<byte> now, ReadOnlySpan<byte> digest);

    private (long Copied, GranuleDigests Digests) Copy(BlockImage target, long granularity, Action<long, long> progress, Differs differs)
    {
        var digests = new GranuleDigests(disk.Size, granularity);
        int g = (int)granularity;
        int chunk = (int)Math.Max(granularity, Chunk - Chunk % granularity);
        var zeroDigests = new Dictionary<int, byte[]>();
        byte[] ZeroDigest(int length) => zeroDigests.TryGetValue(length, out var d) ? d : zeroDigests[length] = GranuleDigests.ZeroDigest(length);
        var buffers = new[] { ArrayPool<byte>.Shared.Rent(chunk), ArrayPool<byte>.Shared.Rent(chunk) };
        var zeroFlags = new[] { new bool[chunk / g], new bool[chunk / g] };
        long copied = 0;
        Task? reading = null;
        try
        {
            progress(0, disk.Size);
            var chunkDigests = new byte[chunk / g * GranuleDigests.DigestSize];
            // The next chunk is read while this one is hashed: the read is I/O (NBD), the hash is CPU.
            int slot = 0;
            reading = disk.Size == 0 ? null : Task.Run(() => Read(0, buffers[0], (int)Math.Min(chunk, disk.Size), g, zeroFlags[0]));
            for (long start = 0; start < disk.Size; start += chunk, slot ^= 1)
            {
                int length = (int)Math.Min(chunk, disk.Size - start);
                reading!.GetAwaiter().GetResult();
                long next = start + chunk;
                int nextSlot = slot ^ 1;
                reading = next >= disk.Size ? null
                    : Task.Run(() => Read(next, buffers[nextSlot], (int)Math.Min(chunk, disk.Size - next), g, zeroFlags[nextSlot]));
                var now = buffers[slot].AsSpan(0, length);
                HashChunk(buffers[slot], length, g, zeroFlags[slot], chunkDigests, ZeroDigest);
                for (int at = 0, i = 0; at < length; at += g, i++)
                {
                    int n = Math.Min(g, length - at);
                    var granule = now.Slice(at, n);
                    int index = (int)((start + at) / granularity);
                    var digest = chunkDigests.AsSpan(i * GranuleDigests.DigestSize, GranuleDigests.DigestSize);
                    digests.Set(index, digest);
                    if (!differs(index, start + at, granule, digest)) continue;
                    if (zeroFlags[slot][i] || granule.IndexOfAnyExcept((byte)0) < 0) target.WriteZeroes(start + at, n, mayUnmap: false);
                    else
                    {
                        target.Write(start + at, granule);
                        copied += n;
                    }
                }
                progress(start + length, disk.Size);
            }
        }
        finally
        {
            // A read still in flight (after a failed write) must be done with its buffer before the buffer goes back.
            try { reading?.Wait(); } catch (AggregateException) { }
            ArrayPool<byte>.Shared.Return(buffers[0]);
            ArrayPool<byte>.Shared.Return(buffers[1]);
        }
        return (copied, digests);
    }

    /// <summary>The digests of a chunk's granules, on every core (hashing is the differential's CPU cost).</summary>
    private static void HashChunk(byte[] chunk, int length, int granularity, bool[] zeroGranules, byte[] into, Func<int, byte[]> zeroDigest)
    {
        int granules = (length + granularity - 1) / granularity;
        // The zero digests first, on this thread: the cache behind zeroDigest is not shared.
        for (int i = 0; i < granules; i++)
            if (zeroGranules[i]) zeroDigest(Math.Min(granularity, length - i * granularity)).CopyTo(into, i * GranuleDigests.DigestSize);
        Parallel.For(0, granules, i =>
        {
            if (zeroGranules[i]) return;
            int at = i * granularity;
            GranuleDigests.Hash(chunk.AsSpan(at, Math.Min(granularity, length - at)), into.AsSpan(i * GranuleDigests.DigestSize, GranuleDigests.DigestSize));
        });
    }

    /// <summary>Reads of the disk in flight at once, each of at most this size: one request at a time leaves the link
    /// idle for a round trip per request.</summary>
    private const int ReadPiece = 1 << 20, ReadsInFlight = 4;

    /// <summary>The disk's bytes at <paramref name="start"/>; ranges its block status says are zeros are cleared, not
    /// read, and the granules wholly in them flagged in <paramref name="zeroGranules"/>.</summary>
    private void Read(long start, byte[] into, int length, int granularity, bool[] zeroGranules)
    {
        Array.Fill(zeroGranules, true);
        var pieces = new List<(long Offset, int Length)>();
        long end = start + length;
        for (long pos = start; pos < end;)
        {
            var status = ChainStatus.Get(disk, pos, end - pos);
            if (status.Zero) into.AsSpan((int)(pos - start), (int)status.Length).Clear();
            else
            {
                for (long p = pos; p < pos + status.Length; p += ReadPiece) pieces.Add((p, (int)Math.Min(ReadPiece, pos + status.Length - p)));
                for (long i = (pos - start) / granularity, last = (pos + status.Length - 1 - start) / granularity; i <= last; i++) zeroGranules[i] = false;
            }
            pos += status.Length;
        }
        Parallel.ForEach(pieces, new ParallelOptions { MaxDegreeOfParallelism = ReadsInFlight },
            piece => disk.Read(piece.Offset, into.AsSpan((int)(piece.Offset - start), piece.Length)));
    }
}
