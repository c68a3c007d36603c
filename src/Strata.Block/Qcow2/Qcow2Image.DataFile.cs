using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// qcow2 images with an external data file (incompatible feature bit "external data file"): the qcow2 file holds
/// only metadata, and every data cluster lives in the data file at the host offset its L2 entry names. Data
/// clusters there have no refcounts in the qcow2 file, and QEMU always allocates them at the guest offset (host
/// offset == guest offset), which is what makes the data file a plain raw image of the disk when the autoclear bit
/// "raw external data" is set. With that bit this driver keeps the data file in step with every change — zero
/// writes and discards zero the raw bytes as well — so it keeps the bit set.
/// </summary>
public sealed partial class Qcow2Image
{
    /// <summary>The incompatible bit is set: data clusters are addressed in the data file.</summary>
    private readonly bool _externalData;
    /// <summary>The data file, when opened (info-style opens leave it closed and do no guest I/O).</summary>
    private HostFile? _dataFile;
    private bool _ownsDataFile;

    /// <summary>The name the header's external-data-file extension holds (null when it has none).</summary>
    public string? DataFileName => _extras.ExternalDataFile;

    /// <summary>Data clusters live in an external data file.</summary>
    public bool HasExternalDataFile => _externalData;

    /// <summary>The autoclear bit "raw external data": the data file is a valid raw image of the disk.</summary>
    public bool DataFileRaw => (_header.AutoclearFeatures & Qcow2AutoclearFeatures.RawExternalData) != 0;

    /// <summary>The external data file, when open.</summary>
    public HostFile? DataFile => _dataFile;

    /// <summary>Where data clusters are read and written: the data file, or the image file itself. An open that
    /// left the data file closed has none, and refuses rather than read the metadata file as data.</summary>
    private HostFile DataStore => _dataFile ?? (_externalData ? throw new BlockException("qcow2: the external data file is not open") : _file);

    /// <summary>Checks the header's data-file fields against each other and opens the data file, with QEMU's
    /// messages. The header's name is used as given: Debian's QEMU 7.2 (CVE-2024-4467 hardening) opens a relative
    /// name from the current directory, not from the image's folder. Called while opening.</summary>
    private void AttachDataFile(Qcow2OpenOptions options)
    {
        if (!_externalData)
        {
            if (options.DataFile is not null)
                throw new BlockException("'data-file' can only be set for images with an external data file");
            if (DataFileRaw && !options.WithoutDataFile) throw new BlockException("data-file-raw requires a data file");
            return;
        }
        if (_header.Version < 3)
            throw new ImageFormatException("External data files are only supported with compatibility level 1.1 and above");
        if (options.DataFile is null && options.WithoutDataFile) return;
        if (options.DataFile is { } given)
        {
            _dataFile = given;
            _ownsDataFile = options.OwnsDataFile;
        }
        else
        {
            string name = DataFileName ?? throw new BlockException("'data-file' is required for this image");
            _dataFile = options.OpenDataFileByName?.Invoke(name) ?? HostFile.Open(name, _file.ReadOnly);
            _ownsDataFile = options.OpenDataFileByName is null;
        }
        if (_ownsDataFile) _dataFile.SetLockClaim(options.DataFileLockClaim);
    }

    /// <summary>Host clusters for a run of guest clusters: in a data file the guest's own offset (no refcounts);
    /// otherwise newly allocated clusters of the image file. Caller holds the lock.</summary>
    private long AllocateDataClusters(long firstGuestCluster, long count) =>
        _externalData ? firstGuestCluster << _clusterBits : AllocateClusters(count);

    /// <summary>The overlap check guards the image file's metadata; the data file holds none.</summary>
    private void CheckDataWrite(long host, long length)
    {
        if (!_externalData) CheckHostWrite(host, length);
    }

