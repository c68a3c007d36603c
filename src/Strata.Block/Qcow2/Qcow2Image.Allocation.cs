using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// The cluster allocator: first-fit search for free host clusters, refcount updates for what is allocated (new
/// refcount blocks describing themselves, the refcount table grown when it is full), packing compressed data, and
/// a guest write's allocation — prepared under the lock, written outside it, committed to the L2 tables after.
/// </summary>
public sealed partial class Qcow2Image
{
    /// <summary>Where the search for free clusters starts (a cluster freed below it moves it down).</summary>
    private long _freeClusterHint;
    /// <summary>Where the next compressed cluster may go (packed after the previous one); 0: a fresh cluster.</summary>
    private long _compressedCursor;
    /// <summary>One past the last cluster allocated, on disk or only in memory so far.</summary>
    private long _endCluster;

    // ------------------------------------------------------------------ host clusters

    /// <summary>Finds <paramref name="count"/> contiguous free clusters (first fit), sets their refcounts to 1 and
    /// returns the host offset of the first. Caller holds the lock.</summary>
    private long AllocateClusters(long count)
    {
        _file.DebugEvent("cluster_alloc");
        long start = _freeClusterHint;
        long firstFree = -1;
        long run = 0;
        long c = start;
        while (run < count)
        {
            if (GetRefcount(c) == 0)
            {
                if (firstFree < 0) firstFree = c;
                if (run == 0) start = c;
                run++;
            }
            else
            {
                run = 0;
            }
            c++;
        }
        NoteAllocated(start, count);
        for (long i = 0; i < count; i++)
            SetRefcount(start + i, 1, start, count);
        // Everything the search passed before the first free cluster is in use, so the next search starts there:
        // past this allocation when it took that cluster. Left at a used cluster, every later allocation would scan
        // the whole image again from it (quadratic in the clusters a convert allocates).
        _freeClusterHint = firstFree == start ? start + count : firstFree;
        return start << _clusterBits;
    }

    /// <summary>Allocates <paramref name="length"/> bytes for compressed data, packing consecutive compressed
    /// clusters into shared host clusters as QEMU does. Every host cluster the bytes touch gains one reference.</summary>
    private long AllocateBytes(int length)
    {
        _file.DebugEvent("cluster_alloc_bytes");
        long cursor = _compressedCursor;
        // As QEMU, a cluster whose refcount is already at the largest the width holds (1 with refcount_bits=1)
        // takes no more compressed data: the next one starts a fresh cluster.
        if (cursor != 0 && (cursor & (_clusterSize - 1)) != 0 && GetRefcount(ClusterOf(cursor)) < RefcountCodec.MaxValue(_refcountOrder))
        {
            long firstCluster = ClusterOf(cursor);
            long lastCluster = ClusterOf(cursor + length - 1);
            bool fits = true;
            for (long c = firstCluster + 1; c <= lastCluster && fits; c++) fits = GetRefcount(c) == 0;
            if (fits)
            {
                AdjustRefcount(firstCluster, +1);
                NoteAllocated(firstCluster + 1, lastCluster - firstCluster);
                for (long c = firstCluster + 1; c <= lastCluster; c++) SetRefcount(c, 1, firstCluster + 1, lastCluster - firstCluster);
                _compressedCursor = cursor + length;
                return cursor;
            }
        }
        long clusters = (length + _clusterSize - 1) >> _clusterBits;
        long host = AllocateClusters(clusters);
        _compressedCursor = host + length;
        return host;
    }

    /// <summary>Adds <paramref name="delta"/> to a refcount. A refcount already at the largest value its width holds
    /// cannot rise (QEMU fails such an update with EINVAL and leaves the refcount as it was); the arithmetic is
    /// unsigned so that 64-bit refcounts at or above 2^63 neither wrap nor pass for negative.</summary>
    private void AdjustRefcount(long hostCluster, long delta)
    {
        ulong cur = GetRefcount(hostCluster);
        ulong next;
        if (delta >= 0)
        {
            if (cur > RefcountCodec.MaxValue(_refcountOrder) - (ulong)delta) throw new RefcountOverflowException(hostCluster << _clusterBits);
            next = cur + (ulong)delta;
        }
        else
        {
            ulong decrease = (ulong)-delta;
            if (cur < decrease)
                throw new BlockException($"qcow2: refcount of cluster {hostCluster} would drop below zero; image is corrupt");
            next = cur - decrease;
        }
        SetRefcount(hostCluster, next);
        if (next == 0 && hostCluster < _freeClusterHint) _freeClusterHint = hostCluster;
    }

