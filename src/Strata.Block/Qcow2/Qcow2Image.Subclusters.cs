using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Extended L2 entries (incompatible feature bit 4): every cluster is split into 32 subclusters, each allocated
/// (read from the host cluster), zero, or unallocated (read from the backing file). Reads honour each subcluster;
/// writes allocate at subcluster granularity as QEMU does: only the touched subclusters are written, a partially
/// touched one gets the rest of its bytes from where they read now (host, zeros or the backing file). A compressed
/// or snapshot-shared cluster is copied whole into a new cluster first. Extended images take their writes under the
/// image lock (they are rare; correctness over throughput), so in-place writes never race an allocation.
/// </summary>
public sealed partial class Qcow2Image
{
    private int _l2EntryBytes => Qcow2Subclusters.EntryBytes(_extendedL2);
    private int SubclusterBits => _clusterBits - 5;
    private long SubclusterSize => _clusterSize >> 5;

    /// <summary>What the standard word of an L2 entry says: the zero flag is ignored in extended entries, and with an
    /// external data file host offset 0 with COPIED is a real cluster.</summary>
    private L2EntryKind KindOf(ulong entry) =>
        Qcow2Entry.Classify(_extendedL2 ? entry & ~Qcow2Entry.ZeroFlag : entry, _externalData);

    /// <summary>Entry and subcluster bitmap of a guest cluster ((0, 0) with no L2 table). Caller holds the lock.</summary>
    private (ulong Entry, ulong Bitmap) GetExtendedL2Entry(long guestCluster)
    {
        long l1Index = guestCluster / _l2Entries;
        if (l1Index >= _l1.Length) return (0, 0);
        ulong l2Offset = _l1[l1Index] & Qcow2Entry.OffsetMask;
        if (l2Offset == 0) return (0, 0);
        var table = LoadL2((long)l2Offset, l1Index);
        int idx = (int)(guestCluster % _l2Entries);
        return (table.Entries[idx], table.Bitmaps![idx]);
    }

    /// <summary>Empties one L2 slot (entry and bitmap), releasing its host storage. Caller holds the lock.</summary>
    private void ClearL2Slot(L2Table table, int idx)
    {
        if (table.Entries[idx] == 0 && (table.Bitmaps?[idx] ?? 0) == 0) return;
        ReleaseEntry(table.Entries[idx]);
        table.Entries[idx] = 0;
        if (table.Bitmaps is not null) table.Bitmaps[idx] = 0;
        table.Dirty = true;
    }

    /// <summary>Refuses an extended entry QEMU calls invalid: a subcluster both allocated and zero, or allocated
    /// subclusters with no host cluster. QEMU's read path words it with two spaces before the parenthesis.</summary>
    private void ValidateExtendedEntry(long cluster, ulong entry, ulong bitmap, bool forWrite)
    {
        var kind = Qcow2Subclusters.ClassifyExtended(entry);
        if (kind == L2EntryKind.Compressed) return; // its bitmap is unused and ignored
        bool noHostButAllocated = kind != L2EntryKind.Normal && (bitmap & Qcow2Subclusters.AllAllocated) != 0;
        if (Qcow2Subclusters.HasConflict(bitmap) || noHostButAllocated)
        {
            long l2Offset = (long)(_l1[cluster / _l2Entries] & Qcow2Entry.OffsetMask);
            throw SignalCorruption(fatal: true,
                $"Invalid cluster entry found {(forWrite ? "" : " ")}(L2 offset: {CHex(l2Offset)}, L2 index: {CHex(cluster % _l2Entries)})");
        }
        if (kind == L2EntryKind.Normal)
        {
            long host = (long)(entry & Qcow2Entry.OffsetMask);
            if ((host & (_clusterSize - 1)) != 0) throw UnalignedClusterCorruption(cluster, entry, host, forWrite);
        }
    }

    /// <summary>How one subcluster reads: from the host (Normal), as zeros, or from the backing file.</summary>
    private static L2EntryKind SubclusterKind(ulong bitmap, int index, bool hasHost) =>
        Qcow2Subclusters.IsAllocated(bitmap, index) ? L2EntryKind.Normal
        : Qcow2Subclusters.IsZero(bitmap, index) ? (hasHost ? L2EntryKind.ZeroAllocated : L2EntryKind.ZeroUnallocated)
        : L2EntryKind.Unallocated;