    /// <summary>After whole clusters were zeroed or discarded: a raw data file must read as zeros there too, so that
    /// it stays byte-identical to the disk. Called without the lock.</summary>
    private void ZeroRawDataFile(long offset, long end)
    {
        if (!_externalData || !DataFileRaw || _dataFile is null || end <= offset) return;
        end = Math.Min(end, _dataFile.Length);
        if (end <= offset) return;
        if (_dataFile.PunchHole(offset, end - offset)) return;
        var zeros = new byte[Math.Min(end - offset, 1L << 20)];
        for (long at = offset; at < end; at += zeros.Length)
            _dataFile.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, end - at)));
    }

    /// <summary>Maps every unallocated guest cluster in [first, end) to itself in the data file, as QEMU does for a
    /// raw data file (at creation and when it grows): the qcow2 view then reads exactly what the raw file holds.
    /// Caller holds the lock.</summary>
    private void MapIdentity(long firstCluster, long endCluster)
    {
        for (long c = firstCluster; c < endCluster; c++)
        {
            var table = EnsureL2Table(c / _l2Entries);
            int idx = (int)(c % _l2Entries);
            if (table.Entries[idx] != 0) continue;
            table.Entries[idx] = (ulong)(c << _clusterBits) | Qcow2Entry.Copied;
            table.Dirty = true;
        }
    }

    /// <summary>The data file follows a resize of the disk (QEMU resizes it too; <paramref name="growOnly"/>: it is only
    /// extended); a raw one gets the new clusters mapped to themselves. Caller holds the lock.</summary>
    private void ResizeDataFile(long oldSize, long newSize, bool growOnly)
    {
        if (_dataFile is null) return;
        if (!growOnly || _dataFile.Length < newSize) _dataFile.SetLength(newSize);
        if (DataFileRaw && newSize > oldSize)
        {
            MapIdentity((oldSize + _clusterSize - 1) >> _clusterBits, (newSize + _clusterSize - 1) >> _clusterBits);
            WriteBackMetadata();
        }
    }

    /// <summary>Internal snapshots cannot share data clusters that have no refcounts: refused as QEMU does.</summary>
    private void ThrowIfSnapshotsUnsupported()
    {
        const int EOPNOTSUPP = 95;
        if (_externalData) throw new SnapshotException("Operation not supported", EOPNOTSUPP);
    }

    /// <summary>The data-file options of a new image, refused as qemu-img refuses them.</summary>
    private static void CheckDataFileOptions(Qcow2CreateOptions options)
    {
        if (options.DataFile is not null && options.Version < 3)
            throw new BlockException("External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)");
        if (options.DataFileRaw && options.DataFile is null)
            throw new BlockException("data-file-raw requires data-file");
    }

    /// <summary>A new image's header with its data file: the feature bit, the autoclear bit for a raw one, and the
    /// name extension (after the backing format, where qemu-img puts it).</summary>
    private static Qcow2Header WithDataFile(Qcow2Header header, List<Qcow2HeaderExtension> extensions, Qcow2CreateOptions options)
    {
        if (options.DataFile is null) return header;
        extensions.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.ExternalDataFile, System.Text.Encoding.UTF8.GetBytes(options.DataFile)));
        return header with
        {
            IncompatibleFeatures = header.IncompatibleFeatures | Qcow2IncompatibleFeatures.ExternalDataFile,
            AutoclearFeatures = options.DataFileRaw ? Qcow2AutoclearFeatures.RawExternalData : Qcow2AutoclearFeatures.None,
        };
    }

    /// <summary>What amend may change about the data file, refused before anything changes as qemu-img does.</summary>
    private void CheckDataFileAmend(Qcow2AmendOptions options)
    {
        if (options.DataFile is not null && !_externalData)
            throw new BlockException("data-file can only be set for images that use an external data file");
        if (options.DataFileRaw == true && !DataFileRaw)
            throw new BlockException("data-file-raw cannot be set on existing images");
    }

    /// <summary>amend -o data_file=NAME renames the data file in the header (without opening it); data_file_raw=off
    /// clears the raw bit.</summary>
    private void AmendDataFile(Qcow2AmendOptions options)
    {
        lock (_lock)
        {
            if (options.DataFile is { } name)
            {
                WriteBackMetadata();
                var exts = _extras.Extensions.Where(e => e.Type != Qcow2ExtensionType.ExternalDataFile).ToList();
                if (name.Length > 0)
                {
                    int at = exts.FindIndex(e => e.Type == Qcow2ExtensionType.BackingFormat) + 1;
                    exts.Insert(at, new Qcow2HeaderExtension(Qcow2ExtensionType.ExternalDataFile, System.Text.Encoding.UTF8.GetBytes(name)));
                }
                RewriteHeaderExtensions(exts);
            }
            if (options.DataFileRaw == false && DataFileRaw)
            {
                WriteBackMetadata();
                _header = _header with { AutoclearFeatures = _header.AutoclearFeatures & ~Qcow2AutoclearFeatures.RawExternalData };
                WriteHeaderFields();
                _file.Flush();
            }
        }
    }

    private void DisposeDataFile()
    {
        if (_ownsDataFile) _dataFile?.Dispose();
        _dataFile = null;
    }
}
