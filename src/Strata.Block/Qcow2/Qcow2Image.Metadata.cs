using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>Write-back ordering, the L1 table and header, resizing, the backing file and creation.</summary>
public sealed partial class Qcow2Image
{
    // ------------------------------------------------------------------ write-back

    private void WriteDirtyRefcountBlocks()
    {
        foreach (var (ti, block) in _refBlocks)
        {
            if (!block.Dirty) continue;
            long offset = (long)(_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask);
            CheckHostWrite(offset, _clusterSize, Qcow2MetadataKind.RefcountBlock);
            _file.DebugEvent("refblock_update_part");
            _file.Write(offset, block.Data);
            block.Dirty = false;
        }
    }

    private void WriteRefcountTable()
    {
        var raw = new byte[_refTable.Length * 8];
        for (int i = 0; i < _refTable.Length; i++) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), _refTable[i]);
        CheckHostWrite((long)_header.RefcountTableOffset, raw.Length, Qcow2MetadataKind.RefcountTable);
        _file.DebugEvent("reftable_update");
        _file.Write((long)_header.RefcountTableOffset, raw);
        _refTableDirty = false;
    }

    private bool RefcountsDirty => _refTableDirty || _refBlocks.AnyDirty;

    /// <summary>
    /// Writes cached metadata in crash-safe order: refcounts (and the refcount table), then L2 tables, then the
    /// L1 table, each step made durable before the next; finally clusters freed by the new L2 entries are
    /// released. Data was written before any of this. Caller holds the lock.
    /// </summary>
    private void WriteBackMetadata()
    {
        if (!_writable || _corrupt) return;
        bool l2Dirty = _l2Cache.AnyDirty;
        if (RefcountsDirty)
        {
            _file.Flush(); // data before the refcounts that claim it (only matters across power loss)
            WriteDirtyRefcountBlocks();
            if (_refTableDirty) WriteRefcountTable();
        }
        if (l2Dirty)
        {
            _dataFile?.Flush(); // data in the data file before the L2 entries that point at it
            _file.Flush();
            var raw = new byte[_clusterSize];
            foreach (var (offset, table) in _l2Cache)
            {
                if (!table.Dirty) continue;
                for (int i = 0; i < table.Entries.Length; i++)
                {
                    if (table.Bitmaps is null) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), table.Entries[i]);
                    else Qcow2Subclusters.WriteExtended(raw, i, table.Entries[i], table.Bitmaps[i]);
                }
                CheckHostWrite(offset, _clusterSize, Qcow2MetadataKind.ActiveL2);
                _file.DebugEvent("l2_update");
                _file.Write(offset, raw);
                table.Dirty = false;
            }
        }
        if (_l1Dirty)
        {
            _file.Flush();
            CheckHostWrite((long)_header.L1TableOffset, _l1.Length * 8L, Qcow2MetadataKind.ActiveL1);
            _file.DebugEvent("l1_update");
            WriteL1Table((long)_header.L1TableOffset, _l1);
            _l1Dirty = false;
        }
        long oldestAccess = OldestHostAccess();
        if (_pendingFrees.Any(f => f.Generation <= oldestAccess))
        {
            // Only now that no entry on disk points at them may the old clusters lose their references — and only
            // those no request still in flight may be reading or writing (the rest wait for a later write-back).
            // Each free leaves the list before its refcounts drop: an I/O error half way (loading a refcount block)
            // then leaks the rest instead of dropping the same refcounts twice on the next write-back.
            _file.Flush();
            var due = _pendingFrees.Where(f => f.Generation <= oldestAccess).ToList();
            _pendingFrees.RemoveAll(f => f.Generation <= oldestAccess);
            _compressedCursor = 0;
            foreach (var (offset, length, _) in due)
            {
                _file.DebugEvent("cluster_free");
                for (long c = ClusterOf(offset); c <= ClusterOf(offset + length - 1); c++)
                    AdjustRefcount(c, -1);
            }
            WriteDirtyRefcountBlocks();
            if (_refTableDirty) WriteRefcountTable();
        }
        _file.Flush();
    }

    /// <summary>After a shrink, as QEMU does: the freed data clusters no longer hold disk blocks (holes punched), and
    /// the file ends after its last cluster in use. Caller holds the lock; the metadata is written back.</summary>
    private void GiveBackFreedSpace(List<long> hostOffsets)
    {
        // Freeing a block can empty the block that counted it: repeat until nothing more goes.
        while (DropEmptyRefcountBlocks()) { }
        // One hole per contiguous run, as the file system keeps its extent tree smaller that way (and as QEMU does).
        var free = hostOffsets.Where(h => GetRefcount(h >> _clusterBits) == 0).Order().ToList();
        for (int i = 0; i < free.Count;)
        {
            int j = i + 1;
            while (j < free.Count && free[j] == free[j - 1] + _clusterSize) j++;
            _file.PunchHole(free[i], free[j - 1] + _clusterSize - free[i]);
            i = j;
        }
        long fileClusters = (_file.Length + _clusterSize - 1) >> _clusterBits;
        long last = fileClusters - 1;
        while (last >= 0 && GetRefcount(last) == 0) last--;
        if (last + 1 < fileClusters) _file.SetLength((last + 1) << _clusterBits);
    }

    /// <summary>QEMU's shrink_reftable: a refcount block that now counts nothing but, perhaps, itself leaves the
    /// refcount table, and its cluster is freed. The table stops naming the blocks before they are freed, so a crash
    /// in between leaks them at worst. Caller holds the lock; the metadata is written back.</summary>
    private bool DropEmptyRefcountBlocks()
    {
        var dropped = new List<long>();
        for (long ti = 0; ti < _refTable.Length; ti++)
        {
            long blockOffset = (long)(_refTable[ti] & ~Qcow2Entry.RefcountTableReservedMask);
            if (blockOffset == 0 || GetRefcountBlock(ti) is not { } block) continue;
            long blockCluster = blockOffset >> _clusterBits, first = ti * _refcountsPerBlock;
            bool empty = true;
            for (long i = 0; i < _refcountsPerBlock && empty; i++)
            {
                ulong value = RefcountCodec.Get(block.Data, i, _refcountOrder);
                empty = value == 0 || (first + i == blockCluster && value == 1);
            }
            if (!empty) continue;
            _refTable[ti] = 0;
            _refBlocks.Remove(ti);
            _overlap.RemoveRefcountBlock(blockOffset);
            dropped.Add(blockCluster);
        }
        if (dropped.Count == 0) return false;
        _file.Flush();
        WriteRefcountTable();
        _file.Flush();
        // A block that counted itself took its refcount with it; one counted elsewhere is released there.
        foreach (long cluster in dropped)
            if (GetRefcount(cluster) > 0) AdjustRefcount(cluster, -1);
        WriteDirtyRefcountBlocks();
        _file.Flush();
        return true;
    }

    private void WriteL1Table(long offset, ulong[] table)
    {
        var raw = new byte[table.Length * 8];
        for (int i = 0; i < table.Length; i++) BinaryPrimitives.WriteUInt64BigEndian(raw.AsSpan(i * 8), table[i]);
        _file.Write(offset, raw);
    }

    /// <summary>Moves the active L1 table to a larger one (zero-padded): the disk grew, or a snapshot being applied has a
    /// longer L1 table. The new table is on disk before the header points at it; the old one is freed after.</summary>
    private void GrowL1Table(long entries)
    {
        WriteBackMetadata();
        var newL1 = new ulong[entries];
        Array.Copy(_l1, newL1, _l1.Length);
        long clusters = (entries * 8 + _clusterSize - 1) >> _clusterBits;
        _file.DebugEvent("l1_grow_alloc_table");
        long newOffset = AllocateClusters(clusters);
        WriteBackMetadata();
        CheckHostWrite(newOffset, newL1.Length * 8L);
        _file.DebugEvent("l1_grow_write_table");
        WriteL1Table(newOffset, newL1);
        _file.Flush();
        _file.DebugEvent("l1_grow_activate_table");
        long oldOffset = (long)_header.L1TableOffset;
        long oldClusters = (_l1.Length * 8L + _clusterSize - 1) >> _clusterBits;
        _header = _header with { L1TableOffset = (ulong)newOffset, L1Size = (uint)entries };
        WriteHeaderFields();
        _file.Flush();
        _l1 = newL1;
        _overlap.SetActiveL1(newOffset, newL1.Length * 8L);
        if (oldOffset != 0)
            for (long c = 0; c < oldClusters; c++) AdjustRefcount((oldOffset >> _clusterBits) + c, -1);
        WriteBackMetadata();
    }

    /// <summary>Rewrites the fixed header fields in place, keeping any bytes of a longer header we do not know.</summary>
    private void WriteHeaderFields()
    {
        var bytes = (byte[])_headerRaw.Clone();
        var fresh = new byte[Math.Max(bytes.Length, Qcow2Header.V3HeaderLength)];
        _header.Write(fresh);
        fresh.AsSpan(0, Math.Min(bytes.Length, Qcow2Header.V3HeaderLength)).CopyTo(bytes);
        _file.Write(0, bytes);
        _headerRaw = bytes;
    }

    // ------------------------------------------------------------------ resize

    public override void Resize(long newSize) => ResizeTo(newSize, dataFileGrowsOnly: false);

    /// <summary>Resizes the disk. <paramref name="dataFileGrowsOnly"/>: an external data file is only extended, never
    /// cut (an adopted raw disk at creation, as QEMU's preallocation of a new image only extends it).</summary>
    private void ResizeTo(long newSize, bool dataFileGrowsOnly)
    {
        ResizeCore(newSize, dataFileGrowsOnly);
        ResumeIntentsAfterResize();
    }

    private void ResizeCore(long newSize, bool dataFileGrowsOnly)
    {
        CheckWritable();
        ThrowIfCorrupt();
        if (newSize < 0) throw new BlockException("Image size must not be negative");
        Bitmaps.CheckResizeAllowed();
        lock (_lock)
        {
            SuspendIntentsForResize();
            long oldSize = Size;
            if (newSize < oldSize)
            {
                // Free every cluster that lies wholly past the new end.
                long firstGone = (newSize + _clusterSize - 1) >> _clusterBits;
                long end = (oldSize + _clusterSize - 1) >> _clusterBits;
                var released = new List<long>();
                for (long c = firstGone; c < end; c++)
                {
                    long l1i = c / _l2Entries;
                    if (l1i >= _l1.Length || (_l1[l1i] & Qcow2Entry.OffsetMask) == 0) { c = (l1i + 1) * _l2Entries - 1; continue; }
                    var table = EnsureL2Table(l1i);
                    int idx = (int)(c % _l2Entries);
                    ulong entry = table.Entries[idx];
                    if (KindOf(entry) is L2EntryKind.Normal or L2EntryKind.ZeroAllocated)
                        released.Add((long)(entry & Qcow2Entry.OffsetMask));
                    ClearL2Slot(table, idx);
                }
                WriteBackMetadata();
                GiveBackFreedSpace(released);
                _header = _header with { Size = (ulong)newSize };
                WriteHeaderFields();
                _file.Flush();
                ResizeDataFile(oldSize, newSize, dataFileGrowsOnly);
                Bitmaps.Resized(Size);
                return;
            }
            long neededL1 = (((newSize + _clusterSize - 1) >> _clusterBits) + _l2Entries - 1) / _l2Entries;
            if (neededL1 > Qcow2Header.MaxL1Entries) throw new BlockException("Image size too large for this cluster size");
            if (neededL1 > _l1.Length) GrowL1Table(neededL1);
            _header = _header with { Size = (ulong)newSize };
            WriteHeaderFields();
            _file.Flush();
            ResizeDataFile(oldSize, newSize, dataFileGrowsOnly);
            Bitmaps.Resized(Size);
        }
    }

    // ------------------------------------------------------------------ backing file

    public override void SetBackingFile(string? backingFile, string? backingFormat)
    {
        CheckWritable();
        lock (_lock)
        {
            WriteBackMetadata();
            var exts = new List<Qcow2HeaderExtension>();
            if (backingFile is not null && backingFormat is not null)
                exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.BackingFormat, System.Text.Encoding.UTF8.GetBytes(backingFormat)));
            foreach (var e in _extras.Extensions)
                if (e.Type != Qcow2ExtensionType.BackingFormat) exts.Add(e);
            _backingFile = backingFile;
            _backingFormat = backingFile is null ? null : backingFormat;
            RewriteHeaderExtensions(exts);
        }
    }

    // ------------------------------------------------------------------ creation

    /// <summary>Creates a new, empty qcow2 v3 image the way qemu-img lays it out: header in cluster 0, refcount
    /// table in cluster 1, its first refcount block in cluster 2, then the L1 table. A half-created image is no image
    /// whatever order its writes reached the disk in, so the steps are not flushed one by one: the whole is made
    /// durable once, at the end (a backup run creates its target on the clock).</summary>
    public static Qcow2Image Create(string path, Qcow2CreateOptions options)
    {
        var (bytes, finalHeader, cs) = InitialHeader(options);
        var file = HostFile.Create(path);
        try
        {
            file.FlushEnabled = false;
            WriteInitialLayout(file, bytes, finalHeader, cs);
        }
        finally
        {
            file.Dispose();
        }
        Qcow2Image? img = null;
        try
        {
            if (options.DataFile is { } dataFile && !options.AdoptDataFile) HostFile.Create(dataFile).Dispose();
            var reopened = HostFile.Open(path, readOnly: false);
            reopened.FlushEnabled = false;
            img = Open(reopened, new Qcow2OpenOptions { DataFileLockClaim = options.DataFileLockClaim });
            img.ResizeTo(options.Size, dataFileGrowsOnly: options.AdoptDataFile);
            if (options.Encryption is { } encryption) img.SetUpEncryption(encryption);
            reopened.FlushEnabled = options.Durable;
            img.Flush();
            return img;
        }
        catch
        {
            img?.Dispose();
            System.IO.File.Delete(path);
            if (options.DataFile is { } dataFile && !options.AdoptDataFile) System.IO.File.Delete(dataFile);
            throw;
        }
    }

    private static (byte[] Bytes, Qcow2Header Header, long ClusterSize) InitialHeader(Qcow2CreateOptions options)
    {
        int bits = System.Numerics.BitOperations.Log2((uint)options.ClusterSize);
        if (options.ClusterSize < 512 || options.ClusterSize > (1 << 21) || (1 << bits) != options.ClusterSize)
            throw new BlockException("Cluster size must be a power of two between 512 and 2048k");
        if (options.Size < 0) throw new BlockException("Image size must not be negative");
        if (options.RefcountBits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
            throw new BlockException("Refcount width must be a power of two and may not exceed 64 bits");
        long cs = options.ClusterSize;
        long l2Entries = cs / Qcow2Subclusters.EntryBytes(options.ExtendedL2);
        long l1Needed = ((options.Size + cs - 1) / cs + l2Entries - 1) / l2Entries;
        if (l1Needed > Qcow2Header.MaxL1Entries || options.Size > long.MaxValue / 4)
            throw new BlockException("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
        CheckVersionOptions(options);
        CheckDataFileOptions(options);
        var header = new Qcow2Header
        {
            Version = (uint)options.Version,
            ClusterBits = bits,
            Size = 0,
            L1Size = 0,
            L1TableOffset = 0,
            RefcountTableOffset = (ulong)cs,
            RefcountTableClusters = 1,
            RefcountOrder = System.Numerics.BitOperations.Log2((uint)options.RefcountBits),
            HeaderLength = (uint)(options.Version >= 3 ? Qcow2Header.V3HeaderLength : Qcow2Header.V2HeaderLength),
            CompatibleFeatures = options.LazyRefcounts ? Qcow2CompatibleFeatures.LazyRefcounts : 0,
            CompressionType = options.CompressionType,
            IncompatibleFeatures = (options.CompressionType == Qcow2CompressionType.Zstd ? Qcow2IncompatibleFeatures.CompressionType : 0) |
                                   (options.ExtendedL2 ? Qcow2IncompatibleFeatures.ExtendedL2 : 0),
        };
        var exts = new List<Qcow2HeaderExtension>();
        if (options.BackingFile is not null && options.BackingFormat is not null)
            exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.BackingFormat, System.Text.Encoding.UTF8.GetBytes(options.BackingFormat)));
        header = WithDataFile(header, exts, options);
        if (options.Version >= 3)
            exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.FeatureNameTable, Qcow2FeatureName.EncodeTable(Qcow2FeatureName.Standard)));
        var (bytes, finalHeader) = Qcow2HeaderExtensionCodec.Build(header, exts, options.BackingFile);
        return (bytes, finalHeader, cs);
    }

    /// <summary>Formats an already open host file (blockdev-create on a file node) as a new qcow2 image;
    /// <paramref name="dataFile"/>: the open external data file it adopts (<see cref="Qcow2CreateOptions.DataFile"/>
    /// names it), whose bytes stay as they are.</summary>
    public static void Format(HostFile file, Qcow2CreateOptions options, HostFile? dataFile = null)
    {
        var (bytes, header, cs) = InitialHeader(options);
        file.SetLength(0);
        WriteInitialLayout(file, bytes, header, cs);
        using var img = Open(file, new Qcow2OpenOptions { OwnsFile = false, DataFile = dataFile, OwnsDataFile = false });
        img.ResizeTo(options.Size, dataFileGrowsOnly: true);
    }

    private static void WriteInitialLayout(HostFile file, byte[] headerBytes, Qcow2Header header, long cs)
    {
        var first = new byte[3 * cs];
        headerBytes.CopyTo(first, 0);
        BinaryPrimitives.WriteUInt64BigEndian(first.AsSpan((int)cs), (ulong)(2 * cs));
        for (int c = 0; c < 3; c++) RefcountCodec.Set(first.AsSpan((int)(2 * cs), (int)cs), c, header.RefcountOrder, 1);
        file.Write(0, first);
        file.Flush();
    }
}