    /// <summary>MapRun for extended entries: the run of subclusters, possibly across clusters, that read the same way
    /// (and, for host data, from contiguous host bytes). Caller holds the lock.</summary>
    private Run MapSubclusterRun(long offset, long maxLength, bool forWrite)
    {
        long cluster = ClusterOf(offset);
        var (entry, bitmap) = GetExtendedL2Entry(cluster);
        ValidateExtendedEntry(cluster, entry, bitmap, forWrite);
        var clusterKind = Qcow2Subclusters.ClassifyExtended(entry);
        long inCluster = offset & (_clusterSize - 1);
        if (clusterKind == L2EntryKind.Compressed)
            return new Run(L2EntryKind.Compressed, Math.Min(_clusterSize - inCluster, maxLength), -1, entry);

        bool hasHost = clusterKind == L2EntryKind.Normal;
        long host = hasHost ? (long)(entry & Qcow2Entry.OffsetMask) : 0;
        var kind = SubclusterKind(bitmap, (int)(inCluster >> SubclusterBits), hasHost);
        // Unallocated subclusters of a cluster with a host read from the backing file, but block status reports
        // the host offset: such a run must not merge with one without.
        bool hostMapped = hasHost;
        long runHost = hostMapped ? host + inCluster : -1;
        // The first subcluster (from offset to its end), then whole subclusters while they read the same way.
        long length = Math.Min(SubclusterSize - (offset & (SubclusterSize - 1)), maxLength);
        long currentCluster = cluster;
        while (length < maxLength)
        {
            long pos = offset + length;
            long c = ClusterOf(pos);
            if (c != currentCluster)
            {
                (entry, bitmap) = GetExtendedL2Entry(c);
                var k = Qcow2Subclusters.ClassifyExtended(entry);
                if (k == L2EntryKind.Compressed || Qcow2Subclusters.HasConflict(bitmap)) break;
                hasHost = k == L2EntryKind.Normal;
                if (!hasHost && (bitmap & Qcow2Subclusters.AllAllocated) != 0) break; // invalid: reported when reached
                host = hasHost ? (long)(entry & Qcow2Entry.OffsetMask) : 0;
                if (hasHost && (host & (_clusterSize - 1)) != 0) break;
                currentCluster = c;
            }
            int sc = (int)((pos & (_clusterSize - 1)) >> SubclusterBits);
            if (SubclusterKind(bitmap, sc, hasHost) != kind || hasHost != hostMapped) break;
            if (hostMapped && host + (pos & (_clusterSize - 1)) != runHost + length) break;
            length = Math.Min(length + SubclusterSize, maxLength);
        }
        return new Run(kind, length, runHost, entry);
    }

    /// <summary>Reads guest bytes [from, from + output.Length) of one cluster as they read now. Caller holds the lock.</summary>
    private void ReadClusterBytes(long cluster, ulong entry, ulong bitmap, long from, Span<byte> output)
    {
        long guestBase = cluster << _clusterBits;
        var kind = Qcow2Subclusters.ClassifyExtended(entry);
        if (kind == L2EntryKind.Compressed)
        {
            var whole = new byte[_clusterSize];
            ReadCompressedCluster(entry, whole);
            whole.AsSpan((int)from, output.Length).CopyTo(output);
            return;
        }
        long host = kind == L2EntryKind.Normal ? (long)(entry & Qcow2Entry.OffsetMask) : 0;
        long pos = from;
        while (!output.IsEmpty)
        {
            int sc = (int)(pos >> SubclusterBits);
            int n = (int)Math.Min(((long)(sc + 1) << SubclusterBits) - pos, output.Length);
            var piece = output[..n];
            switch (SubclusterKind(bitmap, sc, host != 0))
            {
                case L2EntryKind.Normal:
                    _file.Read(host + pos, piece);
                    break;
                case L2EntryKind.Unallocated:
                    long inImage = Math.Clamp(Size - (guestBase + pos), 0, n);
                    ReadFromBacking(guestBase + pos, piece[..(int)inImage]);
                    piece[(int)inImage..].Clear();
                    break;
                default:
                    piece.Clear();
                    break;
            }
            pos += n;
            output = output[n..];
        }
    }

    private void WriteSubclusters(long offset, ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
        {
            long inCluster = offset & (_clusterSize - 1);
            int n = (int)Math.Min(_clusterSize - inCluster, data.Length);
            lock (_lock)
            {
                BeforeGuestWrite();
                WriteInCluster(ClusterOf(offset), inCluster, data[..n]);
            }
            offset += n;
            data = data[n..];
        }
    }

