using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// The qcow2 format driver: version 2 and 3 read, version 3 written. Metadata is cached and written back
/// in the order data → refcounts → L2 → L1/header, with an fsync between the steps, so that whatever
/// moment a crash hits, the file on disk is consistent (at worst some clusters are leaked).
/// </summary>
public sealed partial class Qcow2Image : BlockImage
{
    private readonly HostFile _file;
    private readonly bool _openedForCheck;
    private readonly object _lock = new();
    private readonly int _clusterBits;
    private readonly long _clusterSize;
    private readonly int _l2Entries;
    /// <summary>Incompatible feature bit 4: 128-bit L2 entries with a subcluster bitmap (Qcow2Image.Subclusters.cs).</summary>
    private readonly bool _extendedL2;
    private int _refcountOrder;
    private long _refcountsPerBlock;
    private volatile bool _writable;
    private readonly bool _ownsFile;

    private Qcow2Header _header;
    private byte[] _headerRaw;
    private Qcow2HeaderExtras _extras;
    private string? _backingFile;
    private string? _backingFormat;

    private ulong[] _l1;
    private bool _l1Dirty;

    private ulong[] _refTable;
    private bool _refTableDirty;
    private bool _disposed;

    public HostFile File => _file;
    public Qcow2Header Header => _header;
    public Qcow2HeaderExtras Extras => _extras;
    public override string FormatName => "qcow2";
    public override bool ServesCachedReads => _file.ServesNoWaitReads && (_dataFile?.ServesNoWaitReads ?? true);
    /// <summary>The virtual size, rounded up to whole 512-byte sectors as QEMU sees it.</summary>
    public override long Size => ((long)_header.Size + 511) & ~511L;
    public override bool ReadOnly => !_writable;
    public override string FileName => _file.Path;
    public override string? BackingFileName => _backingFile;
    public override string? BackingFormat => _backingFormat;
    public override int ClusterSize => (int)_clusterSize;
    public override bool SupportsCompression => !_externalData;

    /// <summary>Whether a bitmap of this name is in the image's bitmap directory right now.</summary>
    public bool IsStoredBitmap(string name) => _storedBitmaps.ContainsKey(name);

    private Qcow2Image(HostFile file, Qcow2Header header, byte[] headerRaw, Qcow2HeaderExtras extras, Qcow2OpenOptions options)
    {
        _file = file;
        _header = header;
        _headerRaw = headerRaw;
        _extras = extras;
        _backingFile = extras.BackingFile;
        _backingFormat = extras.BackingFormat;
        _clusterBits = header.ClusterBits;
        _clusterSize = header.ClusterSize;
        _extendedL2 = (header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExtendedL2) != 0;
        _l2Entries = (int)(_clusterSize / Qcow2Subclusters.EntryBytes(_extendedL2));
        _refcountOrder = header.RefcountOrder;
        _refcountsPerBlock = _clusterSize * 8 / header.RefcountBits;
        _writable = !file.ReadOnly && !options.ReadOnly;
        _ownsFile = options.OwnsFile;
        _externalData = (header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExternalDataFile) != 0;
        _openedForCheck = options.ForCheck;
        _crashSafeRequested = options.CrashSafeBitmaps;
        _scheduledCheckpoints = options.ScheduledCheckpoints;
        _l2Cache = new((int)Math.Max(16, options.L2CacheBytes / _clusterSize));
        // QEMU keeps a quarter as much refcount cache as L2 cache.
        _refBlocks = new((int)Math.Max(8, options.L2CacheBytes / 4 / _clusterSize));
        _l1 = [];
        _refTable = [];
    }

    /// <summary>Opens a qcow2 image on an already-opened host file (which the image then owns).</summary>
    public static Qcow2Image Open(HostFile file, Qcow2OpenOptions? options = null)
    {
        try
        {
            return OpenCore(file, options ?? new Qcow2OpenOptions());
        }
        catch
        {
            if (options?.OwnsFile ?? true) file.Dispose();
            throw;
        }
    }