    /// <summary>Sets a refcount in memory (written back later), creating the refcount block — and growing the
    /// refcount table — as needed. <paramref name="reservedStart"/>/<paramref name="reservedCount"/> name clusters
    /// that are being allocated and must not be chosen for a new refcount block.</summary>
    private void SetRefcount(long hostCluster, ulong value, long reservedStart = -1, long reservedCount = 0)
    {
        if (value > RefcountCodec.MaxValue(_refcountOrder))
            throw new RefcountOverflowException(hostCluster << _clusterBits);
        long tableIndex = hostCluster / _refcountsPerBlock;
        if (tableIndex >= _refTable.Length) GrowRefcountTable(tableIndex, reservedStart, reservedCount);
        var block = GetRefcountBlock(tableIndex);
        if (block is null)
        {
            // A range with no block is entirely free, so the new block can describe itself: put it at the first
            // cluster of its range that is not being allocated right now. When the whole range is being allocated
            // (an allocation larger than a refcount block covers, as an L1 table of 512-byte clusters), the block
            // goes past everything in use instead, and its own refcount lands in the block of that place.
            long rangeStart = tableIndex * _refcountsPerBlock;
            long rangeEnd = rangeStart + _refcountsPerBlock;
            long reservedEnd = reservedStart + reservedCount;
            long candidate = rangeStart;
            while (candidate < rangeEnd && ((candidate >= reservedStart && candidate < reservedEnd) || candidate == hostCluster))
                candidate = candidate >= reservedStart && candidate < reservedEnd ? reservedEnd : candidate + 1;
            bool describesItself = candidate < rangeEnd;
            if (!describesItself)
            {
                candidate = Math.Max(NextUnusedClusterEstimate(), reservedEnd);
                if (candidate == hostCluster) candidate++;
            }
            _file.DebugEvent("refblock_alloc");
            CheckNotHeader(candidate << _clusterBits, "refcount block");
            CheckHostWrite(candidate << _clusterBits, _clusterSize);
            block = new RefcountBlock(new byte[_clusterSize]) { Dirty = true };
            EvictCleanRefcountBlocks();
            _refBlocks.Add(tableIndex, block);
            NoteAllocated(candidate, 1);
            _refTable[tableIndex] = (ulong)(candidate << _clusterBits);
            _refTableDirty = true;
            _overlap.AddRefcountBlock(candidate << _clusterBits);
            if (describesItself) RefcountCodec.Set(block.Data, candidate - rangeStart, _refcountOrder, 1);
            else SetRefcount(candidate, 1, reservedStart, reservedCount);
        }
        RefcountCodec.Set(block.Data, hostCluster % _refcountsPerBlock, _refcountOrder, value);
        block.Dirty = true;
    }

