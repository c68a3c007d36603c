using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>A snapshot operation failed: the message says why (empty when QEMU says nothing more than the errno),
/// <see cref="Errno"/> is the errno QEMU reports for it (qemu-img prints it for creating and applying).</summary>
public sealed class SnapshotException(string message, int errno) : BlockException(message)
{
    public int Errno { get; } = errno;
}

/// <summary>
/// Internal snapshots. A snapshot is a copy of the L1 table; every L2 table and data cluster it reaches gains a
/// reference, so refcounts count the L1 tables that reach a cluster. Clusters with a refcount above one are shared:
/// their entries lose QCOW_OFLAG_COPIED and the write path copies them before changing them.
/// </summary>
public sealed partial class Qcow2Image
{
    private List<Qcow2Snapshot> _snapshots = [];
    private long _snapshotsSize;

    /// <summary>QEMU's limit on L1 tables (QCOW_MAX_L1_SIZE), in bytes.</summary>
    private const long MaxL1Bytes = 32L << 20;

    private const int ENOENT = 2, EAGAIN = 11, EINVAL = 22, EEXIST = 17, EFBIG = 27;

    /// <summary>The internal snapshots, in table order.</summary>
    public IReadOnlyList<Qcow2Snapshot> Snapshots => _snapshots;

    /// <summary>Reads the snapshot table at open, with QEMU's checks and limits.</summary>
    private void LoadSnapshots()
    {
        // check reads the table itself, and may repair what would make reading it fail here (QEMU's BDRV_O_CHECK).
        if (_openedForCheck) return;
        Qcow2SnapshotTable.ValidateLocation(_header.NbSnapshots, _header.SnapshotsOffset, _clusterSize);
        if (_header.NbSnapshots == 0) return;
        (_snapshots, _snapshotsSize) = ReadSnapshotTable(_header.NbSnapshots, (long)_header.SnapshotsOffset,
            bytes => Qcow2SnapshotTable.Parse(bytes, _header.NbSnapshots, (ulong)Size));
    }

    /// <summary>Reads and parses the snapshot table at <paramref name="offset"/>.</summary>
    private (List<Qcow2Snapshot>, long) ReadSnapshotTable(uint count, long offset,
        Func<byte[], (List<Qcow2Snapshot>, long)> parse)
    {
        long available = Math.Max(0, _file.Length - offset);
        // The table's length is only known once parsed: read a little, and more if the entries go on. Past the end
        // of the file it reads as zeros, as QEMU reads it. The last entry may start just below the size limit.
        const long Limit = Qcow2SnapshotTable.MaxTableSize + 256 * 1024;
        long chunk = 64 * 1024;
        while (true)
        {
            var bytes = new byte[chunk];
            _file.Read(offset, bytes.AsSpan(0, (int)Math.Min(chunk, available)));
            try
            {
                return parse(bytes);
            }
            catch (ImageFormatException e) when (chunk < Limit && e.Message.StartsWith("Snapshot table lies past", StringComparison.Ordinal))
            {
                chunk = Math.Min(Limit, chunk * 4);
            }
        }
    }

    private int FindSnapshot(string idOrName)
    {
        int i = _snapshots.FindIndex(s => s.Id == idOrName);
        return i >= 0 ? i : _snapshots.FindIndex(s => s.Name == idOrName);
    }

    /// <summary>The snapshot's L1 table, after QEMU's checks of its place and size.</summary>
    private ulong[] ReadSnapshotL1(Qcow2Snapshot sn, int errno = EINVAL)
    {
        if (sn.L1Size > MaxL1Bytes / 8) throw new SnapshotException("Snapshot L1 table too large", EFBIG);
        if ((sn.L1TableOffset & (ulong)(_clusterSize - 1)) != 0 || sn.L1TableOffset > (ulong)(long.MaxValue - sn.L1Size * 8L))
            throw new SnapshotException("Snapshot L1 table offset invalid", errno);
        var raw = new byte[sn.L1Size * 8L];
        _file.Read((long)sn.L1TableOffset, raw);
        var l1 = new ulong[sn.L1Size];
        for (int i = 0; i < l1.Length; i++) l1[i] = BinaryPrimitives.ReadUInt64BigEndian(raw.AsSpan(i * 8));
        return l1;
    }