    private static Qcow2Image OpenCore(HostFile file, Qcow2OpenOptions options)
    {
        long fileLength = file.Length;
        var probe = new byte[Math.Min(fileLength, 4096)];
        file.Read(0, probe);
        var header = Qcow2Header.Parse(probe);
        var cluster0 = new byte[Math.Min(fileLength, header.ClusterSize)];
        file.Read(0, cluster0);
        var extras = Qcow2HeaderExtensionCodec.Parse(header, cluster0);
        header.ThrowIfUnsupportedFeatures(extras.Find(Qcow2ExtensionType.FeatureNameTable) is { } table ? Qcow2FeatureName.DecodeTable(table.Data) : []);
        var headerRaw = cluster0.AsSpan(0, header.WrittenLength).ToArray();

        // Each of these features has its own data path in Strata; the paths are not combined (yet), so images that
        // need two of them are refused rather than read or written wrongly.
        if (header.CryptMethod != 0 && (header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExternalDataFile) != 0)
            throw new BlockException("Encrypted qcow2 images with an external data file are not supported");
        if ((header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExtendedL2) != 0 &&
            (header.CryptMethod != 0 || (header.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExternalDataFile) != 0))
            throw new BlockException("qcow2 images with extended L2 entries and encryption or an external data file are not supported");
        if (!file.ReadOnly && !options.ForCheck)
        {
            if ((header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Corrupt) != 0)
                throw new BlockException("qcow2: Image is corrupt; cannot be opened read/write");
        }

        long l1Bytes = header.L1Size * 8L;
        if (header.L1Size > 0 && (long)header.L1TableOffset + l1Bytes > fileLength)
            throw new ImageFormatException($"L1 table (offset 0x{header.L1TableOffset:x}, {header.L1Size} entries) lies past the end of the file");
        if (header.L1Size > 0 && header.L1TableOffset == 0)
            throw new ImageFormatException("L1 table offset invalid");
        long refTableBytes = header.RefcountTableClusters * header.ClusterSize;
        if ((long)header.RefcountTableOffset + refTableBytes > fileLength)
            throw new ImageFormatException("Refcount table lies past the end of the file");

        var img = new Qcow2Image(file, header, headerRaw, extras, options);
        img.OpenEncryption(options.KeySecret);
        img._endCluster = (fileLength + header.ClusterSize - 1) / header.ClusterSize;
        var l1Raw = new byte[l1Bytes];
        file.Read((long)header.L1TableOffset, l1Raw);
        img._l1 = new ulong[header.L1Size];
        for (int i = 0; i < img._l1.Length; i++)
        {
            ulong e = BinaryPrimitives.ReadUInt64BigEndian(l1Raw.AsSpan(i * 8));
            img._l1[i] = e;
        }
        var rtRaw = new byte[refTableBytes];
        file.Read((long)header.RefcountTableOffset, rtRaw);
        img._refTable = new ulong[refTableBytes / 8];
        for (int i = 0; i < img._refTable.Length; i++)
            img._refTable[i] = BinaryPrimitives.ReadUInt64BigEndian(rtRaw.AsSpan(i * 8));
        img.RebuildOverlapIndex();
        img.InitBitmaps();
        img.LoadSnapshots();
        img.RebuildOverlapIndex();
        // After everything that can refuse the image, so that a refusal leaves no data file open.
        img.AttachDataFile(options);
        img.RepairIfDirty();
        img.StartCrashSafeTracking();
        if (!file.ReadOnly) img.ClearUnknownAutoclearBits();

        return img;
    }

    // ------------------------------------------------------------------ mapping

    private long ClusterOf(long offset) => offset >> _clusterBits;

    /// <summary>L2 entry of a guest cluster (0 when no L2 table). Caller holds the lock.</summary>
    private ulong GetL2Entry(long guestCluster) =>
        L2TableOf(guestCluster) is { } table ? table.Entries[guestCluster % _l2Entries] : 0;

