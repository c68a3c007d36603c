using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

public enum RepairMode { None, Leaks, All }

/// <summary>What a consistency check found (the fields of <c>qemu-img check --output=json</c>).</summary>
public sealed record CheckReport
{
    public int Corruptions { get; set; }
    public int Leaks { get; set; }
    public int CheckErrors { get; set; }
    public int CorruptionsFixed { get; set; }
    public int LeaksFixed { get; set; }
    public long ImageEndOffset { get; set; }
    public long TotalClusters { get; set; }
    public long AllocatedClusters { get; set; }
    public long FragmentedClusters { get; set; }
    public long CompressedClusters { get; set; }
    /// <summary>Diagnostics, one per line, in the order found (qemu-img prints them on stderr).</summary>
    public List<string> Messages { get; } = new();
}

public sealed partial class Qcow2Image
{
    /// <summary>Discards every cluster of the image (after a commit), leaving it empty.</summary>
    public void MakeEmpty()
    {
        CheckWritable();
        lock (_lock)
        {
            for (long l1i = 0; l1i < _l1.Length; l1i++)
            {
                if ((_l1[l1i] & Qcow2Entry.OffsetMask) == 0) continue;
                var table = EnsureL2Table(l1i);
                for (int i = 0; i < table.Entries.Length; i++)
                {
                    if (table.Entries[i] == 0) continue;
                    ReleaseEntry(table.Entries[i]);
                    table.Entries[i] = 0;
                    table.Dirty = true;
                }
            }
            WriteBackMetadata();
        }
    }