    /// <summary>
    /// Reads the image as one of its snapshots from now on (read-only opens only), as qemu-img convert -l does. With
    /// <paramref name="byIdOrName"/> the one string names the snapshot by ID or else by name; otherwise the given ID
    /// and name must both match.
    /// </summary>
    public void LoadSnapshotTemporarily(string? id, string? name, bool byIdOrName)
    {
        if (!ReadOnly) throw new BlockException("Cannot load snapshot on a writable image");
        lock (_lock)
        {
            int index = byIdOrName
                ? FindSnapshot(id!)
                : _snapshots.FindIndex(s => (id is null || s.Id == id) && (name is null || s.Name == name));
            if (index < 0 || (id is null && name is null)) throw new BlockException("Can't find snapshot");
            var sn = _snapshots[index];
            _l1 = ReadSnapshotL1(sn);
            _l2Cache.Clear();
        }
    }

    /// <summary>Takes an internal snapshot of the disk (no VM state), as <c>qemu-img snapshot -c</c> does.</summary>
    public Qcow2Snapshot CreateSnapshot(string name, DateTimeOffset now)
    {
        CheckWritable();
        ThrowIfSnapshotsUnsupported();
        lock (_lock)
        {
            WriteBackMetadata();
            if (_snapshots.Count >= Qcow2SnapshotTable.MaxSnapshots) throw new SnapshotException("File too large", EFBIG);
            ulong maxId = 0;
            foreach (var s in _snapshots) maxId = Math.Max(maxId, LeadingNumber(s.Id));
            string id = (maxId + 1).ToString(System.Globalization.CultureInfo.InvariantCulture);
            if (_snapshots.Any(s => s.Id == id)) throw new SnapshotException("File exists", EEXIST);
            long unixNanos = (now.UtcTicks - DateTimeOffset.UnixEpoch.UtcTicks) * 100;
            var sn = new Qcow2Snapshot
            {
                Id = id,
                Name = name,
                DiskSize = (ulong)Size,
                DateSeconds = (uint)(unixNanos / 1_000_000_000),
                DateNanoseconds = (uint)(unixNanos % 1_000_000_000),
                Icount = 0,
                L1Size = (uint)_l1.Length,
            };
            if (Qcow2SnapshotTable.EncodedSize([.. _snapshots, sn]) > Qcow2SnapshotTable.MaxTableSize)
                throw new SnapshotException("File too large", EFBIG);

            CheckTreeCanBeShared(_l1);

            // The copy of the L1 table first, then the references it adds, and only then the table entry naming it.
            long l1Offset = 0;
            if (_l1.Length > 0)
            {
                l1Offset = AllocateClusters((_l1.Length * 8L + _clusterSize - 1) >> _clusterBits);
                WriteBackMetadata();
                WriteL1Table(l1Offset, _l1);
            }
            sn = sn with { L1TableOffset = (ulong)l1Offset };
            try
            {
                UpdateTreeRefcounts(_l1, +1, SnapshotL1Home.Active);
            }
            catch (RefcountOverflowException)
            {
                // A refcount at its width's limit (refcount_bits=1 allows no sharing at all). What was raised stays
                // raised and the new L1 copy stays allocated: leaks, never a cluster counted too low.
                throw new SnapshotException("Invalid argument", EINVAL);
            }
            WriteBackMetadata();
            WriteSnapshotTable([.. _snapshots, sn]);
            return sn;
        }
    }

