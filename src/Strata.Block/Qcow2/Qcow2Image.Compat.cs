using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Version 2 images and lazy refcounts. Strata always writes refcounts before the tables that need them, so with
/// lazy_refcounts it only keeps the dirty bit as QEMU does: set before the first change, cleared on a clean close,
/// and an image left dirty (by a crash, or by QEMU) has its refcounts repaired when opened for writing.
/// </summary>
public sealed partial class Qcow2Image
{
    private bool _dirtyBitSet;

    /// <summary>A subcluster (1/32 cluster) must be at least 512 bytes.</summary>
    public const int MinExtendedL2ClusterSize = 16384;

    /// <summary>What compat=0.10 cannot have, with qemu-img's messages.</summary>
    private static void CheckVersionOptions(Qcow2CreateOptions options)
    {
        if (options.Version is not (2 or 3)) throw new BlockException($"Unsupported qcow2 version {options.Version}");
        const string Use = "(use version=v3 or greater)";
        if (options.ExtendedL2)
        {
            if (options.Version < 3)
                throw new BlockException($"Extended L2 entries are only supported with compatibility level 1.1 and above {Use}");
            if (options.ClusterSize < MinExtendedL2ClusterSize)
                throw new BlockException($"Extended L2 entries are only supported with cluster sizes of at least {MinExtendedL2ClusterSize} bytes");
        }
        if (options.Version >= 3) return;
        if (options.LazyRefcounts)
            throw new BlockException($"Lazy refcounts only supported with compatibility level 1.1 and above {Use}");
        if (options.RefcountBits != 16)
            throw new BlockException($"Different refcount widths than 16 bits require compatibility level 1.1 or above {Use}");
        if (options.CompressionType != Qcow2CompressionType.Deflate)
            throw new BlockException($"Non-zlib compression type is only supported with compatibility level 1.1 and above {Use}");
    }

    /// <summary>With lazy refcounts, the image is marked dirty on disk before its first change. Caller holds the lock.</summary>
    private void MarkDirtyForLazyRefcounts()
    {
        if (_dirtyBitSet || (_header.CompatibleFeatures & Qcow2CompatibleFeatures.LazyRefcounts) == 0) return;
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures | Qcow2IncompatibleFeatures.Dirty };
        WriteHeaderFields();
        _file.Flush();
        _dirtyBitSet = true;
    }

    /// <summary>Clears the dirty bit once all metadata is on disk. Caller holds the lock.</summary>
    private void MarkClean()
    {
        if ((_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) == 0) return;
        _file.Flush();
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures & ~Qcow2IncompatibleFeatures.Dirty };
        WriteHeaderFields();
        _file.Flush();
        _dirtyBitSet = false;
    }

    /// <summary>An image opened for writing with the dirty bit set may have refcounts that lag behind its tables:
    /// they are recounted and repaired before anything is allocated, as QEMU does on open.</summary>
    private void RepairIfDirty()
    {
        if (!_writable || _openedForCheck || (_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) == 0) return;
        var report = Check(RepairMode.All);
        if (report.Corruptions > 0 || report.CheckErrors > 0)
            throw new BlockException("qcow2: Could not repair dirty image: the image has errors check -r all cannot fix");
    }

    /// <summary>Zeroing where version 2 has no zero flag and a backing file shows through: real zeros are written.</summary>
    private void WriteZeroBuffers(long offset, long length)
    {
        var zeros = new byte[Math.Min(length, 1L << 20)];
        while (length > 0)
        {
            int piece = (int)Math.Min(length, zeros.Length);
            DriverWrite(offset, zeros.AsSpan(0, piece));
            offset += piece;
            length -= piece;
        }
    }
}

/// <summary>What <c>qemu-img amend -o …</c> may change on a qcow2 image (null: leave as it is).</summary>
public sealed record Qcow2AmendOptions
{
    public int? Version { get; init; }
    public bool? LazyRefcounts { get; init; }
    public long? Size { get; init; }
    public int? RefcountBits { get; init; }
    /// <summary>A new name for the external data file ("" removes the name).</summary>
    public string? DataFile { get; init; }
    /// <summary>data_file_raw: may only be cleared (or kept) on an existing image.</summary>
    public bool? DataFileRaw { get; init; }
}

public sealed partial class Qcow2Image
{
    /// <summary>Applies amend options in QEMU's order: upgrade first, then lazy refcounts, refcount width and size,
    /// downgrade last (so that what version 2 cannot hold is gone before). <paramref name="progress"/> hears of the
    /// refcount width change, the one step long enough to report on.</summary>
    public void Amend(Qcow2AmendOptions options, Action<long, long>? progress = null)
    {
        CheckWritable();
        CheckDataFileAmend(options);
        int oldVersion = (int)_header.Version;
        int newVersion = options.Version ?? oldVersion;
        if (newVersion > oldVersion) ChangeVersion(newVersion);
        AmendDataFile(options);
        if (options.LazyRefcounts is { } lazy && lazy != ((_header.CompatibleFeatures & Qcow2CompatibleFeatures.LazyRefcounts) != 0))
        {
            if (lazy && newVersion < 3)
                throw new BlockException("Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)");
            lock (_lock)
            {
                WriteBackMetadata();
                MarkClean();
                _header = _header with
                {
                    CompatibleFeatures = lazy
                        ? _header.CompatibleFeatures | Qcow2CompatibleFeatures.LazyRefcounts
                        : _header.CompatibleFeatures & ~Qcow2CompatibleFeatures.LazyRefcounts,
                };
                WriteHeaderFields();
                _file.Flush();
            }
        }
        if (options.RefcountBits is { } bits && bits != _header.RefcountBits)
        {
            if (newVersion < 3 && bits != 16)
                throw new BlockException("Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)");
            ChangeRefcountWidth(bits, progress);
        }
        if (options.Size is { } size && size != Size) Resize(size);
        if (newVersion < oldVersion) Downgrade();
    }

