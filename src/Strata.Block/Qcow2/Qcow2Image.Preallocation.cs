using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>preallocation=… of qemu-img create.</summary>
public enum Preallocation { Off, Metadata, Falloc, Full }

public sealed partial class Qcow2Image
{
    /// <summary>
    /// Allocates every guest cluster of a new image as QEMU's preallocation does: each L2 table followed by the data
    /// clusters it maps. With metadata only the file is extended over them (they read as zeros from the holes);
    /// falloc and full also give them disk blocks, by writing zeros. After a resize, <paramref name="from"/> is the
    /// old size: only the clusters wholly past it are new, so only those are allocated (a cluster holding old guest
    /// bytes keeps its mapping; allocating it could hide what it reads from the backing file). With extended L2
    /// entries the subclusters stay unallocated (they read from the backing file or as zeros, as in QEMU).
    /// </summary>
    public void Preallocate(Preallocation mode, long from = 0)
    {
        if (mode == Preallocation.Off) return;
        CheckWritable();
        lock (_lock)
        {
            long clusters = (Size + _clusterSize - 1) >> _clusterBits;
            long maxRun = Math.Max(1, _refcountsPerBlock - 1);
            var ranges = new List<(long Host, long Count)>();
            for (long guest = (from + _clusterSize - 1) >> _clusterBits; guest < clusters;)
            {
                long l1Index = guest / _l2Entries;
                var table = EnsureL2Table(l1Index);
                long run = Math.Min(Math.Min(clusters - guest, (l1Index + 1) * _l2Entries - guest), maxRun);
                long host = AllocateClusters(run);
                for (long i = 0; i < run; i++)
                    table.Entries[(guest + i) % _l2Entries] = (ulong)(host + (i << _clusterBits)) | Qcow2Entry.Copied;
                table.Dirty = true;
                ranges.Add((host, run));
                guest += run;
            }
            long end = ranges.Count == 0 ? 0 : ranges.Max(r => r.Host + (r.Count << _clusterBits));
            if (mode != Preallocation.Metadata)
            {
                var zeros = new byte[Math.Min(1L << 20, _clusterSize * maxRun)];
                foreach (var (host, count) in ranges)
                    for (long at = host; at < host + (count << _clusterBits); at += zeros.Length)
                        _file.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, host + (count << _clusterBits) - at)));
            }
            else if (_file.Length < end)
            {
                _file.SetLength(end);
            }
            WriteBackMetadata();
        }
    }
}
