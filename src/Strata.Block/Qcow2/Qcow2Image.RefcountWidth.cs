using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// <c>amend -o refcount_bits=N</c>: the refcount structures are rebuilt at the new width. The new refcount blocks
/// and table are ordinary clusters allocated through the old structures, so allocating them changes the refcounts
/// being converted: the walk over the old refcounts repeats until one walk needs no new allocation. Only then are
/// the new blocks filled and written, the new table written, and the header switched to them in one write; the old
/// blocks and table are freed last, through the new structures. A failure before the switch frees what the walks
/// allocated and leaves the image as it was.
/// </summary>
public sealed partial class Qcow2Image
{
    /// <summary>QEMU's limit on the refcount table (QCOW_MAX_REFTABLE_SIZE), in bytes.</summary>
    private const long MaxRefcountTableBytes = 8L << 20;

    /// <summary>Changes the refcount width to <paramref name="refcountBits"/> (a power of two up to 64).
    /// <paramref name="progress"/> gets (done, total) as QEMU's amend reports it: each walk over the refcount table
    /// is a share of the work, and the total grows when the walks do.</summary>
    public void ChangeRefcountWidth(int refcountBits, Action<long, long>? progress = null)
    {
        CheckWritable();
        if (refcountBits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
            throw new BlockException("Refcount width must be a power of two and may not exceed 64 bits");
        int newOrder = System.Numerics.BitOperations.Log2((uint)refcountBits);
        lock (_lock)
        {
            WriteBackMetadata();
            if (newOrder == _refcountOrder) return;
            long newPerBlock = _clusterSize * 8 / refcountBits;
            var newTable = Array.Empty<ulong>();
            long newTableOffset = 0;
            long newTableClusters = 0;
            int walk = 0;
            try
            {
                bool allocated;
                do
                {
                    // At least this walk, one that finds nothing left to allocate, and the one that writes.
                    int totalWalks = Math.Max(walk + 2, 3);
                    allocated = WalkRefcountsAtWidth(newOrder, newPerBlock, ref newTable, null, walk++, totalWalks, progress);
                    if (!allocated) continue;
                    if (newTableOffset != 0) FreeNewRefcountClusters(newTableOffset, newTableClusters);
                    newTableClusters = (newTable.Length * 8L + _clusterSize - 1) >> _clusterBits;
                    newTableOffset = AllocateClusters(newTableClusters);
                } while (allocated);

                var block = new byte[_clusterSize];
                WalkRefcountsAtWidth(newOrder, newPerBlock, ref newTable, block, walk, walk + 1, progress);
                var raw = new byte[newTableClusters << _clusterBits];
                for (int i = 0; i < newTable.Length; i++) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), newTable[i]);
                CheckHostWrite(newTableOffset, raw.Length);
                _file.Write(newTableOffset, raw);
                WriteBackMetadata();
            }
            catch
            {
                // Nothing points at the new structures yet: give their clusters back through the old ones.
                foreach (ulong entry in newTable)
                    if (entry != 0) FreeNewRefcountClusters((long)entry, 1);
                if (newTableOffset != 0) FreeNewRefcountClusters(newTableOffset, newTableClusters);
                WriteBackMetadata();
                throw;
            }

            var oldTable = _refTable;
            long oldTableOffset = (long)_header.RefcountTableOffset;
            long oldTableClusters = _header.RefcountTableClusters;
            _header = _header with
            {
                RefcountOrder = newOrder,
                RefcountTableOffset = (ulong)newTableOffset,
                RefcountTableClusters = (uint)newTableClusters,
            };
            WriteHeaderFields();
            _file.Flush();
            _refTable = newTable;
            _refTableDirty = false;
            _refBlocks.Clear();
            _refcountOrder = newOrder;
            _refcountsPerBlock = newPerBlock;
            _compressedCursor = 0;
            RebuildOverlapIndex();

            foreach (ulong entry in oldTable)
            {
                long offset = (long)(entry & ~Qcow2Entry.RefcountTableReservedMask);
                if (offset != 0) AdjustRefcount(offset >> _clusterBits, -1);
            }
            for (long c = 0; c < oldTableClusters; c++) AdjustRefcount((oldTableOffset >> _clusterBits) + c, -1);
            WriteBackMetadata();
        }
    }

    private void FreeNewRefcountClusters(long offset, long clusters)
    {
        for (long c = 0; c < clusters; c++) AdjustRefcount((offset >> _clusterBits) + c, -1);
    }

    /// <summary>
    /// One walk over every refcount the current table covers, cut into blocks of the new width. Without
    /// <paramref name="block"/> it allocates a cluster for each new block holding a non-zero refcount that has none yet
    /// (growing <paramref name="newTable"/> as needed) and says whether it allocated anything; with it, it fills each
    /// new block and writes it to its cluster. Refcounts are read afresh as the walk goes, since allocating changes
    /// them. Caller holds the lock.
    /// </summary>
    private bool WalkRefcountsAtWidth(int newOrder, long newPerBlock, ref ulong[] newTable, byte[]? block, int walk,
        int totalWalks, Action<long, long>? progress)
    {
        bool allocated = false;
        long newIndex = 0, filled = 0;
        bool empty = true;
        ulong newMax = RefcountCodec.MaxValue(newOrder);

        void Complete(ref ulong[] table)
        {
            if (block is null)
            {
                if (!empty && newIndex >= table.Length)
                {
                    long entriesPerCluster = _clusterSize / 8;
                    long size = (newIndex + entriesPerCluster) / entriesPerCluster * entriesPerCluster;
                    if (size * 8 > MaxRefcountTableBytes) throw new BlockException("The new reftable is too big");
                    Array.Resize(ref table, (int)size);
                }
                if (!empty && table[newIndex] == 0)
                {
                    table[newIndex] = (ulong)AllocateClusters(1);
                    allocated = true;
                }
            }
            else if (newIndex < table.Length && table[newIndex] != 0)
            {
                long offset = (long)table[newIndex];
                CheckHostWrite(offset, _clusterSize);
                _file.Write(offset, block);
                Array.Clear(block);
            }
            else if (!empty)
            {
                throw new InvalidOperationException("qcow2: a refcount block of the new width was never allocated");
            }
            newIndex++;
            filled = 0;
            empty = true;
        }

        // The table may grow while the walk allocates: its length is read afresh, as the clusters it adds need counting.
        long cluster = 0;
        for (long ti = 0; ti < _refTable.Length; ti++)
        {
            progress?.Invoke(walk * _refTable.Length + ti, totalWalks * _refTable.Length);
            bool present = (_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask) != 0;
            for (long i = 0; i < _refcountsPerBlock;)
            {
                if (filled == newPerBlock) Complete(ref newTable);
                if (!present)
                {
                    // No block: every refcount here is zero, which a fresh new block already holds.
                    long take = Math.Min(_refcountsPerBlock - i, newPerBlock - filled);
                    filled += take;
                    i += take;
                    cluster += take;
                    continue;
                }
                ulong refcount = GetRefcount(cluster);
                if (refcount > newMax)
                    throw new BlockException($"Cannot decrease refcount entry width to {1 << newOrder} bits: Cluster at offset 0x{cluster << _clusterBits:x} has a refcount of {refcount}");
                if (refcount != 0)
                {
                    if (block is not null) RefcountCodec.Set(block, filled, newOrder, refcount);
                    empty = false;
                }
                filled++;
                i++;
                cluster++;
            }
        }
        if (filled > 0) Complete(ref newTable);
        progress?.Invoke((walk + 1) * _refTable.Length, totalWalks * _refTable.Length);
        return allocated;
    }
}