    /// <summary>Writes bytes inside one cluster. A cluster this image owns is written in place; otherwise a new
    /// cluster is allocated. Either way only whole subclusters are written (the untouched bytes of a partially
    /// written subcluster are copied from where they read now) and marked allocated. Caller holds the lock.</summary>
    private void WriteInCluster(long cluster, long inCluster, ReadOnlySpan<byte> data)
    {
        var table = EnsureL2Table(cluster / _l2Entries);
        int idx = (int)(cluster % _l2Entries);
        ulong entry = table.Entries[idx], bitmap = table.Bitmaps![idx];
        ValidateExtendedEntry(cluster, entry, bitmap, forWrite: true);
        var kind = Qcow2Subclusters.ClassifyExtended(entry);

        if (kind == L2EntryKind.Compressed || (kind == L2EntryKind.Normal && (entry & Qcow2Entry.Copied) == 0))
        {
            // Compressed or shared with a snapshot: the whole cluster moves to a new one of its own.
            var whole = new byte[_clusterSize];
            ReadClusterBytes(cluster, entry, bitmap, 0, whole);
            data.CopyTo(whole.AsSpan((int)inCluster));
            long fresh = AllocateClusters(1);
            CheckNotHeader(fresh, "data cluster");
            CheckHostWrite(fresh, _clusterSize);
            _file.DataEvent(true, fresh, _clusterSize);
            _file.Write(fresh, whole);
            ReleaseEntry(entry);
            table.Entries[idx] = (ulong)fresh | Qcow2Entry.Copied;
            table.Bitmaps[idx] = Qcow2Subclusters.AllAllocated;
            table.Dirty = true;
            return;
        }

        int first = (int)(inCluster >> SubclusterBits);
        int last = (int)((inCluster + data.Length - 1) >> SubclusterBits);
        long spanStart = (long)first << SubclusterBits;
        long spanEnd = (long)(last + 1) << SubclusterBits;
        ReadOnlySpan<byte> bytes = data;
        if (spanStart != inCluster || spanEnd != inCluster + data.Length)
        {
            var span = new byte[spanEnd - spanStart];
            ReadClusterBytes(cluster, entry, bitmap, spanStart, span);
            data.CopyTo(span.AsSpan((int)(inCluster - spanStart)));
            bytes = span;
        }
        long host;
        if (kind == L2EntryKind.Normal)
        {
            host = (long)(entry & Qcow2Entry.OffsetMask);
        }
        else
        {
            host = AllocateClusters(1);
            CheckNotHeader(host, "data cluster");
        }
        CheckHostWrite(host + spanStart, bytes.Length);
        _file.DataEvent(true, host + spanStart, bytes.Length);
        _file.Write(host + spanStart, bytes);
        table.Entries[idx] = (ulong)host | Qcow2Entry.Copied;
        table.Bitmaps[idx] = Qcow2Subclusters.Allocate(bitmap, first, last - first + 1);
        table.Dirty = true;
    }

    /// <summary>Write-zeroes and discard on an extended image. Whole subclusters get their zero bit (whole clusters
    /// lose their host cluster when unmapping is allowed); partial subclusters get real zeros, unless they read
    /// zeros already. A discard is advisory and acts on whole clusters only, as QEMU's.</summary>
    private void ZeroOrDiscardSubclusters(long offset, long length, bool discard, bool mayUnmap)
    {
        long end = offset + length;
        while (offset < end)
        {
            long cluster = ClusterOf(offset);
            long clusterStart = cluster << _clusterBits;
            long clusterEnd = Math.Min(clusterStart + _clusterSize, Size);
            long pieceEnd = Math.Min(end, clusterEnd);
            bool whole = offset == clusterStart && pieceEnd == clusterEnd;
            if (discard)
            {
                if (whole) lock (_lock) DiscardExtendedCluster(cluster);
                offset = pieceEnd;
                continue;
            }
            // The subclusters wholly inside the piece (the image's end counts as a subcluster boundary).
            long innerStart = (offset + SubclusterSize - 1) & ~(SubclusterSize - 1);
            long innerEnd = pieceEnd == Size ? pieceEnd : pieceEnd & ~(SubclusterSize - 1);
            if (innerStart >= innerEnd)
            {
                ZeroBytes(offset, pieceEnd);
            }
            else
            {
                ZeroBytes(offset, innerStart);
                lock (_lock)
                {
                    int first = (int)((innerStart - clusterStart) >> SubclusterBits);
                    int count = (int)(((innerEnd - clusterStart + SubclusterSize - 1) >> SubclusterBits) - first);
                    ZeroSubclusters(cluster, first, count, whole, mayUnmap);
                }
                ZeroBytes(innerEnd, pieceEnd);
            }
            offset = pieceEnd;
        }
    }