    /// <summary>Refuses, before anything changes, a tree whose L2 or data clusters lie past the end of the file: their
    /// refcounts cannot be raised (QEMU fails with EFBIG where the refcount table could not grow that far, else
    /// EAGAIN). Caller holds the lock.</summary>
    private void CheckTreeCanBeShared(ulong[] l1)
    {
        const long MaxRefcountTableBytes = 8L << 20;
        void CheckCluster(long offset)
        {
            if (offset + _clusterSize <= Math.Max(_file.Length, _endCluster << _clusterBits)) return;
            long tableBytes = ((offset >> _clusterBits) / _refcountsPerBlock + 1) * 8;
            throw tableBytes > MaxRefcountTableBytes ? new SnapshotException("File too large", EFBIG)
                                                     : new SnapshotException("Resource temporarily unavailable", EAGAIN);
        }
        for (long i = 0; i < l1.Length; i++)
        {
            long l2Offset = (long)(l1[i] & Qcow2Entry.OffsetMask);
            if (l2Offset == 0) continue;
            CheckCluster(l2Offset);
            foreach (ulong e in LoadL2(l2Offset, i).Entries)
            {
                switch (KindOf(e))
                {
                    case L2EntryKind.Normal or L2EntryKind.ZeroAllocated:
                        CheckCluster((long)(e & Qcow2Entry.OffsetMask));
                        break;
                    case L2EntryKind.Compressed:
                        CheckCluster(Qcow2Entry.DecodeCompressed(e, _clusterBits).HostOffset & ~(_clusterSize - 1));
                        break;
                }
            }
        }
    }

    /// <summary>What strtoul makes of an ID: its leading decimal digits (0 when none).</summary>
    private static ulong LeadingNumber(string id)
    {
        ulong value = 0;
        foreach (char c in id)
        {
            if (!char.IsAsciiDigit(c)) break;
            value = value * 10 + (ulong)(c - '0');
        }
        return value;
    }

    /// <summary>Makes the snapshot's disk contents the active ones (<c>qemu-img snapshot -a</c>). A snapshot of
    /// another disk size resizes the image to it first.</summary>
    public void ApplySnapshot(string idOrName)
    {
        CheckWritable();
        lock (_lock)
        {
            WriteBackMetadata();
            int index = FindSnapshot(idOrName);
            if (index < 0) throw new SnapshotException("", ENOENT);
            var sn = _snapshots[index];
            var snL1 = ReadSnapshotL1(sn);
            if ((long)sn.DiskSize != Size) Resize((long)sn.DiskSize);
            if (snL1.Length > _l1.Length) GrowL1Table(snL1.Length);

            // References of the snapshot's tree rise before the active L1 table points at it; the old tree's fall after.
            try
            {
                UpdateTreeRefcounts(snL1, +1, SnapshotL1Home.OnDisk, (long)sn.L1TableOffset);
            }
            catch (RefcountOverflowException)
            {
                // As in CreateSnapshot: the active tree is untouched, what was raised stays raised (leaks).
                throw new SnapshotException("", EINVAL);
            }
            WriteBackMetadata();
            var newActive = new ulong[_l1.Length];
            Array.Copy(snL1, newActive, snL1.Length);
            WriteL1Table((long)_header.L1TableOffset, newActive);
            _file.Flush();
            var oldActive = _l1;
            _l1 = newActive;
            UpdateTreeRefcounts(oldActive, -1, SnapshotL1Home.Discarded);
            UpdateTreeRefcounts(_l1, 0, SnapshotL1Home.Active);
            WriteBackMetadata();
        }
    }

    /// <summary>Deletes a snapshot and releases what only it referenced (<c>qemu-img snapshot -d</c>).</summary>
    public void DeleteSnapshot(string idOrName)
    {
        CheckWritable();
        lock (_lock)
        {
            WriteBackMetadata();
            int index = FindSnapshot(idOrName);
            if (index < 0) throw new SnapshotException("snapshot not found", ENOENT);
            var sn = _snapshots[index];
            var snL1 = ReadSnapshotL1(sn);
            // Out of the table first: from then on nothing on disk reaches the snapshot's clusters.
            var remaining = new List<Qcow2Snapshot>(_snapshots);
            remaining.RemoveAt(index);
            try
            {
                WriteSnapshotTable(remaining);
                // Read again now that the entry is gone, as QEMU does: an I/O error from here on leaves leaks only.
                snL1 = ReadSnapshotL1(sn);
                UpdateTreeRefcounts(snL1, -1, SnapshotL1Home.Discarded);
                FreeClusters((long)sn.L1TableOffset, snL1.Length * 8L);
                // Clusters only the active tree references now are its own again.
                UpdateTreeRefcounts(_l1, 0, SnapshotL1Home.Active);
                WriteBackMetadata();
            }
            catch (BlockIOException e)
            {
                // What is in memory may now differ from the disk: this handle writes nothing more (leaks stay leaks).
                _writable = false;
                string stage = ReferenceEquals(_snapshots, remaining) ? "Failed to free the cluster and L1 table" : "Failed to remove snapshot from snapshot list";
                throw new SnapshotException($"{stage}: {BlockIOException.Describe(e.Errno)}", e.Errno);
            }
        }
    }