    /// <summary>The L2 table that holds a guest cluster's entry (null when its L1 entry names none). Caller holds the lock.</summary>
    private L2Table? L2TableOf(long guestCluster)
    {
        long l1Index = guestCluster / _l2Entries;
        if (l1Index >= _l1.Length) return null;
        ulong l2Offset = _l1[l1Index] & Qcow2Entry.OffsetMask;
        if (l2Offset == 0) return null;
        return LoadL2((long)l2Offset, l1Index);
    }

    /// <summary>The mapping of a run of guest bytes with one state and (for data) contiguous host offsets.</summary>
    private readonly record struct Run(L2EntryKind Kind, long Length, long HostOffset, ulong Entry);

    /// <summary>Finds the run starting at <paramref name="offset"/>; <paramref name="forWrite"/> when the run is to
    /// be written (only changes the message of a corruption). Caller holds the lock.</summary>
    private Run MapRun(long offset, long maxLength, bool forWrite = false)
    {
        if (_extendedL2) return MapSubclusterRun(offset, maxLength, forWrite);
        long cluster = ClusterOf(offset);
        long inCluster = offset & (_clusterSize - 1);
        ulong entry = GetL2Entry(cluster);
        var kind = KindOf(entry);
        long host = kind is L2EntryKind.Normal or L2EntryKind.ZeroAllocated ? (long)(entry & Qcow2Entry.OffsetMask) : -1;
        if (host > 0 && (host & (_clusterSize - 1)) != 0)
            throw UnalignedClusterCorruption(cluster, entry, host, forWrite);
        long length = Math.Min(_clusterSize - inCluster, maxLength);
        if (kind == L2EntryKind.Compressed)
            return new Run(kind, length, -1, entry);
        // The table looked up once per L1 entry, not once per cluster: a 4 MiB run of a sparse incremental took 64
        // cache lookups, and walking a 1 GiB point's layer for its manifest spent a third of its 1.6 ms on them.
        long tableIndex = cluster / _l2Entries;
        var table = L2TableOf(cluster);
        while (length < maxLength)
        {
            long next = cluster + (offset + length - (cluster << _clusterBits)) / _clusterSize;
            if (next / _l2Entries != tableIndex)
            {
                tableIndex = next / _l2Entries;
                table = L2TableOf(next);
            }
            ulong e = table is null ? 0 : table.Entries[next % _l2Entries];
            var k = KindOf(e);
            if (NormalizeForRun(k) != NormalizeForRun(kind)) break;
            if (kind == L2EntryKind.Normal && (long)(e & Qcow2Entry.OffsetMask) != host + inCluster + length) break;
            length = Math.Min(length + _clusterSize, maxLength);
        }
        return new Run(kind, length, host < 0 ? -1 : host + inCluster, entry);
    }

    /// <summary>An L2 entry whose host offset is not cluster aligned: signalled as QEMU words it for the path that
    /// met it (a write into a cluster it owns, or any other lookup).</summary>
    private BlockIOException UnalignedClusterCorruption(long cluster, ulong entry, long host, bool forWrite)
    {
        if (forWrite && (entry & Qcow2Entry.Copied) != 0)
        {
            string what = KindOf(entry) == L2EntryKind.ZeroAllocated ? "Preallocated zero" : "Data";
            return SignalCorruption(fatal: true, $"{what} cluster offset {CHex(host)} unaligned (guest offset: {CHex(cluster << _clusterBits)})");
        }
        long l2Offset = (long)(_l1[cluster / _l2Entries] & Qcow2Entry.OffsetMask);
        return SignalCorruption(fatal: true,
            $"Cluster allocation offset {CHex(host)} unaligned (L2 offset: {CHex(l2Offset)}, L2 index: {CHex(cluster % _l2Entries)})");
    }

    /// <summary>A number as C's <c>%#x</c> prints it (QEMU's messages): 0x-prefixed hex, but plain 0 for zero.</summary>
    private static string CHex(long value) => value == 0 ? "0" : $"0x{value:x}";

    private static L2EntryKind NormalizeForRun(L2EntryKind k) => k == L2EntryKind.ZeroAllocated ? L2EntryKind.ZeroUnallocated : k;

