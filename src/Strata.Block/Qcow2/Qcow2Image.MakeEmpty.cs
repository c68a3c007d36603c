using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>Emptying an image after a commit, as QEMU's qcow2_make_empty does it, blkdebug events included.</summary>
public sealed partial class Qcow2Image
{
    private const int MakeEmptyFirstClusters = 3; // header, refcount table, first refcount block

    /// <summary>
    /// Drops every cluster of the image. A version 3 image with nothing else to keep (no snapshots, bitmaps,
    /// encryption or external data file) is reset to a fresh layout in place: header, refcount table, one refcount
    /// block, zeroed L1 table — under the dirty bit, since the refcounts are wrong in between. Otherwise every
    /// cluster is discarded one by one. A failure on the way leaves the image as QEMU leaves it: the dirty bit set
    /// (repaired on the next open) and this handle writing nothing more.
    /// </summary>
    public void MakeEmpty()
    {
        CheckWritable();
        lock (_lock)
        {
            long l1Clusters = (_l1.Length * 8L + _clusterSize - 1) >> _clusterBits;
            bool resettable = _header.Version >= 3 && _snapshots.Count == 0 && _storedBitmaps.Count == 0
                && _header.CryptMethod == 0 && (_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExternalDataFile) == 0
                && MakeEmptyFirstClusters + l1Clusters <= _refcountsPerBlock;
            if (!resettable)
            {
                DiscardEveryCluster();
                return;
            }
            try
            {
                ResetToEmptyLayout(l1Clusters);
            }
            catch (BlockIOException)
            {
                // The refcounts on disk may be half rewritten: only a repair on the next open can make sense of them.
                _writable = false;
                throw;
            }
        }
    }

    private void DiscardEveryCluster()
    {
        for (long l1i = 0; l1i < _l1.Length; l1i++)
        {
            if ((_l1[l1i] & Qcow2Entry.OffsetMask) == 0) continue;
            var table = EnsureL2Table(l1i);
            for (int i = 0; i < table.Entries.Length; i++) ClearL2Slot(table, i);
        }
        WriteBackMetadata();
    }

    /// <summary>QEMU's make_completely_empty, step by step and with its events. Caller holds the lock.</summary>
    private void ResetToEmptyLayout(long l1Clusters)
    {
        WriteBackMetadata();
        _l2Cache.Clear();
        _refBlocks.Clear();
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures | Qcow2IncompatibleFeatures.Dirty };
        WriteHeaderFields();
        _file.Flush();
        _dirtyBitSet = true;

        _file.DebugEvent("l1_update");
        if (l1Clusters > 0) _file.Write((long)_header.L1TableOffset, new byte[l1Clusters << _clusterBits]);
        Array.Clear(_l1);

        // Room for the refcount table, its first block and the L1 table right after the header; whatever was there
        // (old refcounts, the old L1 table) may go, the dirty bit covers it.
        _file.DebugEvent("empty_image_prepare");
        _file.Write(_clusterSize, new byte[(MakeEmptyFirstClusters - 1 + l1Clusters) << _clusterBits]);

        _file.DebugEvent("l1_update");
        _file.DebugEvent("reftable_update");
        _header = _header with
        {
            L1TableOffset = (ulong)(MakeEmptyFirstClusters * _clusterSize),
            RefcountTableOffset = (ulong)_clusterSize,
            RefcountTableClusters = 1,
        };
        WriteHeaderFields();
        _file.Flush();
        _refTable = new ulong[_clusterSize / 8];
        _refTableDirty = false;

        _file.DebugEvent("refblock_alloc");
        var entry = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(entry, (ulong)(2 * _clusterSize));
        _file.Write(_clusterSize, entry);
        _file.Flush();
        _refTable[0] = (ulong)(2 * _clusterSize);

        // The new refcount block (zeros on disk) describes the first clusters, itself included.
        var block = new RefcountBlock(new byte[_clusterSize]) { Dirty = true };
        long used = MakeEmptyFirstClusters + l1Clusters;
        for (long c = 0; c < used; c++) RefcountCodec.Set(block.Data, c, _refcountOrder, 1);
        _refBlocks.Add(0, block);
        _pendingFrees.Clear();
        _compressedCursor = 0;
        _freeClusterHint = used;
        _endCluster = used;
        RebuildOverlapIndex();
        WriteBackMetadata();
        MarkClean();
        _file.SetLength(used << _clusterBits);
    }
}
