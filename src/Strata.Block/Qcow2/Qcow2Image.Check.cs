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

    /// <summary>Starts a message that qemu-img prints as an error report, behind its own name.</summary>
    public const string ToolPrefix = "\u0001tool: ";
}

public sealed partial class Qcow2Image
{
    /// <summary>
    /// Recounts every reference in the image (header, L1, L2, data, refcount structures, bitmaps) and compares
    /// the result with the stored refcounts, as <c>qemu-img check</c> does. With a repair mode the stored
    /// refcounts are corrected (leaks only, or everything); repairs are written in a crash-safe order. As in
    /// QEMU, a first comparison only reports; a used cluster without a refcount means the refcount structures
    /// cannot be trusted and (with <see cref="RepairMode.All"/>) are rebuilt from scratch; otherwise a second
    /// comparison repairs what the mode allows.
    /// </summary>
    public CheckReport Check(RepairMode repair)
    {
        if (repair != RepairMode.None) CheckWritable();
        lock (_lock)
        {
            WriteBackMetadata();
            var report = new CheckReport();
            report.TotalClusters = (Size + _clusterSize - 1) >> _clusterBits;
            long nbClusters = (_file.Length + _clusterSize - 1) >> _clusterBits;
            var l2Tables = new List<(long L1Index, long Offset)>();
            int snapshotCorruptions = CheckReadSnapshotTable(report, repair);
            var counted = CountReferences(report, l2Tables, out bool rebuild, repair);
            // A reference may reach just past the end of the file (less than a cluster): it is compared too.
            if (counted.Count > 0) nbClusters = Math.Max(nbClusters, counted.Keys.Max() + 1);

            var (corruptionsBefore, leaksBefore) = (report.Corruptions, report.Leaks);
            var fixes = new List<(long Cluster, ulong Value)>();
            long highest = CompareRefcounts(report, counted, nbClusters, RepairMode.None, fixes, ref rebuild);

            if (rebuild && repair == RepairMode.All)
            {
                report.Messages.Add("Rebuilding refcount structure");
                var (oldCorruptions, oldLeaks) = (report.Corruptions, report.Leaks);
                RebuildRefcountStructure(counted, nbClusters);
                report.Corruptions = 0;
                report.Leaks = 0;
                l2Tables.Clear();
                counted = CountReferences(report, l2Tables, out _);
                // The clusters of the old structures are leaked now; they are freed at once (their count is not
                // reported: they are part of the rebuild, not of what the image had wrong).
                var leakPass = new CheckReport();
                bool stillBroken = false;
                var leakFixes = new List<(long Cluster, ulong Value)>();
                nbClusters = Math.Max((_file.Length + _clusterSize - 1) >> _clusterBits, counted.Keys.Max() + 1);
                highest = CompareRefcounts(leakPass, counted, nbClusters, RepairMode.Leaks, leakFixes, ref stillBroken);
                report.Messages.AddRange(leakPass.Messages);
                if (stillBroken) report.Messages.Add("ERROR rebuilt refcount structure is still broken");
                foreach (var (c, v) in leakFixes) SetRefcount(c, v);
                WriteBackMetadata();
                DiscardFreedClusters(leakFixes);
                _freeClusterHint = 0;
                if (report.Corruptions < oldCorruptions) report.CorruptionsFixed += oldCorruptions - report.Corruptions;
                if (report.Leaks < oldLeaks) report.LeaksFixed += oldLeaks - report.Leaks;
                report.Leaks += leakPass.Leaks;
                fixes.Clear();
            }
            else if (repair != RepairMode.None)
            {
                if (rebuild)
                {
                    report.Messages.Add("ERROR need to rebuild refcount structures");
                    report.CheckErrors++;
                    throw new CheckFailedException("Check failed: Input/output error", report);
                }
                if (report.Leaks > 0 || report.Corruptions > 0)
                {
                    (report.Corruptions, report.Leaks) = (corruptionsBefore, leaksBefore);
                    highest = CompareRefcounts(report, counted, nbClusters, repair, fixes, ref rebuild);
                }
            }

            RepairOflagCopied(report, repair, l2Tables, fixes);
            report.ImageEndOffset = (highest + 1) * _clusterSize;
            // Entries cut or incomplete are fixed by writing the table anew, which allocates: only now that the
            // refcounts are sound.
            if (snapshotCorruptions > 0 && repair == RepairMode.All)
            {
                WriteSnapshotTable(_snapshots.Select(sn => sn.ExtraDataSize < Qcow2SnapshotTable.KnownExtraDataSize
                    ? sn with { ExtraDataSize = Qcow2SnapshotTable.KnownExtraDataSize } : sn).ToList());
                report.CorruptionsFixed += snapshotCorruptions;
            }
            else report.Corruptions += snapshotCorruptions;
            if (repair != RepairMode.None && report.CheckErrors == 0 && report.Corruptions == 0) MarkCleanAndConsistent();
            return report;
        }
    }

