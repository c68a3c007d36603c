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
    public void Preallocate(Preallocation mode) => Preallocate(mode, 0, Size, grown: false);

    /// <summary>The same over the whole clusters of [<paramref name="start"/>, <paramref name="end"/>) that are not
    /// allocated yet. <paramref name="start"/> must be cluster-aligned, so that no cluster holding older guest data is
    /// replaced by a zeroed one. <paramref name="grown"/>: the range is what a resize added, which must read as zeros
    /// (at creation, extended-L2 subclusters stay unallocated and read through to the backing file, as in QEMU).</summary>
    public void Preallocate(Preallocation mode, long start, long end, bool grown)
    {
        if (mode == Preallocation.Off || end <= start) return;
        if ((start & (_clusterSize - 1)) != 0) throw new ArgumentException("preallocation must start on a cluster boundary", nameof(start));
        CheckWritable();
        lock (_lock)
        {
            long last = (end + _clusterSize - 1) >> _clusterBits;
            long maxRun = Math.Max(1, _refcountsPerBlock - 1);
            var ranges = new List<(long Host, long Count)>();
            for (long guest = start >> _clusterBits; guest < last;)
            {
                long l1Index = guest / _l2Entries;
                var table = EnsureL2Table(l1Index);
                long tableEnd = Math.Min(last, (l1Index + 1) * _l2Entries);
                if (table.Entries[guest % _l2Entries] != 0) { guest++; continue; }
                long run = 1;
                while (guest + run < tableEnd && run < maxRun && table.Entries[(guest + run) % _l2Entries] == 0) run++;
                long host = AllocateDataClusters(guest, run);
                for (long i = 0; i < run; i++)
                {
                    table.Entries[(guest + i) % _l2Entries] = (ulong)(host + (i << _clusterBits)) | Qcow2Entry.Copied;
                    // A grown range written as zeros (falloc, full) must read them: with subclusters they are marked
                    // allocated, as QEMU marks them; otherwise they stay unallocated and read through.
                    if (grown && table.Bitmaps is { } bitmaps && mode != Preallocation.Metadata)
                        bitmaps[(guest + i) % _l2Entries] = Qcow2Subclusters.AllAllocated;
                }
                table.Dirty = true;
                ranges.Add((host, run));
                guest += run;
            }
            long fileEnd = ranges.Count == 0 ? 0 : ranges.Max(r => r.Host + (r.Count << _clusterBits));
            if (mode != Preallocation.Metadata)
            {
                var zeros = new byte[Math.Min(1L << 20, _clusterSize * maxRun)];
                foreach (var (host, count) in ranges)
                    for (long at = host; at < host + (count << _clusterBits); at += zeros.Length)
                        DataStore.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, host + (count << _clusterBits) - at)));
            }
            else if (DataStore.Length < fileEnd)
            {
                DataStore.SetLength(fileEnd);
            }
            WriteBackMetadata();
        }
    }

    private bool? _metadataPreallocated;

    /// <summary>
    /// Whether the image looks metadata-preallocated, judged once as QEMU does: clearly more clusters hold a
    /// refcount than the file has disk blocks for. Then block status looks through allocated clusters at the host
    /// file, whose holes read as zeros. Caller holds the lock.
    /// </summary>
    private bool LooksMetadataPreallocated()
    {
        if (_metadataPreallocated is { } known) return known;
        CachedReads.ThrowIfActive(); // judged once, by reading refcount blocks and statx: the blocking path does it
        long realClusters = _file.AllocatedBytes / _clusterSize;
        long threshold = Math.Max(realClusters * 10 / 9, realClusters + 2);
        long fileClusters = (_file.Length + _clusterSize - 1) >> _clusterBits;
        long counted = 0;
        for (long c = 0; c < fileClusters && counted < threshold; c++)
            if (GetRefcount(c) > 0) counted++;
        // Reaching the threshold is enough for QEMU.
        _metadataPreallocated = counted >= threshold;
        return _metadataPreallocated.Value;
    }

    /// <summary>An allocated data run of a metadata-preallocated image, cut at the first change between disk blocks
    /// and a hole in the file the data lives in (the image file, or the external data file: QEMU judges the
    /// preallocation by the image file either way): a hole becomes a zero extent (keeping its host offset). Caller
    /// holds the lock.</summary>
    private (LayerState State, long Length) SplitAtHostHole(long hostOffset, long length)
    {
        var store = DataStore;
        long data = store.SeekData(hostOffset);
        if (data == hostOffset)
        {
            long hole = store.SeekHole(hostOffset);
            return (LayerState.Data, hole > hostOffset ? Math.Min(length, hole - hostOffset) : length);
        }
        if (data < 0 && store.Length <= hostOffset) return (LayerState.Data, length);
        return (LayerState.Zero, data < 0 ? length : Math.Min(length, data - hostOffset));
    }
}