    /// <summary>Writes real zeros over [from, to) inside one subcluster, unless it reads as zeros already.</summary>
    private void ZeroBytes(long from, long to)
    {
        if (from >= to) return;
        lock (_lock)
        {
            long cluster = ClusterOf(from);
            var (entry, bitmap) = GetExtendedL2Entry(cluster);
            var kind = Qcow2Subclusters.ClassifyExtended(entry);
            if (kind != L2EntryKind.Compressed)
            {
                var sub = SubclusterKind(bitmap, (int)((from & (_clusterSize - 1)) >> SubclusterBits), kind == L2EntryKind.Normal);
                if (sub is L2EntryKind.ZeroAllocated or L2EntryKind.ZeroUnallocated) return;
                if (sub == L2EntryKind.Unallocated && Backing is null) return;
            }
            BeforeGuestWrite();
            WriteInCluster(cluster, from & (_clusterSize - 1), new byte[to - from]);
        }
    }

    /// <summary>Makes subclusters [first, first+count) of a cluster read as zeros. Caller holds the lock.</summary>
    private void ZeroSubclusters(long cluster, int first, int count, bool wholeCluster, bool mayUnmap)
    {
        var (oldEntry, oldBitmap) = GetExtendedL2Entry(cluster);
        ValidateExtendedEntry(cluster, oldEntry, oldBitmap, forWrite: true);
        var kind = Qcow2Subclusters.ClassifyExtended(oldEntry);
        if (kind == L2EntryKind.Compressed && !wholeCluster)
        {
            // A compressed cluster cannot be zeroed in part: it is rewritten whole, with real zeros in the range.
            BeforeGuestWrite();
            long from = (long)first << SubclusterBits;
            long to = Math.Min((long)(first + count) << SubclusterBits, Size - (cluster << _clusterBits));
            WriteInCluster(cluster, from, new byte[to - from]);
            return;
        }
        ulong entry = oldEntry, bitmap;
        if (wholeCluster && (mayUnmap || kind != L2EntryKind.Normal || (oldEntry & Qcow2Entry.Copied) == 0))
        {
            entry = 0;
            bitmap = Qcow2Subclusters.AllZero;
        }
        else
        {
            bitmap = Qcow2Subclusters.Zero(oldBitmap, first, count);
        }
        if (entry == oldEntry && bitmap == oldBitmap) return;
        BeforeGuestWrite();
        var table = EnsureL2Table(cluster / _l2Entries);
        int idx = (int)(cluster % _l2Entries);
        if (entry != table.Entries[idx]) ReleaseEntry(table.Entries[idx]);
        table.Entries[idx] = entry;
        table.Bitmaps![idx] = bitmap;
        table.Dirty = true;
    }

    /// <summary>Discards one whole cluster as QEMU's (non-full) discard does: the host cluster goes; with a backing
    /// file every subcluster then reads as zeros, without one the zero bits are kept. Caller holds the lock.</summary>
    private void DiscardExtendedCluster(long cluster)
    {
        var (oldEntry, oldBitmap) = GetExtendedL2Entry(cluster);
        ulong bitmap = Backing is not null ? Qcow2Subclusters.AllZero : oldBitmap & Qcow2Subclusters.AllZero;
        if (oldEntry == 0 && bitmap == oldBitmap) return;
        BeforeGuestWrite();
        var table = EnsureL2Table(cluster / _l2Entries);
        int idx = (int)(cluster % _l2Entries);
        ReleaseEntry(table.Entries[idx]);
        table.Entries[idx] = 0;
        table.Bitmaps![idx] = bitmap;
        table.Dirty = true;
    }

    /// <summary>The subcluster bitmap checks of <c>qemu-img check</c>. False when the entry is not to be counted
    /// (a compressed cluster with a bitmap is not trusted, as QEMU does).</summary>
    private bool CheckSubclusterBitmap(ulong entry, ulong bitmap, int index, CheckReport report)
    {
        switch (Qcow2Subclusters.ClassifyExtended(entry))
        {
            case L2EntryKind.Compressed:
                if (bitmap == 0) return true;
                report.Messages.Add($"ERROR compressed cluster {index} with non-zero subcluster allocation bitmap, entry=0x{entry:x}");
                report.Corruptions++;
                return false;
            case L2EntryKind.Normal:
                if (Qcow2Subclusters.HasConflict(bitmap))
                {
                    report.Messages.Add($"ERROR offset={entry & Qcow2Entry.OffsetMask:x}: Allocated cluster has corrupted subcluster allocation bitmap");
                    report.Corruptions++;
                }
                return true;
            default:
                if ((bitmap & Qcow2Subclusters.AllAllocated) != 0)
                {
                    report.Messages.Add("ERROR: Unallocated cluster has non-zero subcluster allocation map");
                    report.Corruptions++;
                }
                return true;
        }
    }
}