    /// <summary>compat=0.10: refused where QEMU refuses; zero clusters become real zeros (or unallocated where
    /// nothing shows through); feature bits go.</summary>
    private void Downgrade()
    {
        if (_refcountOrder != 4) throw new BlockException("compat=0.10 requires refcount_bits=16");
        if (_externalData) throw new BlockException("Cannot downgrade an image with a data file");
        lock (_lock)
        {
            foreach (var sn in _snapshots)
            {
                // Version 2 programs ignore the extra data: a snapshot of another size or a huge VM state would be misread,
                // and zero clusters inside a snapshot cannot be expanded without rewriting its tree.
                if (sn.VmStateSize > uint.MaxValue || (long)sn.DiskSize != Size || SnapshotHasZeroClusters(sn))
                    throw new BlockException("Internal snapshots prevent downgrade of image");
            }
            WriteBackMetadata();
            MarkClean();
            var remaining = _header.IncompatibleFeatures & ~Qcow2IncompatibleFeatures.Dirty;
            if (remaining != 0)
                throw new BlockException($"Cannot downgrade an image with incompatible features 0x{(ulong)remaining:x} set");
        }
        ExpandZeroClusters();
        ChangeVersion(2);
    }

    private bool SnapshotHasZeroClusters(Qcow2Snapshot sn)
    {
        foreach (ulong l1e in ReadSnapshotL1(sn))
        {
            long l2Offset = (long)(l1e & Qcow2Entry.OffsetMask);
            if (l2Offset == 0) continue;
            if (LoadL2(l2Offset, 0).Entries.Any(e => KindOf(e) is L2EntryKind.ZeroAllocated or L2EntryKind.ZeroUnallocated))
                return true;
        }
        return false;
    }

    /// <summary>Replaces every zero cluster of the active tree: unallocated where neither a backing file nor a host
    /// cluster is involved, otherwise a cluster of real zeros.</summary>
    private void ExpandZeroClusters()
    {
        var zeroWrites = new List<long>();
        lock (_lock)
        {
            long clusters = (Size + _clusterSize - 1) >> _clusterBits;
            for (long c = 0; c < clusters; c++)
            {
                long l1Index = c / _l2Entries;
                if ((_l1[l1Index] & Qcow2Entry.OffsetMask) == 0) { c = (l1Index + 1) * _l2Entries - 1; continue; }
                var kind = KindOf(GetL2Entry(c));
                if (kind == L2EntryKind.ZeroUnallocated && Backing is null && BackingFileName is null)
                {
                    var table = EnsureL2Table(l1Index);
                    table.Entries[c % _l2Entries] = 0;
                    table.Dirty = true;
                }
                else if (kind is L2EntryKind.ZeroAllocated or L2EntryKind.ZeroUnallocated)
                {
                    zeroWrites.Add(c);
                }
            }
            WriteBackMetadata();
        }
        var zeros = new byte[_clusterSize];
        foreach (long c in zeroWrites)
        {
            long offset = c << _clusterBits;
            DriverWrite(offset, zeros.AsSpan(0, (int)Math.Min(_clusterSize, Size - offset)));
        }
        lock (_lock) WriteBackMetadata();
    }

    /// <summary>Rewrites the header as version 2 (72 bytes, no feature bits, no feature name table) or version 3.</summary>
    private void ChangeVersion(int version)
    {
        lock (_lock)
        {
            WriteBackMetadata();
            var exts = _extras.Extensions.Where(e => e.Type != Qcow2ExtensionType.FeatureNameTable).ToList();
            if (version >= 3)
                exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.FeatureNameTable, Qcow2FeatureName.EncodeTable(Qcow2FeatureName.Standard)));
            _header = _header with
            {
                Version = (uint)version,
                HeaderLength = (uint)(version >= 3 ? Qcow2Header.V3HeaderLength : Qcow2Header.V2HeaderLength),
                IncompatibleFeatures = version >= 3 ? _header.IncompatibleFeatures : 0,
                CompatibleFeatures = version >= 3 ? _header.CompatibleFeatures : 0,
                AutoclearFeatures = version >= 3 ? _header.AutoclearFeatures : 0,
            };
            RewriteHeaderExtensions(exts);
            // Version 3 wants every snapshot entry complete: rewriting the table gives each its full extra data.
            if (version >= 3 && _snapshots.Count > 0) WriteSnapshotTable(new List<Qcow2Snapshot>(_snapshots));
        }
    }
}