    /// <summary>Where an L1 table handed to <see cref="UpdateTreeRefcounts"/> lives, so that flag changes reach it.</summary>
    private enum SnapshotL1Home { Active, OnDisk, Discarded }

    /// <summary>
    /// Adds <paramref name="addend"/> (−1, 0 or +1) to the refcount of every L2 table and data cluster the L1 table
    /// reaches, and sets QCOW_OFLAG_COPIED exactly on the entries whose cluster then has refcount 1 (compressed
    /// clusters never). L2 tables whose refcount drops to zero leave the cache. Caller holds the lock.
    /// </summary>
    private void UpdateTreeRefcounts(ulong[] l1, int addend, SnapshotL1Home home, long l1Offset = 0)
    {
        bool l1Changed = false;
        for (long i = 0; i < l1.Length; i++)
        {
            long l2Offset = (long)(l1[i] & Qcow2Entry.OffsetMask);
            if (l2Offset == 0) continue;
            var table = LoadL2(l2Offset, i);
            for (int j = 0; j < table.Entries.Length; j++)
            {
                ulong e = table.Entries[j];
                ulong refcount;
                switch (KindOf(e))
                {
                    case L2EntryKind.Compressed:
                        if (addend != 0)
                        {
                            var (host, sectors) = Qcow2Entry.DecodeCompressed(e, _clusterBits);
                            long last = ClusterOf(host + Qcow2Entry.CompressedReadLength(host, sectors) - 1);
                            for (long c = ClusterOf(host); c <= last; c++) AdjustRefcount(c, addend);
                        }
                        continue;
                    case L2EntryKind.Normal:
                    case L2EntryKind.ZeroAllocated:
                        long cluster = (long)(e & Qcow2Entry.OffsetMask) >> _clusterBits;
                        if (addend != 0) AdjustRefcount(cluster, addend);
                        refcount = GetRefcount(cluster);
                        break;
                    default:
                        continue;
                }
                ulong flagged = refcount == 1 ? e | Qcow2Entry.Copied : e & ~Qcow2Entry.Copied;
                if (flagged == e) continue;
                table.Entries[j] = flagged;
                table.Dirty = true;
            }
            long l2Cluster = l2Offset >> _clusterBits;
            if (addend != 0) AdjustRefcount(l2Cluster, addend);
            ulong l2Refcount = GetRefcount(l2Cluster);
            if (l2Refcount == 0) _l2Cache.Remove(l2Offset);
            ulong newL1e = l2Refcount == 1 ? l1[i] | Qcow2Entry.Copied : l1[i] & ~Qcow2Entry.Copied;
            if (newL1e == l1[i]) continue;
            l1[i] = newL1e;
            l1Changed = true;
        }
        if (!l1Changed) return;
        if (home == SnapshotL1Home.Active) _l1Dirty = true;
        else if (home == SnapshotL1Home.OnDisk) WriteL1Table(l1Offset, l1);
    }

    /// <summary>Writes a new snapshot table, points the header at it and frees the old one, as QEMU does.</summary>
    private void WriteSnapshotTable(List<Qcow2Snapshot> snapshots)
    {
        var bytes = Qcow2SnapshotTable.Encode(snapshots);
        if (bytes.Length > Qcow2SnapshotTable.MaxTableSize) throw new SnapshotException("File too large", EFBIG);
        long newOffset = 0;
        if (bytes.Length > 0)
        {
            newOffset = AllocateClusters((bytes.Length + _clusterSize - 1) >> _clusterBits);
            WriteBackMetadata();
            _file.Write(newOffset, bytes);
            _file.Flush();
        }
        long oldOffset = (long)_header.SnapshotsOffset, oldSize = _snapshotsSize;
        _header = _header with { NbSnapshots = (uint)snapshots.Count, SnapshotsOffset = (ulong)newOffset };
        WriteHeaderFields();
        _file.Flush();
        _snapshots = snapshots;
        _snapshotsSize = bytes.Length;
        RebuildOverlapIndex();
        FreeClusters(oldOffset, oldSize);
        WriteBackMetadata();
    }