/// <summary>What <c>create -f qcow2 -o …</c> may set.</summary>
public sealed record Qcow2CreateOptions
{
    public long Size { get; init; }
    public int ClusterSize { get; init; } = 65536;
    public int RefcountBits { get; init; } = 16;
    public Qcow2CompressionType CompressionType { get; init; } = Qcow2CompressionType.Deflate;
    public string? BackingFile { get; init; }
    public string? BackingFormat { get; init; }
    /// <summary>2 (compat=0.10) or 3 (compat=1.1).</summary>
    public int Version { get; init; } = 3;
    public bool LazyRefcounts { get; init; }
    /// <summary>An external data file, created anew under this name (which the header records as given).</summary>
    public string? DataFile { get; init; }
    /// <summary>The data file exists and is adopted: never created anew, cut or zeroed, only extended when the disk
    /// is larger (with <see cref="DataFileRaw"/> every cluster then maps to itself, so the disk reads what the file
    /// holds).</summary>
    public bool AdoptDataFile { get; init; }
    /// <summary>The image locks the new image's data file takes while it is open.</summary>
    public LockClaim DataFileLockClaim { get; init; } = LockClaim.None;
    /// <summary>data_file_raw=on: the data file is kept a raw image of the disk.</summary>
    public bool DataFileRaw { get; init; }
    /// <summary>128-bit L2 entries with 32 subclusters per cluster (needs version 3 and clusters of 16 KiB or more).</summary>
    public bool ExtendedL2 { get; init; }
    /// <summary>Encrypt guest data (legacy AES or LUKS), null for plain.</summary>
    public Qcow2Encryption? Encryption { get; init; }
    /// <summary>False: nothing is fsynced, not at creation and not by the returned image — for a file whose writer
    /// fsyncs it later anyway (a backup target: the job's close does), where a crash before that leaves a file that
    /// is thrown away.</summary>
    public bool Durable { get; init; } = true;
}

/// <summary>A refcount would exceed what the image's refcount width holds (QEMU: EINVAL from update_refcount).</summary>
public sealed class RefcountOverflowException(long hostOffset)
    : BlockException($"qcow2: refcount of the cluster at offset 0x{hostOffset:x} would overflow")
{
    public const int Errno = 22;
    public long HostOffset { get; } = hostOffset;
}