    /// <summary>
    /// Reads the snapshot table afresh from the header, as QEMU's check does: with <see cref="RepairMode.All"/>
    /// snapshots beyond the count or size limits are dropped (the header's count is updated at once; their
    /// clusters become leaks the refcount check frees) and extra data over the limit is cut. Returns the
    /// corruptions left for rewriting the table (cut extra data, incomplete version-3 entries).
    /// </summary>
    private int CheckReadSnapshotTable(CheckReport report, RepairMode repair)
    {
        uint count = _header.NbSnapshots;
        ulong offset = _header.SnapshotsOffset;
        int overhanging = 0;
        bool fix = repair == RepairMode.All;
        if (count > Qcow2SnapshotTable.MaxSnapshots && fix)
        {
            report.Messages.Add($"Discarding {count - Qcow2SnapshotTable.MaxSnapshots} overhanging snapshots");
            overhanging += (int)(count - Qcow2SnapshotTable.MaxSnapshots);
            count = Qcow2SnapshotTable.MaxSnapshots;
        }
        void Fail(string error, string? hint, string reason)
        {
            report.Messages.Add(CheckReport.ToolPrefix + error);
            if (hint is not null) report.Messages.Add(hint);
            report.CheckErrors++;
            _snapshots = [];
            _snapshotsSize = 0;
            throw new CheckFailedException($"Check failed: {reason}", report);
        }
        if (count > Qcow2SnapshotTable.MaxSnapshots)
            Fail("ERROR snapshot table too large",
                $"You can force-remove all {count - Qcow2SnapshotTable.MaxSnapshots} overhanging snapshots with qemu-img check -r all", "File too large");
        if (offset > (ulong)long.MaxValue - count * (ulong)Qcow2SnapshotTable.HeaderSize || (offset & (ulong)(_clusterSize - 1)) != 0)
            Fail("ERROR snapshot table offset invalid", null, "Invalid argument");

        var repairs = new Qcow2SnapshotTable.Repairs();
        List<Qcow2Snapshot> snapshots = [];
        long size = 0;
        if (count > 0)
        {
            try
            {
                (snapshots, size) = ReadSnapshotTable(count, (long)offset, bytes => fix
                    ? Qcow2SnapshotTable.ParseRepairing(bytes, count, (ulong)Size, repairs = new())
                    : Qcow2SnapshotTable.Parse(bytes, count, (ulong)Size));
            }
            catch (ImageFormatException e)
            {
                var lines = e.Message.Split('\n', 2);
                Fail("ERROR failed to read the snapshot table: " + lines[0], lines.Length > 1 ? lines[1] : null, "File too large");
            }
        }
        report.Messages.AddRange(repairs.Messages);
        overhanging += repairs.Overhanging;
        _snapshots = snapshots;
        _snapshotsSize = size;
        RebuildOverlapIndex();
        if (overhanging > 0)
        {
            // The count goes first, before the refcount check relies on it; what the dropped entries held leaks.
            _header = _header with { NbSnapshots = (uint)snapshots.Count };
            WriteHeaderFields();
            _file.Flush();
            report.CorruptionsFixed += overhanging;
        }
        int corruptions = repairs.ExtraDataDropped;
        if (_header.Version >= 3)
        {
            // Version 3 requires the disk size in every entry; a table written for version 2 may lack it.
            for (int i = 0; i < snapshots.Count; i++)
            {
                if (snapshots[i].ExtraDataSize >= Qcow2SnapshotTable.MinV3ExtraDataSize) continue;
                corruptions++;
                report.Messages.Add($"{(fix ? "Repairing" : "ERROR")} snapshot table entry {i} is incomplete");
            }
        }
        return corruptions;
    }