    /// <summary>QEMU's qcow2_free_clusters: raises cluster_free, and a refcount update that fails (an I/O error
    /// loading a refcount block) is reported and otherwise ignored — the clusters leak. Caller holds the lock.</summary>
    private void FreeClusters(long offset, long length)
    {
        if (length <= 0) return;
        _file.DebugEvent("cluster_free");
        try
        {
            for (long c = ClusterOf(offset); c <= ClusterOf(offset + length - 1); c++) AdjustRefcount(c, -1);
        }
        catch (BlockIOException e)
        {
            Console.Error.WriteLine($"qcow2_free_clusters failed: {BlockIOException.Describe(e.Errno)}");
        }
    }

    /// <summary>The write path found an L2 table shared with a snapshot: the active L1 gets its own copy, and the
    /// shared one loses the active tree's reference once the L1 entry on disk points at the copy. Caller holds the
    /// lock.</summary>
    private L2Table CopyOnWriteL2Table(long l1Index, long l2Offset)
    {
        var shared = LoadL2(l2Offset, l1Index);
        long newOffset = AllocateClusters(1);
        CheckNotHeader(newOffset, "L2 table");
        CheckHostWrite(newOffset, _clusterSize);
        _overlap.AddL2Table(newOffset);
        var copy = new L2Table((ulong[])shared.Entries.Clone(), (ulong[]?)shared.Bitmaps?.Clone()) { Dirty = true };
        MakeRoomInL2Cache();
        _l2Cache.Add(newOffset, copy);
        _l1[l1Index] = (ulong)newOffset | Qcow2Entry.Copied;
        _l1Dirty = true;
        _pendingFrees.Add((l2Offset, _clusterSize, ++_mapGeneration));
        return copy;
    }

    /// <summary>Counts the references of the snapshot table and of every snapshot's tree, for <c>check</c>.</summary>
    private void CountSnapshots(Action<long, long> count, CheckReport report)
    {
        if (_snapshots.Count == 0) return;
        var l2Raw = new byte[_clusterSize];
        for (int n = 0; n < _snapshots.Count; n++)
        {
            var sn = _snapshots[n];
            if ((sn.L1TableOffset & (ulong)(_clusterSize - 1)) != 0)
            {
                report.Messages.Add($"ERROR snapshot {sn.Id} ({sn.Name}) l1_offset=0x{sn.L1TableOffset:x}: L1 table is not cluster aligned; snapshot table entry corrupted");
                report.Corruptions++;
                continue;
            }
            if (sn.L1Size > MaxL1Bytes / 8)
            {
                report.Messages.Add($"ERROR snapshot {sn.Id} ({sn.Name}) l1_size=0x{sn.L1Size:x}: L1 table is too large; snapshot table entry corrupted");
                report.Corruptions++;
                continue;
            }
            int before = report.Corruptions;
            count((long)sn.L1TableOffset, sn.L1Size * 8L);
            if (report.Corruptions != before) continue;
            foreach (ulong l1e in ReadSnapshotL1(sn))
            {
                long l2Offset = CountL2Table(l1e, count, report, out bool readable);
                if (l2Offset == 0 || !readable) continue;
                _file.Read(l2Offset, l2Raw);
                for (int i = 0; i < _l2Entries; i++)
                {
                    ulong e = BinaryPrimitives.ReadUInt64BigEndian(l2Raw.AsSpan(i * _l2EntryBytes));
                    switch (KindOf(e))
                    {
                        case L2EntryKind.Compressed:
                            var (host, sectors) = Qcow2Entry.DecodeCompressed(e, _clusterBits);
                            count(host, Qcow2Entry.CompressedReadLength(host, sectors));
                            break;
                        case L2EntryKind.Normal:
                        case L2EntryKind.ZeroAllocated:
                            count((long)(e & Qcow2Entry.OffsetMask), _clusterSize);
                            break;
                    }
                }
            }
        }
        count((long)_header.SnapshotsOffset, _snapshotsSize);
    }
}
