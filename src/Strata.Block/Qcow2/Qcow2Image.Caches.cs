using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>L2 tables and refcount blocks held in memory, each kind in its bounded cache (<see cref="Qcow2MetadataCache{T}"/>).
/// Caller holds the lock throughout.</summary>
public sealed partial class Qcow2Image
{
    private sealed class L2Table(ulong[] entries, ulong[]? bitmaps) : Qcow2CachedCluster
    {
        public readonly ulong[] Entries = entries;
        /// <summary>The subcluster bitmaps of an extended L2 table (null for standard entries).</summary>
        public readonly ulong[]? Bitmaps = bitmaps;
    }

    private sealed class RefcountBlock(byte[] data) : Qcow2CachedCluster
    {
        public readonly byte[] Data = data;
    }

    /// <summary>L2 tables by host offset.</summary>
    private readonly Qcow2MetadataCache<L2Table> _l2Cache;
    /// <summary>Refcount blocks by index in the refcount table.</summary>
    private readonly Qcow2MetadataCache<RefcountBlock> _refBlocks;

    /// <summary>Metadata blocks held in memory now (bounded by the cache sizes; for tests).</summary>
    internal int CachedRefcountBlocks
    {
        get { lock (_lock) return _refBlocks.Count; }
    }

    // ------------------------------------------------------------------ L2 tables

    /// <summary>The L2 table at <paramref name="l2Offset"/> (the L1 entry at <paramref name="l1Index"/> names it), read
    /// into the cache if it is not there.</summary>
    private L2Table LoadL2(long l2Offset, long l1Index)
    {
        if (_l2Cache.TryGet(l2Offset, out var t)) return t;
        CachedReads.ThrowIfActive(); // loading it could wait, and adding it could write dirty tables back
        if ((l2Offset & (_clusterSize - 1)) != 0)
            throw SignalCorruption(fatal: true, $"L2 table offset {CHex(l2Offset)} unaligned (L1 index: {CHex(l1Index)})");
        if (l2Offset + _clusterSize > _file.Length)
            throw new BlockException($"qcow2: L2 table offset 0x{l2Offset:x} lies past the end of the file (L1 index: {l1Index}); image is corrupt");
        var raw = new byte[_clusterSize];
        _file.Read(l2Offset, raw);
        var entries = new ulong[_l2Entries];
        var bitmaps = _extendedL2 ? new ulong[_l2Entries] : null;
        for (int i = 0; i < entries.Length; i++)
        {
            if (bitmaps is null) entries[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
            else (entries[i], bitmaps[i]) = Qcow2Subclusters.ReadExtended(raw, i);
        }
        t = new L2Table(entries, bitmaps);
        MakeRoomInL2Cache();
        _l2Cache.Add(l2Offset, t);
        return t;
    }

    /// <summary>Keeps the L2 cache bounded: when full, dirty tables are written back (in the crash-safe order) and the
    /// least recently used half goes.</summary>
    private void MakeRoomInL2Cache()
    {
        if (!_l2Cache.IsFull) return;
        if (_l2Cache.AnyDirty) WriteBackMetadata();
        // Drop the least recently used half of the clean tables.
        _l2Cache.DropLeastRecentlyUsedHalf(cleanOnly: false);
    }

    // ------------------------------------------------------------------ refcount blocks

    /// <summary>The refcount block at <paramref name="tableIndex"/> of the refcount table, read into the cache if it is
    /// not there; null when the table names none.</summary>
    private RefcountBlock? GetRefcountBlock(long tableIndex)
    {
        if (tableIndex >= _refTable.Length) return null;
        long blockOffset = (long)(_refTable[tableIndex] & ~Qcow2Entry.RefcountTableReservedMask);
        if (blockOffset == 0) return null;
        if (_refBlocks.TryGet(tableIndex, out var block)) return block;
        if ((blockOffset & (_clusterSize - 1)) != 0)
            throw SignalCorruption(fatal: true, $"Refblock offset {CHex(blockOffset)} unaligned (reftable index: {CHex(tableIndex)})");
        if (blockOffset < 0 || blockOffset >= _file.Length)
            throw new BlockException($"qcow2: refcount block offset 0x{blockOffset:x} is invalid (table index {tableIndex}); image is corrupt");
        var data = new byte[_clusterSize];
        _file.DebugEvent("refblock_load");
        _file.Read(blockOffset, data);
        block = new RefcountBlock(data);
        EvictCleanRefcountBlocks();
        _refBlocks.Add(tableIndex, block);
        return block;
    }

    /// <summary>Keeps the refcount cache bounded: past its capacity the least recently used half of the clean blocks
    /// go (they are on disk as they are). Dirty ones stay until the next write-back, which is never started from
    /// here: callers hold references to blocks they are about to change, and only clean, unused ones may go.</summary>
    private void EvictCleanRefcountBlocks()
    {
        if (_refBlocks.IsFull) _refBlocks.DropLeastRecentlyUsedHalf(cleanOnly: true);
    }

    /// <summary>Refcount of a host cluster (0 where no refcount block covers it). Caller holds the lock.</summary>
    internal ulong GetRefcount(long hostCluster)
    {
        var block = GetRefcountBlock(hostCluster / _refcountsPerBlock);
        return block is null ? 0 : RefcountCodec.Get(block.Data, hostCluster % _refcountsPerBlock, _refcountOrder);
    }
}