    /// <summary>Counts the references to every host cluster (the first half of a check). Errors found on the way go
    /// to the report; <paramref name="rebuild"/> says the refcount table itself cannot be trusted.</summary>
    private Dictionary<long, ulong> CountReferences(CheckReport report, List<(long L1Index, long Offset)> l2Tables, out bool rebuild,
        RepairMode repair = RepairMode.None)
    {
        rebuild = false;
        long fileLength = _file.Length;
        var counted = new Dictionary<long, ulong>();

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
            {
                ulong references = counted.GetValueOrDefault(c);
                if (references == RefcountCodec.MaxValue(_refcountOrder))
                {
                    // More references than the width can count: no refcount could be right (QEMU's message).
                    report.Messages.Add($"ERROR: overflow cluster offset=0x{c << _clusterBits:x}");
                    report.Messages.Add("Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing");
                    report.Corruptions++;
                    continue;
                }
                counted[c] = references + 1;
            }
        }

        Count(0, _clusterSize);
        if (_luksArea is { } luks) Count(luks.Offset, luks.Length);
        Count((long)_header.L1TableOffset, _l1.Length * 8L);
        long nextContiguous = 0;
        var l2Raw = new byte[_clusterSize];
        Action<long, long> count = Count;
        for (long l1i = 0; l1i < _l1.Length; l1i++)
        {
            ulong l1e = _l1[l1i];
            long l2Offset = CountL2Table(l1e, count, report, out bool readable);
            if (l2Offset == 0) continue;
            l2Tables.Add((l1i, l2Offset));
            if (!readable) continue;
            _file.Read(l2Offset, l2Raw);
            nextContiguous = 0; // QEMU counts fragmentation within each L2 table
            for (int i = 0; i < _l2Entries; i++)
            {
                ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * _l2EntryBytes));
                if (_extendedL2 && !CheckSubclusterBitmap(e, BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * 16 + 8)), i, report))
                    continue;
                switch (KindOf(e))
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
                            bool holdsData = _extendedL2
                                ? (BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * 16 + 8)) & Qcow2Subclusters.AllAllocated) != 0
                                : KindOf(e) == L2EntryKind.Normal;
                            if (holdsData)
                            {
                                report.Messages.Add($"ERROR offset={off:x}: Data cluster is not properly aligned; L2 entry corrupted.");
                                report.Corruptions++;
                            }
                            else if (repair == RepairMode.All)
                            {
                                // Nothing reads from the cluster: the entry loses it (it then reads as zeros, or,
                                // extended, as its subcluster bitmap says) and the cluster is left as a leak.
                                report.Messages.Add($"Repairing offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                                var fixedEntry = new byte[8];
                                BinaryPrimitives.WriteUInt64BigEndian(fixedEntry, _extendedL2 ? 0 : Qcow2Entry.ZeroFlag);
                                CheckHostWrite(l2Offset + (long)i * _l2EntryBytes, 8, Qcow2MetadataKind.ActiveL2);
                                _file.Write(l2Offset + (long)i * _l2EntryBytes, fixedEntry);
                                _file.Flush();
                                _l2Cache.Remove(l2Offset);
                                report.CorruptionsFixed++;
                                break;
                            }
                            else
                            {
                                report.Messages.Add($"ERROR offset={off:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.");
                                report.Corruptions++;
                            }
                        }
                        report.AllocatedClusters++;
                        if (nextContiguous != 0 && off != nextContiguous) report.FragmentedClusters++;
                        nextContiguous = off + _clusterSize;
                        if (!_externalData) Count(off, _clusterSize); // data-file clusters have no refcounts
                        break;
                }
            }
        }
        CountSnapshots(Count, report);
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
                rebuild = true;
                continue;
            }
            long blockOffset = (long)(_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask);
            if (blockOffset == 0) continue;
            if ((blockOffset & (_clusterSize - 1)) != 0)
            {
                report.Messages.Add($"ERROR refcount block {ti} is not cluster aligned; refcount table entry corrupted");
                report.Corruptions++;
                rebuild = true;
                continue;
            }
            if (blockOffset < 0 || blockOffset >= fileLength)
            {
                report.Messages.Add($"ERROR refcount block {ti} is outside image");
                report.Corruptions++;
                continue;
            }
            Count(blockOffset, _clusterSize);
            ulong refs = counted.GetValueOrDefault(blockOffset >> _clusterBits);
            if (refs != 1)
            {
                // A refcount block shared with anything else will be overwritten by it: only a rebuild helps.
                report.Messages.Add($"ERROR refcount block {ti} refcount={refs}");
                report.Corruptions++;
                rebuild = true;
            }
        }
        return counted;
    }

    /// <summary>Compares stored refcounts with the references counted, reporting each difference; the repairs the
    /// mode allows are collected in <paramref name="fixes"/> instead of being counted as errors. A used cluster
    /// with no refcount at all sets <paramref name="rebuild"/>. Returns the highest cluster in use.</summary>
    private long CompareRefcounts(CheckReport report, Dictionary<long, ulong> counted, long nbClusters, RepairMode repair,
        List<(long Cluster, ulong Value)> fixes, ref bool rebuild)
    {
        long highest = 0;
        for (long c = 0; c < nbClusters; c++)
        {
            ulong stored = SafeRefcount(c);
            ulong found = counted.GetValueOrDefault(c);
            if (stored > 0 || found > 0) highest = c;
            if (stored == found) continue;
            bool fixable = false;
            if (stored == 0) rebuild = true;
            else if (stored > found) fixable = repair != RepairMode.None;
            else fixable = repair == RepairMode.All;
            string what = fixable ? "Repairing" : stored < found ? "ERROR" : "Leaked";
            report.Messages.Add($"{what} cluster {c} refcount={stored} reference={found}");
            if (fixable)
            {
                fixes.Add((c, found));
                if (stored > found) report.LeaksFixed++;
                else report.CorruptionsFixed++;
            }
            else if (stored < found) report.Corruptions++;
            else report.Leaks++;
        }
        return highest;
    }

    /// <summary>Sets OFLAG_COPIED exactly where the refcount (after the pending <paramref name="fixes"/>) is 1, then
    /// writes all repairs: raising refcounts first and lowering them last keeps every intermediate state safe.</summary>
    private void RepairOflagCopied(CheckReport report, RepairMode repair, List<(long L1Index, long Offset)> l2Tables,
        List<(long Cluster, ulong Value)> fixes)
    {
        // With leaks-only repair QEMU fixes the flags only when nothing else is wrong.
        bool fix = repair == RepairMode.All
            || (repair == RepairMode.Leaks && report.CheckErrors == 0 && report.Corruptions == 0 && report.Leaks == 0);
        var flagFixes = new List<(long TableOffset, int Index, ulong Value)>();
        var l1Fixes = new List<(long Index, ulong Value)>();
        var fixedValues = fixes.ToDictionary(f => f.Cluster, f => f.Value);
        ulong RefAfterRepair(long cluster) =>
            fixedValues.TryGetValue(cluster, out var v) ? v : SafeRefcount(cluster);
        long fileLength = _file.Length;
        var l2Raw = new byte[_clusterSize];
        foreach (var (l1i, l2Offset) in l2Tables)
        {
            ulong l1e = _l1[l1i];
            ulong rc = RefAfterRepair(l2Offset >> _clusterBits);
            if ((rc == 1) != ((l1e & Qcow2Entry.Copied) != 0))
            {
                report.Messages.Add($"{(fix ? "Repairing" : "ERROR")} OFLAG_COPIED L2 cluster: l1_index={l1i} l1_entry={l1e:x} refcount={rc}");
                if (fix) { l1Fixes.Add((l1i, rc == 1 ? l1e | Qcow2Entry.Copied : l1e & ~Qcow2Entry.Copied)); report.CorruptionsFixed++; }
                else report.Corruptions++;
            }
            if (l2Offset + _clusterSize > fileLength) continue;
            _file.Read(l2Offset, l2Raw);
            for (int i = 0; i < _l2Entries; i++)
            {
                ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * _l2EntryBytes));
                var kind = KindOf(e);
                if (_externalData || kind is not (L2EntryKind.Normal or L2EntryKind.ZeroAllocated)) continue;
                ulong drc = RefAfterRepair((long)(e & Qcow2Entry.OffsetMask) >> _clusterBits);
                if ((drc == 1) != ((e & Qcow2Entry.Copied) != 0))
                {
                    report.Messages.Add($"{(fix ? "Repairing" : "ERROR")} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={drc}");
                    if (fix) { flagFixes.Add((l2Offset, i, drc == 1 ? e | Qcow2Entry.Copied : e & ~Qcow2Entry.Copied)); report.CorruptionsFixed++; }
                    else report.Corruptions++;
                }
            }
        }

        if (fixes.Count == 0 && flagFixes.Count == 0 && l1Fixes.Count == 0) return;
        foreach (var (c, v) in fixes.Where(f => f.Value > SafeRefcount(f.Cluster))) SetRefcount(c, v);
        WriteBackMetadata();
        foreach (var (tableOffset, index, value) in flagFixes)
        {
            _l2Cache.Remove(tableOffset);
            var b = new byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(b, value);
            _file.Write(tableOffset + index * (long)_l2EntryBytes, b);
        }
        foreach (var (index, value) in l1Fixes)
        {
            _l1[index] = value;
            _l1Dirty = true;
        }
        WriteBackMetadata();
        var lowered = fixes.Where(f => f.Value < SafeRefcount(f.Cluster)).ToList();
        foreach (var (c, v) in lowered) SetRefcount(c, v);
        WriteBackMetadata();
        DiscardFreedClusters(lowered);
        _freeClusterHint = 0;
    }

    /// <summary>Clusters a repair freed are discarded in the host file, as QEMU does (their refcount 0 is on disk).</summary>
    private void DiscardFreedClusters(List<(long Cluster, ulong Value)> lowered)
    {
        foreach (var (c, v) in lowered)
            if (v == 0) _file.PunchHole(c << _clusterBits, _clusterSize);
    }

    /// <summary>
    /// Writes a new refcount table and new refcount blocks holding exactly the references counted, in clusters the
    /// count says are free, then points the header at them (QEMU's rebuild_refcount_structure: the same placement,
    /// so that repairs print the same clusters). The old structures are left behind as leaks for the caller.
    /// </summary>
    private void RebuildRefcountStructure(Dictionary<long, ulong> counted, long nbClusters)
    {
        long size = Math.Max(nbClusters, counted.Count == 0 ? 0 : counted.Keys.Max() + 1);
        var refs = new ulong[size];
        foreach (var (c, n) in counted) refs[c] = n;
        var reftable = Array.Empty<ulong>();
        long entriesPerTableCluster = _clusterSize / 8;

        ulong RefsAt(long cluster) => cluster < refs.Length ? refs[cluster] : 0;

        // The first run of `count` clusters free in `refs` at or after `firstFree`, marked used.
        long Allocate(int count, ref long firstFree)
        {
            long cluster = firstFree, run = 0;
            bool firstGap = true;
            for (; cluster < refs.Length && run < count; cluster++)
            {
                if (refs[cluster] == 0)
                {
                    run++;
                    if (firstGap) { firstFree = cluster; firstGap = false; }
                }
                else run = 0;
            }
            if (run < count) Array.Resize(ref refs, (int)(cluster + count - run));
            cluster -= run;
            for (int i = 0; i < count; i++) refs[cluster + i] = 1;
            return cluster;
        }

        // Writes the refcount blocks covering the used clusters in [first, end); true when the table had to grow.
        bool WriteBlocks(long first, long end)
        {
            bool grown = false;
            long firstFree = 0;
            var block = new byte[_clusterSize];
            for (long cluster = first; cluster < end; cluster++)
            {
                if (RefsAt(cluster) == 0) continue;
                long index = cluster / _refcountsPerBlock;
                long blockStart = index * _refcountsPerBlock;
                long blockCluster;
                if (index < reftable.Length && reftable[index] != 0) blockCluster = (long)reftable[index] >> _clusterBits;
                else
                {
                    firstFree = Math.Max(firstFree, blockStart);
                    blockCluster = Allocate(1, ref firstFree);
                    if (blockCluster >= end) end = blockCluster + 1;
                    if (reftable.Length <= index)
                    {
                        long entries = (index + entriesPerTableCluster) / entriesPerTableCluster * entriesPerTableCluster;
                        Array.Resize(ref reftable, (int)entries);
                        grown = true;
                    }
                    reftable[index] = (ulong)(blockCluster << _clusterBits);
                }
                Array.Clear(block);
                for (long i = 0; i < _refcountsPerBlock; i++)
                    RefcountCodec.Set(block, i, _refcountOrder, RefsAt(blockStart + i));
                _file.Write(blockCluster << _clusterBits, block);
                cluster = blockStart + _refcountsPerBlock - 1;
            }
            return grown;
        }

        WriteBlocks(0, refs.Length);
        long tableCluster, tableClusters;
        do
        {
            tableClusters = reftable.Length / entriesPerTableCluster;
            long firstFree = 0;
            tableCluster = Allocate((int)tableClusters, ref firstFree);
        } while (WriteBlocks(tableCluster, tableCluster + tableClusters));

        var raw = new byte[reftable.Length * 8];
        for (int i = 0; i < reftable.Length; i++) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), reftable[i]);
        _file.Write(tableCluster << _clusterBits, raw);
        _file.Flush();
        _header = _header with { RefcountTableOffset = (ulong)(tableCluster << _clusterBits), RefcountTableClusters = (uint)tableClusters };
        WriteHeaderFields();
        _file.Flush();
        _refTable = reftable;
        _refBlocks.Clear();
        _refTableDirty = false;
        _endCluster = Math.Max(_endCluster, refs.Length);
        RebuildOverlapIndex();
    }

    /// <summary>After a repair that left no corruption: the image is clean (dirty bit) and consistent (corrupt bit).</summary>
    private void MarkCleanAndConsistent()
    {
        MarkClean();
        if ((_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Corrupt) == 0) return;
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures & ~Qcow2IncompatibleFeatures.Corrupt };
        WriteHeaderFields();
        _file.Flush();
    }

    private ulong SafeRefcount(long cluster)
    {
        try { return GetRefcount(cluster); }
        catch (BlockException) { return 0; }
    }


    /// <summary>The L2 table an L1 entry (active or a snapshot's) names, for check: 0 for none, and for one that is
    /// not cluster aligned, reported as QEMU reports it. Its cluster is counted as referenced; <paramref name="readable"/>
    /// says the count found nothing wrong, so its entries may be read.</summary>
    private long CountL2Table(ulong l1e, Action<long, long> count, CheckReport report, out bool readable)
    {
        readable = false;
        long l2Offset = (long)(l1e & Qcow2Entry.OffsetMask);
        if (l2Offset == 0) return 0;
        if ((l2Offset & (_clusterSize - 1)) != 0)
        {
            report.Messages.Add($"ERROR l2_offset={l2Offset:x}: Table is not cluster aligned; L1 entry corrupted");
            report.Corruptions++;
            return 0;
        }
        int before = report.Corruptions;
        count(l2Offset, _clusterSize);
        readable = report.Corruptions == before;
        return l2Offset;
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