    /// <summary>
    /// Before the first change to guest data: persistent bitmaps are marked in_use on disk, and autoclear bits
    /// this driver does not maintain are cleared, as the spec asks of a program that does not know them.
    /// Caller holds the lock.
    /// </summary>
    private void BeforeGuestWrite()
    {
        MarkDirtyForLazyRefcounts();
        MarkBitmapsInUse();
        ClearUnknownAutoclearBits();
    }

    /// <summary>Autoclear bits this driver does not maintain are cleared, as the spec asks of a program that does not
    /// know them — at a read-write open, as QEMU does, so `check -r` and friends leave them cleared too.</summary>
    private void ClearUnknownAutoclearBits()
    {
        var known = Qcow2AutoclearFeatures.Bitmaps | Qcow2AutoclearFeatures.RawExternalData;
        if (_intents is not null) known |= WriteIntentRecord.ValidBit;
        var unknown = _header.AutoclearFeatures & ~known;
        if (unknown == Qcow2AutoclearFeatures.None) return;
        _header = _header with { AutoclearFeatures = _header.AutoclearFeatures & known };
        WriteHeaderFields();
        _file.Flush();
    }

    // ------------------------------------------------------------------ reads

    /// <summary>The driver lock for a read or a status query. A <see cref="CachedReads"/> read that finds it taken gives
    /// up rather than wait: its holder may be writing metadata to the disk.</summary>
    private HeldLock LockForRead()
    {
        if (!CachedReads.Active) Monitor.Enter(_lock);
        else if (!Monitor.TryEnter(_lock)) CachedReads.ThrowIfActive();
        return new HeldLock(_lock);
    }

    private readonly ref struct HeldLock(object held)
    {
        public void Dispose() => Monitor.Exit(held);
    }