    /// <summary>
    /// Recounts every reference in the image (header, L1, L2, data, refcount structures, bitmaps) and compares
    /// the result with the stored refcounts, as <c>qemu-img check</c> does. With a repair mode the stored
    /// refcounts are corrected (leaks only, or everything); repairs are written in a crash-safe order.
    /// </summary>
    public CheckReport Check(RepairMode repair)
    {
        if (repair != RepairMode.None) CheckWritable();
        lock (_lock)
        {
            WriteBackMetadata();
            var report = new CheckReport();
            long fileLength = _file.Length;
            long nbClusters = (fileLength + _clusterSize - 1) >> _clusterBits;
            var counted = new Dictionary<long, ulong>();
            report.TotalClusters = (Size + _clusterSize - 1) >> _clusterBits;

            void Count(long offset, long size)
            {
                if (size <= 0) return;
                if (offset + size - fileLength >= _clusterSize)
                {
                    report.Messages.Add($"ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}");
                    report.Corruptions++;
                    return;
                }
                for (long c = offset >> _clusterBits; c <= (offset + size - 1) >> _clusterBits; c++)
                    counted[c] = counted.GetValueOrDefault(c) + 1;
            }

            Count(0, _clusterSize);
            if (_luksArea is { } luks) Count(luks.Offset, luks.Length);
            Count((long)_header.L1TableOffset, _l1.Length * 8L);
            long nextContiguous = 0;
            var l2Raw = new byte[_clusterSize];
            var l2Tables = new List<(long L1Index, long Offset)>();
            for (long l1i = 0; l1i < _l1.Length; l1i++)
            {
                ulong l1e = _l1[l1i];
                long l2Offset = (long)(l1e & Qcow2Entry.OffsetMask);
                if (l2Offset == 0) continue;
                if ((l2Offset & (_clusterSize - 1)) != 0)
                {
                    report.Messages.Add($"ERROR l2_offset={l2Offset:x}: Table is not cluster aligned; L1 entry corrupted");
                    report.Corruptions++;
                    continue;
                }
                int before = report.Corruptions;
                Count(l2Offset, _clusterSize);
                if (report.Corruptions != before) { l2Tables.Add((l1i, l2Offset)); continue; }
                l2Tables.Add((l1i, l2Offset));
                _file.Read(l2Offset, l2Raw);
                nextContiguous = 0; // QEMU counts fragmentation within each L2 table
                for (int i = 0; i < _l2Entries; i++)
                {
                    ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * 8));
                    switch (Qcow2Entry.Classify(e))
                    {
                        case L2EntryKind.Compressed:
                            if ((e & Qcow2Entry.Copied) != 0)
                            {
                                var (h, _) = Qcow2Entry.DecodeCompressed(e, _clusterBits);
                                report.Messages.Add($"ERROR: coffset=0x{h:x}: Compressed cluster entry has the copied flag set");
                                report.Corruptions++;
                            }
                            var (host, sectors) = Qcow2Entry.DecodeCompressed(e, _clusterBits);
                            Count(host, Qcow2Entry.CompressedReadLength(host, sectors));
                            report.AllocatedClusters++;
                            report.CompressedClusters++;
                            report.FragmentedClusters++;
                            break;
                        case L2EntryKind.Normal:
                        case L2EntryKind.ZeroAllocated:
                            long off = (long)(e & Qcow2Entry.OffsetMask);
                            if ((off & (_clusterSize - 1)) != 0)
                            {
                                report.Messages.Add($"ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                                report.Corruptions++;
                            }
                            report.AllocatedClusters++;
                            if (nextContiguous != 0 && off != nextContiguous) report.FragmentedClusters++;
                            nextContiguous = off + _clusterSize;
                            Count(off, _clusterSize);
                            break;
                    }
                }
            }
            CountSnapshots(Count, report, repair);
            CountBitmaps(Count, report);
            foreach (var error in _bitmapLoadErrors)
            {
                report.Messages.Add($"ERROR bitmaps: {error}");
                report.Corruptions++;
            }
            Count((long)_header.RefcountTableOffset, _header.RefcountTableClusters * _clusterSize);
            for (long ti = 0; ti < _refTable.Length; ti++)
            {
                if ((_refTable[ti] & Qcow2Entry.RefcountTableReservedMask) != 0)
                {
                    // As QEMU: the entry cannot be trusted, so its block is not counted as referenced.
                    report.Messages.Add($"ERROR refcount table entry {ti} has reserved bits set");
                    report.Corruptions++;
                    continue;
                }
                long blockOffset = (long)(_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask);
                if (blockOffset == 0) continue;
                if ((blockOffset & (_clusterSize - 1)) != 0)
                {
                    report.Messages.Add($"ERROR refcount block {ti} is not cluster aligned; refcount table entry corrupted");
                    report.Corruptions++;
                    continue;
                }
                if (blockOffset < 0 || blockOffset >= fileLength)
                {
                    report.Messages.Add($"ERROR refcount block {ti} is outside image");
                    report.Corruptions++;
                    continue;
                }
                Count(blockOffset, _clusterSize);
            }

            // Compare stored refcounts with the references found.
            bool refcountRepairNeeded = false;
            long highest = -1;
            var fixes = new List<(long Cluster, ulong Value)>();
            for (long c = 0; c < nbClusters; c++)
            {
                ulong stored;
                try { stored = GetRefcount(c); }
                catch (BlockException) { stored = 0; }
                ulong found = counted.GetValueOrDefault(c);
                if (stored > 0 || found > 0) highest = c;
                if (stored == found) continue;
                if (stored > found)
                {
                    report.Messages.Add($"Leaked cluster {c} refcount={stored} reference={found}");
                    report.Leaks++;
                    if (repair != RepairMode.None)
                    {
                        report.Messages.Add($"Repairing cluster {c} refcount={stored} reference={found}");
                        fixes.Add((c, found));
                        report.LeaksFixed++;
                    }
                }
                else
                {
                    report.Messages.Add($"ERROR cluster {c} refcount={stored} reference={found}");
                    report.Corruptions++;
                    if (repair == RepairMode.All)
                    {
                        report.Messages.Add($"Repairing cluster {c} refcount={stored} reference={found}");
                        fixes.Add((c, found));
                        report.CorruptionsFixed++;
                    }
                    else if (repair == RepairMode.Leaks && stored == 0)
                    {
                        // A cluster in use with no refcount at all: only a rebuild of the refcounts can fix it.
                        refcountRepairNeeded = true;
                    }
                }
            }
            if (refcountRepairNeeded)
            {
                report.Messages.Add("ERROR need to rebuild refcount structures");
                throw new CheckFailedException("Check failed: Input/output error", report);
            }

            // OFLAG_COPIED: set exactly where the refcount is 1.
            var flagFixes = new List<(long TableOffset, int Index, ulong Value)>();
            var l1Fixes = new List<(long Index, ulong Value)>();
            var fixedValues = fixes.ToDictionary(f => f.Cluster, f => f.Value);
            ulong RefAfterRepair(long cluster) =>
                fixedValues.TryGetValue(cluster, out var v) ? v : SafeRefcount(cluster);
            foreach (var (l1i, l2Offset) in l2Tables)
            {
                ulong l1e = _l1[l1i];
                ulong rc = RefAfterRepair(l2Offset >> _clusterBits);
                if ((rc == 1) != ((l1e & Qcow2Entry.Copied) != 0))
                {
                    report.Messages.Add($"{(repair == RepairMode.All ? "Repairing" : "ERROR")} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l1e:x} refcount={rc}");
                    if (repair == RepairMode.All) { l1Fixes.Add((l1i, rc == 1 ? l1e | Qcow2Entry.Copied : l1e & ~Qcow2Entry.Copied)); report.CorruptionsFixed++; }
                    else report.Corruptions++;
                }
                if (l2Offset + _clusterSize > fileLength) continue;
                _file.Read(l2Offset, l2Raw);
                for (int i = 0; i < _l2Entries; i++)
                {
                    ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * 8));
                    var kind = Qcow2Entry.Classify(e);
                    if (kind is not (L2EntryKind.Normal or L2EntryKind.ZeroAllocated)) continue;
                    ulong drc = RefAfterRepair((long)(e & Qcow2Entry.OffsetMask) >> _clusterBits);
                    if ((drc == 1) != ((e & Qcow2Entry.Copied) != 0))
                    {
                        report.Messages.Add($"{(repair == RepairMode.All ? "Repairing" : "ERROR")} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={drc}");
                        if (repair == RepairMode.All) { flagFixes.Add((l2Offset, i, drc == 1 ? e | Qcow2Entry.Copied : e & ~Qcow2Entry.Copied)); report.CorruptionsFixed++; }
                        else report.Corruptions++;
                    }
                }
            }

            if (fixes.Count > 0 || flagFixes.Count > 0 || l1Fixes.Count > 0)
            {
                // Raising refcounts first and lowering them last keeps every intermediate state safe.
                foreach (var (c, v) in fixes.Where(f => f.Value > SafeRefcount(f.Cluster))) SetRefcount(c, v);
                WriteBackMetadata();
                foreach (var (tableOffset, index, value) in flagFixes)
                {
                    _l2Cache.Remove(tableOffset);
                    var b = new byte[8];
                    BinaryPrimitives.WriteUInt64BigEndian(b, value);
                    _file.Write(tableOffset + index * 8L, b);
                }
                foreach (var (index, value) in l1Fixes)
                {
                    _l1[index] = value;
                    _l1Dirty = true;
                }
                WriteBackMetadata();
                foreach (var (c, v) in fixes.Where(f => f.Value < SafeRefcount(f.Cluster))) SetRefcount(c, v);
                WriteBackMetadata();
                _freeClusterHint = 0;
            }
            report.ImageEndOffset = (highest + 1) * _clusterSize;
            return report;
        }
    }

    private ulong SafeRefcount(long cluster)
    {
        try { return GetRefcount(cluster); }
        catch (BlockException) { return 0; }
    }

    /// <summary>Counts the clusters of the bitmaps extension: directory, bitmap tables and their data clusters.</summary>
    private void CountBitmaps(Action<long, long> count, CheckReport report)
    {
        var ext = _extras.Find(Qcow2ExtensionType.Bitmaps);
        if (ext is null || ext.Data.Length < 24) return;
        uint nb = BinaryPrimitives.ReadUInt32BigEndian(ext.Data);
        long dirSize = (long)BinaryPrimitives.ReadUInt64BigEndian(ext.Data.AsSpan(8));
        long dirOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(ext.Data.AsSpan(16));
        if (dirSize <= 0 || dirSize > 64L << 20 || dirOffset <= 0 || dirOffset + dirSize > _file.Length)
        {
            report.Messages.Add("ERROR bitmap directory lies outside the image or has an invalid size");
            report.Corruptions++;
            return;
        }
        count(dirOffset, dirSize);
        var dir = new byte[dirSize];
        _file.Read(dirOffset, dir);
        int pos = 0;
        for (uint n = 0; n < nb && pos + 24 <= dir.Length; n++)
        {
            long tableOffset = (long)BinaryPrimitives.ReadUInt64BigEndian(dir.AsSpan(pos));
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(dir.AsSpan(pos + 8));
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(dir.AsSpan(pos + 18));
            int extraSize = (int)BinaryPrimitives.ReadUInt32BigEndian(dir.AsSpan(pos + 20));
            pos += (24 + extraSize + nameSize + 7) & ~7;
            if (tableSize == 0 || tableSize > 0x8000000 || tableOffset <= 0 || (tableOffset & (_clusterSize - 1)) != 0)
            {
                report.Messages.Add($"ERROR bitmap table of bitmap {n} is invalid");
                report.Corruptions++;
                continue;
            }
            count(tableOffset, tableSize * 8L);
            if (tableOffset + tableSize * 8L > _file.Length) continue;
            var table = new byte[tableSize * 8L];
            _file.Read(tableOffset, table);
            for (int i = 0; i < tableSize; i++)
            {
                long data = (long)(BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * 8)) & Qcow2Entry.OffsetMask);
                if (data != 0) count(data, _clusterSize);
            }
        }
    }
}

/// <summary>The check could not complete (qemu-img exit code 1).</summary>
public sealed class CheckFailedException(string message, CheckReport report) : BlockException(message)
{
    public CheckReport Report { get; } = report;
}