    /// <summary>Builds a larger refcount table at the end of the file, with new self-describing refcount blocks,
    /// writes it, points the header at it and frees the old one.</summary>
    private void GrowRefcountTable(long neededIndex, long reservedStart, long reservedCount)
    {
        long entriesPerCluster = _clusterSize / 8;
        long wanted = Math.Max(neededIndex + 1, _refTable.Length * 3L / 2);
        long endCluster = NextUnusedClusterEstimate();
        if (reservedCount > 0) endCluster = Math.Max(endCluster, reservedStart + reservedCount);

        while (true)
        {
            long tableClusters = (wanted + entriesPerCluster - 1) / entriesPerCluster;
            long tableEntries = tableClusters * entriesPerCluster;
            // New blocks go right after the table; count how many ranges the table and blocks touch.
            long blocks = 0;
            long newBlockCount;
            do
            {
                newBlockCount = blocks;
                long lastCluster = endCluster + tableClusters + newBlockCount - 1;
                blocks = 0;
                for (long ti = endCluster / _refcountsPerBlock; ti <= lastCluster / _refcountsPerBlock; ti++)
                    if (ti >= _refTable.Length || (_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask) == 0) blocks++;
            } while (blocks != newBlockCount);
            long lastNeeded = (endCluster + tableClusters + blocks - 1) / _refcountsPerBlock;
            if (lastNeeded >= tableEntries || neededIndex >= tableEntries)
            {
                wanted = Math.Max(lastNeeded, neededIndex) + 1 + entriesPerCluster;
                continue;
            }

            // The table and its new blocks go past everything in use; a broken refcount structure could still
            // say otherwise.
            CheckHostWrite(endCluster << _clusterBits, (tableClusters + blocks) << _clusterBits);
            // Commit in memory: new table contents, blocks, refcounts of the table and of the blocks.
            var newTable = new ulong[tableEntries];
            Array.Copy(_refTable, newTable, _refTable.Length);
            long oldTableOffset = (long)_header.RefcountTableOffset;
            long oldTableClusters = _header.RefcountTableClusters;
            var oldTable = _refTable;
            _refTable = newTable;
            long blockCluster = endCluster + tableClusters;
            for (long ti = endCluster / _refcountsPerBlock; ti <= lastNeeded; ti++)
            {
                if (ti < oldTable.Length && (oldTable[ti] & ~Qcow2Entry.RefcountTableReservedMask) != 0) continue;
                _refTable[ti] = (ulong)(blockCluster << _clusterBits);
                EvictCleanRefcountBlocks();
                _refBlocks.Add(ti, new RefcountBlock(new byte[_clusterSize]) { Dirty = true });
                blockCluster++;
            }
            NoteAllocated(endCluster, blockCluster - endCluster);
            for (long c = endCluster; c < blockCluster; c++)
            {
                var block = GetRefcountBlock(c / _refcountsPerBlock)!;
                RefcountCodec.Set(block.Data, c % _refcountsPerBlock, _refcountOrder, 1);
                block.Dirty = true;
            }

            // Write blocks and the new table, then switch the header to it.
            _file.DebugEvent("reftable_grow");
            long tableOffset = endCluster << _clusterBits;
            _file.DebugEvent("refblock_alloc_write_blocks");
            WriteDirtyRefcountBlocks();
            var raw = new byte[tableEntries * 8];
            for (int i = 0; i < tableEntries; i++) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), _refTable[i]);
            _file.DebugEvent("refblock_alloc_write_table");
            _file.Write(tableOffset, raw);
            _file.Flush();
            _file.DebugEvent("refblock_alloc_switch_table");
            _header = _header with { RefcountTableOffset = (ulong)tableOffset, RefcountTableClusters = (uint)tableClusters };
            WriteHeaderFields();
            _file.Flush();
            _refTableDirty = false;
            RebuildOverlapIndex();
            for (long c = 0; c < oldTableClusters; c++)
                AdjustRefcount((oldTableOffset >> _clusterBits) + c, -1);
            if (_freeClusterHint > (oldTableOffset >> _clusterBits)) _freeClusterHint = oldTableOffset >> _clusterBits;
            return;
        }
    }

    /// <summary>First cluster past everything in the file and everything allocated in memory but not yet written.</summary>
    private long NextUnusedClusterEstimate() => Math.Max(ClusterOf(_file.Length + _clusterSize - 1), _endCluster);

    private void NoteAllocated(long firstCluster, long count)
    {
        if (firstCluster + count > _endCluster) _endCluster = firstCluster + count;
    }

    // ------------------------------------------------------------------ a guest write's clusters

    /// <summary>Clusters allocated for one write, not yet visible in the L2 tables.</summary>
    private sealed record Allocation(long FirstCluster, long Count, long HostStart, long Consumed, byte[]? Buffer);

    private readonly HashSet<long> _clustersInFlight = new();

    /// <summary>
    /// Allocates new host clusters for a write into clusters that need them (unallocated, zero, compressed or
    /// shared), and builds the copy-on-write buffer when the write covers clusters partially. Returns null when
    /// another writer is allocating the first cluster. Caller holds the lock.
    /// </summary>
    private Allocation? PrepareAllocation(long offset, ReadOnlySpan<byte> data)
    {
        long firstCluster = ClusterOf(offset);
        if (_clustersInFlight.Contains(firstCluster)) return null;
        long lastCluster = ClusterOf(offset + data.Length - 1);
        long maxRun = Math.Min(_refcountsPerBlock - 1, Math.Max(1, (8L << 20) / _clusterSize));
        long count = 1;
        while (firstCluster + count <= lastCluster && count < maxRun && !_clustersInFlight.Contains(firstCluster + count))
        {
            ulong e = GetL2Entry(firstCluster + count);
            if (KindOf(e) == L2EntryKind.Normal && (e & Qcow2Entry.Copied) != 0) break;
            count++;
        }
        // L2 tables first, so that a fresh image is laid out as QEMU lays it out (table, then its data).
        EnsureL2Table(firstCluster / _l2Entries);
        EnsureL2Table((firstCluster + count - 1) / _l2Entries);
        long start = firstCluster << _clusterBits;
        long end = Math.Min((firstCluster + count) << _clusterBits, offset + data.Length);
        long consumed = end - offset;

        long hostStart = AllocateDataClusters(firstCluster, count);
        CheckDataWrite(hostStart, count << _clusterBits);
        long headPad = offset - start;
        long tailEnd = Math.Min((firstCluster + count) << _clusterBits, Size);
        long tailPad = Math.Max(0, tailEnd - end);
        byte[]? buffer = null;
        if (headPad != 0 || tailPad != 0)
        {
            // Build the clusters with their old content around the new bytes (copy-on-write). The last cluster of
            // an image whose size is not cluster aligned is still written whole.
            buffer = new byte[count << _clusterBits];
            if (headPad > 0) ReadOldCluster(firstCluster, buffer.AsSpan(0, (int)_clusterSize));
            if (tailPad > 0 && (count > 1 || headPad == 0))
                ReadOldCluster(firstCluster + count - 1, buffer.AsSpan((int)((count - 1) << _clusterBits), (int)_clusterSize));
            data[..(int)consumed].CopyTo(buffer.AsSpan((int)headPad));
        }
        for (long i = 0; i < count; i++) _clustersInFlight.Add(firstCluster + i);
        return new Allocation(firstCluster, count, hostStart, consumed, buffer);
    }

    /// <summary>The data write of an allocation failed: nothing points at its clusters, so they are free again at
    /// once, and writers waiting for the guest clusters go on (the guest clusters keep what they had). Caller holds
    /// the lock.</summary>
    private void RollBackAllocation(Allocation a)
    {
        for (long i = 0; i < a.Count; i++)
        {
            _clustersInFlight.Remove(a.FirstCluster + i);
            if (!_externalData) AdjustRefcount(ClusterOf(a.HostStart) + i, -1);
        }
        Monitor.PulseAll(_lock);
    }

    /// <summary>Points the L2 entries at freshly written clusters. Caller holds the lock.</summary>
    private void CommitAllocation(Allocation a)
    {
        for (long i = 0; i < a.Count; i++)
        {
            long guest = a.FirstCluster + i;
            var table = EnsureL2Table(guest / _l2Entries);
            int idx = (int)(guest % _l2Entries);
            ReleaseEntry(table.Entries[idx]);
            table.Entries[idx] = (ulong)(a.HostStart + (i << _clusterBits)) | Qcow2Entry.Copied;
            table.Dirty = true;
            _clustersInFlight.Remove(guest);
        }
    }

    /// <summary>Returns the L2 table for an L1 index, allocating an empty one if needed. Caller holds the lock.</summary>
    private L2Table EnsureL2Table(long l1Index)
    {
        if (l1Index >= _l1.Length)
            throw new BlockException($"qcow2: guest offset beyond the L1 table (index {l1Index})");
        ulong l1e = _l1[l1Index];
        long l2Offset = (long)(l1e & Qcow2Entry.OffsetMask);
        if (l2Offset != 0)
        {
            if ((l1e & Qcow2Entry.Copied) == 0)
            {
                // Without OFLAG_COPIED the table is shared with a snapshot: the active tree gets its own copy.
                return CopyOnWriteL2Table(l1Index, l2Offset);
            }
            // The table is about to change: refuse now, not at the next write-back, if it lies on other metadata.
            CheckHostWrite(l2Offset, _clusterSize, Qcow2MetadataKind.ActiveL2);
            return LoadL2(l2Offset, l1Index);
        }
        long newOffset = AllocateClusters(1);
        CheckNotHeader(newOffset, "L2 table");
        CheckHostWrite(newOffset, _clusterSize);
        var table = new L2Table(new ulong[_l2Entries], _extendedL2 ? new ulong[_l2Entries] : null) { Dirty = true };
        MakeRoomInL2Cache();
        _l2Cache.Add(newOffset, table);
        _l1[l1Index] = (ulong)newOffset | Qcow2Entry.Copied;
        _l1Dirty = true;
        _overlap.AddL2Table(newOffset);
        return table;
    }
}