    [ThreadStatic] private static byte[]? t_clusterBuffer;
    [ThreadStatic] private static byte[]? t_compressedBuffer;

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        while (!buffer.IsEmpty)
        {
            Run run;
            long access;
            using (LockForRead())
            {
                run = MapRun(offset, buffer.Length);
                access = BeginHostAccess(run.Kind);
            }
            var slice = buffer[..(int)run.Length];
            try
            {
                switch (run.Kind)
                {
                    case L2EntryKind.Normal:
                        DataStore.DataEvent(false, run.HostOffset, slice.Length);
                        if (_header.CryptMethod == 0) DataStore.Read(run.HostOffset, slice);
                        else ReadDecrypted(offset, run.HostOffset, slice);
                        break;
                    case L2EntryKind.ZeroAllocated:
                    case L2EntryKind.ZeroUnallocated:
                        slice.Clear();
                        break;
                    case L2EntryKind.Unallocated:
                        ReadFromBacking(offset, slice);
                        break;
                    case L2EntryKind.Compressed:
                        // Its 2 + 4 MiB of per-thread buffers are for the block I/O threads, not every pool thread.
                        CachedReads.ThrowIfActive();
                        var cluster = t_clusterBuffer ??= new byte[Qcow2MaxCluster];
                        ReadCompressedCluster(run.Entry, cluster.AsSpan(0, (int)_clusterSize));
                        cluster.AsSpan((int)(offset & (_clusterSize - 1)), slice.Length).CopyTo(slice);
                        break;
                }
            }
            finally
            {
                EndHostAccess(access);
            }
            offset += run.Length;
            buffer = buffer[(int)run.Length..];
        }
    }

    private const int Qcow2MaxCluster = 1 << Qcow2Header.MaxClusterBits;

    private void ReadCompressedCluster(ulong entry, Span<byte> output)
    {
        var (host, sectors) = Qcow2Entry.DecodeCompressed(entry, _clusterBits);
        int length = Qcow2Entry.CompressedReadLength(host, sectors);
        if (length <= 0 || length > 2 * _clusterSize + 1024)
            throw new BlockException($"qcow2: invalid compressed cluster descriptor 0x{entry:x16}");
        var input = t_compressedBuffer is { } b && b.Length >= length ? b : (t_compressedBuffer = new byte[Math.Max(length, 2 * Qcow2MaxCluster + 1024)]);
        DataStore.Read(host, input.AsSpan(0, length));
        ClusterCompression.Decompress(_header.CompressionType, input.AsSpan(0, length), output);
    }

    // ------------------------------------------------------------------ writes

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
        ThrowIfCorrupt();
        if (_extendedL2)
        {
            WriteSubclusters(offset, data);
            return;
        }
        while (!data.IsEmpty)
        {
            long host = -1, length, access = NoHostAccess;
            Allocation? allocation = null;
            lock (_lock)
            {
                BeforeGuestWrite();
                while (true)
                {
                    var run = MapRun(offset, data.Length, forWrite: true);
                    if (run.Kind == L2EntryKind.Normal && (run.Entry & Qcow2Entry.Copied) != 0)
                    {
                        host = run.HostOffset;
                        length = run.Length;
                        CheckDataWrite(host, length);
                        access = BeginHostAccess(run.Kind);
                        break;
                    }
                    allocation = PrepareAllocation(offset, data);
                    if (allocation is not null)
                    {
                        length = allocation.Consumed;
                        break;
                    }
                    Monitor.Wait(_lock); // another writer is allocating these clusters right now
                }
            }
            if (allocation is null)
            {
                try
                {
                    DataStore.DataEvent(true, host, length);
                    if (_header.CryptMethod == 0) DataStore.Write(host, data[..(int)length]);
                    else WriteEncrypted(offset, host, data[..(int)length]);
                }
                finally
                {
                    EndHostAccess(access);
                }
            }
            else
            {
                // The data goes to its new clusters outside the lock, so writers allocating different clusters
                // proceed in parallel; the L2 entries point at it only once it is written.
                try
                {
                    DataStore.DataEvent(true, allocation.HostStart, length);
                    if (allocation.Buffer is null) DataStore.Write(allocation.HostStart, EncryptForAllocation(offset, allocation.HostStart, data[..(int)length]));
                    else DataStore.Write(allocation.HostStart, EncryptForAllocation(allocation.FirstCluster << _clusterBits, allocation.HostStart, allocation.Buffer));
                }
                catch
                {
                    lock (_lock) RollBackAllocation(allocation);
                    throw;
                }
                lock (_lock)
                {
                    CommitAllocation(allocation);
                    Monitor.PulseAll(_lock);
                }
            }
            offset += length;
            data = data[(int)length..];
        }
    }

    /// <summary>Reads what a guest cluster holds now (before it is replaced). Caller holds the lock.</summary>
    private void ReadOldCluster(long guestCluster, Span<byte> output)
    {
        ulong entry = GetL2Entry(guestCluster);
        long guestOffset = guestCluster << _clusterBits;
        switch (KindOf(entry))
        {
            case L2EntryKind.Normal:
                if (_header.CryptMethod == 0) DataStore.Read((long)(entry & Qcow2Entry.OffsetMask), output);
                else ReadDecrypted(guestOffset, (long)(entry & Qcow2Entry.OffsetMask), output);
                break;
            case L2EntryKind.Compressed:
                ReadCompressedCluster(entry, output);
                break;
            case L2EntryKind.Unallocated:
                long inImage = Math.Clamp(Size - guestOffset, 0, output.Length);
                ReadFromBacking(guestOffset, output[..(int)inImage]);
                output[(int)inImage..].Clear();
                break;
            default:
                output.Clear();
                break;
        }
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap)
    {
        ZeroOrDiscard(offset, length, discard: false, mayUnmap);
    }

    protected override void DriverDiscard(long offset, long length)
    {
        ZeroOrDiscard(offset, length, discard: true, mayUnmap: true);
    }

    private void ZeroOrDiscard(long offset, long length, bool discard, bool mayUnmap)
    {
        ThrowIfCorrupt();
        if (!discard && _header.Version < 3 && Backing is not null)
        {
            WriteZeroBuffers(offset, length);
            return;
        }
        if (_extendedL2)
        {
            ZeroOrDiscardSubclusters(offset, length, discard, mayUnmap);
            return;
        }
        long end = offset + length;
        while (offset < end)
        {
            long clusterStart = offset & ~(_clusterSize - 1);
            long clusterEnd = Math.Min(clusterStart + _clusterSize, Size);
            long pieceEnd = Math.Min(end, clusterEnd);
            bool whole = offset == clusterStart && pieceEnd == clusterEnd;
            if (!whole)
            {
                // A partial cluster: discard is advisory and does nothing; zeroing writes real zeros.
                if (!discard)
                {
                    bool alreadyZero;
                    lock (_lock)
                    {
                        var k = KindOf(GetL2Entry(ClusterOf(offset)));
                        alreadyZero = k is L2EntryKind.ZeroAllocated or L2EntryKind.ZeroUnallocated ||
                                      (k == L2EntryKind.Unallocated && Backing is null);
                    }
                    if (!alreadyZero) DriverWrite(offset, new byte[pieceEnd - offset]);
                }
                offset = pieceEnd;
                continue;
            }
            // A run of whole clusters (the image's last, short cluster counts as whole) under one lock.
            long wholeEnd = end >= Size ? Size : end & ~(_clusterSize - 1);
            lock (_lock)
            {
                long lastExclusive = (wholeEnd + _clusterSize - 1) >> _clusterBits;
                for (long c = ClusterOf(offset); c < lastExclusive; c++)
                    ZeroCluster(c, discard, mayUnmap);
            }
            ZeroRawDataFile(offset, wholeEnd);
            offset = wholeEnd;
        }
    }

    /// <summary>Makes one whole guest cluster read as zeros (or discards it), as QEMU's qcow2 driver does.
    /// Caller holds the lock.</summary>
    private void ZeroCluster(long cluster, bool discard, bool mayUnmap)
    {
        ulong old = GetL2Entry(cluster);
        var kind = KindOf(old);
        bool allocated = kind is L2EntryKind.Normal or L2EntryKind.Compressed or L2EntryKind.ZeroAllocated;
        bool keepsHost = false;
        ulong replacement;
        if (_header.Version < 3)
        {
            // Version 2 has no zero flag: QEMU unmaps (the backing file shows through a discard; zeroing over a
            // backing file writes real zeros before it gets here).
            if (!allocated) return;
            replacement = 0;
        }
        else if (discard)
        {
            if (!allocated && Backing is null) return;
            replacement = Qcow2Entry.ZeroFlag;
        }
        else if (!mayUnmap && kind == L2EntryKind.Normal && (old & Qcow2Entry.Copied) != 0)
        {
            replacement = old | Qcow2Entry.ZeroFlag;
            keepsHost = true;
        }
        else if (!mayUnmap && kind == L2EntryKind.ZeroAllocated)
        {
            return;
        }
        else
        {
            replacement = Qcow2Entry.ZeroFlag;
        }
        if (replacement == old) return;
        BeforeGuestWrite();
        var table = EnsureL2Table(cluster / _l2Entries);
        if (!keepsHost) ReleaseEntry(old);
        table.Entries[cluster % _l2Entries] = replacement;
        table.Dirty = true;
    }

    protected override void DriverWriteCompressed(long offset, ReadOnlySpan<byte> cluster)
    {
        if ((offset & (_clusterSize - 1)) != 0 || cluster.Length > _clusterSize)
            throw new BlockException("Compressed writes must cover one aligned cluster");
        if (_externalData) throw new BlockException("Operation not supported");
        ThrowIfCorrupt();
        if (_header.CryptMethod != 0) throw new BlockException("Compression is not supported with encryption");
        var padded = new byte[_clusterSize];
        cluster.CopyTo(padded);
        var compressed = ClusterCompression.Compress(_header.CompressionType, padded, (int)_clusterSize - 512);
        if (compressed is null)
        {
            DriverWrite(offset, cluster);
            return;
        }
        lock (_lock)
        {
            BeforeGuestWrite();
            long host = AllocateBytes(compressed.Length);
            CheckNotHeader(host, "compressed cluster");
            CheckHostWrite(host, compressed.Length);
            _file.Write(host, compressed);
            long guest = ClusterOf(offset);
            var table = EnsureL2Table(guest / _l2Entries);
            int idx = (int)(guest % _l2Entries);
            ReleaseEntry(table.Entries[idx]);
            table.Entries[idx] = Qcow2Entry.EncodeCompressed(host, compressed.Length, _clusterBits);
            if (table.Bitmaps is not null) table.Bitmaps[idx] = 0; // a compressed cluster has no subclusters
            table.Dirty = true;
        }
    }

    // ------------------------------------------------------------------ block status

    public override LayerExtent GetLayerStatus(long offset, long maxLength)
    {
        CheckRange(offset, 0);
        maxLength = Math.Min(maxLength, Size - offset);
        if (maxLength <= 0) return new LayerExtent(offset, 0, LayerState.Unallocated, -1);
        using (LockForRead())
        {
            var run = MapRun(offset, maxLength);
            var state = run.Kind switch
            {
                L2EntryKind.Normal or L2EntryKind.Compressed => LayerState.Data,
                L2EntryKind.ZeroAllocated or L2EntryKind.ZeroUnallocated => LayerState.Zero,
                _ => LayerState.Unallocated,
            };
            long length = run.Length;
            // (Subcluster runs already keep zero kinds and host ranges apart.)
            if (state == LayerState.Zero && !_extendedL2) length = ZeroRunLength(offset, length, run.Kind, run.HostOffset);
            bool holeInHost = false;
            if (run.Kind == L2EntryKind.Normal && LooksMetadataPreallocated())
            {
                (state, length) = SplitAtHostHole(run.HostOffset, length);
                holeInHost = state == LayerState.Zero;
            }
            if (run.Kind == L2EntryKind.Compressed)
            {
                // Merge following compressed clusters: they have no contiguous host mapping to report.
                while (length < maxLength && KindOf(GetL2Entry(ClusterOf(offset + length))) == L2EntryKind.Compressed)
                    length = Math.Min(length + _clusterSize, maxLength);
                return new LayerExtent(offset, length, state, -1, Compressed: true);
            }
            // Unallocated subclusters of an extended entry with a host cluster report it, as QEMU does.
            bool hostMapped = run.Kind is L2EntryKind.Normal or L2EntryKind.ZeroAllocated || (_extendedL2 && run.Kind == L2EntryKind.Unallocated);
            return new LayerExtent(offset, length, state, hostMapped ? run.HostOffset : -1, ZeroOverData: holeInHost);
        }
    }

    /// <summary>MapRun lets zero clusters with and without a host cluster form one run (a read need not tell them
    /// apart); block status must, as QEMU reports the host offset of the one and not of the other, and only a
    /// contiguous host range as one extent. Caller holds the lock.</summary>
    private long ZeroRunLength(long offset, long maxLength, L2EntryKind kind, long hostOffset)
    {
        long length = Math.Min(_clusterSize - (offset & (_clusterSize - 1)), maxLength);
        while (length < maxLength)
        {
            ulong entry = GetL2Entry(ClusterOf(offset + length));
            if (KindOf(entry) != kind) break;
            if (kind == L2EntryKind.ZeroAllocated && (long)(entry & Qcow2Entry.OffsetMask) != hostOffset + length) break;
            length = Math.Min(length + _clusterSize, maxLength);
        }
        return length;
    }

    // ------------------------------------------------------------------ flush and close

    protected override void DriverFlush()
    {
        if (!_writable) return;
        lock (_lock) WriteBackMetadata();
    }

    public override void Dispose()
    {
        if (_disposed) return;
        StopCrashSafeTracking();
        _disposed = true;
        try
        {
            if (_writable && !_corrupt)
                lock (_lock)
                {
                    StoreBitmapsLocked();
                    WriteBackMetadata();
                    MarkClean();
                }
            Bitmaps.Intents = null;
        }
        finally
        {
            base.Dispose();
            _cipher?.Dispose();
            if (_ownsFile) _file.Dispose();
            DisposeDataFile();
        }
    }
}
