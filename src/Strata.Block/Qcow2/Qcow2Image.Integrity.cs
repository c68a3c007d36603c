using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Metadata integrity, as QEMU's qcow2 driver guards it: every write to the host file is first tested against the
/// metadata index (<see cref="Qcow2OverlapCheck"/>), and corruption found on the way — a write about to land on
/// metadata, a table or cluster offset that cannot be right — is signalled: on a writable image the corrupt bit is
/// set in the header and no further change reaches the file (the request and all later writes fail), on a
/// read-only one the request fails and the image stays as it is.
/// </summary>
public sealed partial class Qcow2Image
{
    private Qcow2OverlapCheck _overlap = null!;
    /// <summary>A fatal corruption was signalled: nothing more is written to the file.</summary>
    private volatile bool _corrupt;
    private bool _corruptionSignalled;

    private const int Eio = 5;
    private const int Enomedium = 123;

    /// <summary>True once a corruption marked the image corrupt (later writes are refused).</summary>
    public bool MarkedCorrupt => _corrupt;

    /// <summary>Rebuilds the metadata index from the tables in memory (on open and after a table moved). Internal
    /// snapshots' table and L1 tables are part of it (rebuilt whenever the snapshot table changes).
    /// Caller holds the lock (or is opening the image).</summary>
    private void RebuildOverlapIndex()
    {
        _overlap ??= new Qcow2OverlapCheck(_clusterBits);
        _overlap.SetActiveL1((long)_header.L1TableOffset, _l1.Length * 8L);
        _overlap.SetRefcountTable((long)_header.RefcountTableOffset, _refTable.Length * 8L);
        _overlap.SetBitmapDirectory(_bitmapDirectory.Offset, _bitmapDirectory.Size);
        _overlap.ClearL2Tables();
        foreach (var e in _l1) _overlap.AddL2Table((long)(e & Qcow2Entry.OffsetMask));
        _overlap.ClearRefcountBlocks();
        foreach (var e in _refTable) _overlap.AddRefcountBlock((long)(e & ~Qcow2Entry.RefcountTableReservedMask));
        _overlap.SetSnapshotTable((long)_header.SnapshotsOffset, _snapshotsSize);
        _overlap.SetInactiveL1Tables(_snapshots.Select(sn => ((long)sn.L1TableOffset, sn.L1Size * 8L)));
    }

    /// <summary>Refuses a write to the host file that would land on metadata other than <paramref name="ignore"/>
    /// (the structure being written): the image is marked corrupt and the request fails with EIO. Caller holds the
    /// lock.</summary>
    private void CheckHostWrite(long offset, long length, Qcow2MetadataKind ignore = Qcow2MetadataKind.None)
    {
        var hit = _overlap.Find(offset, length, ignore);
        if (hit == Qcow2MetadataKind.None) return;
        throw SignalCorruption(fatal: true, $"Preventing invalid write on metadata (overlaps with {Qcow2OverlapCheck.Describe(hit)})");
    }

    /// <summary>An allocator handed out cluster 0 (the header) for a new structure: only a broken refcount
    /// structure does that. Caller holds the lock.</summary>
    private void CheckNotHeader(long hostOffset, string what)
    {
        if (hostOffset == 0)
            throw SignalCorruption(fatal: true, $"Preventing invalid allocation of {what} at offset 0");
    }

    /// <summary>Reports a corruption as QEMU does (once, on stderr) and, when fatal and the image writable, marks
    /// it corrupt on disk and stops all further writes. Returns the error the request fails with.</summary>
    private BlockIOException SignalCorruption(bool fatal, string message)
    {
        // Not from a read served from memory: marking the image would write, and a half-done mark (the flag set,
        // the header not written) would keep the corrupt bit off the disk for good. The blocking retry signals it.
        CachedReads.ThrowIfActive();
        fatal &= _writable;
        bool suppress = _corruptionSignalled && (!fatal || _corrupt);
        if (!suppress)
        {
            Console.Error.WriteLine(fatal
                ? $"qcow2: Marking image as corrupt: {message}; further corruption events will be suppressed"
                : $"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be suppressed");
        }
        _corruptionSignalled = true;
        if (fatal && !_corrupt)
        {
            _corrupt = true;
            MarkCorruptOnDisk();
        }
        return new BlockIOException(BlockIOException.Describe(Eio), Eio);
    }

    /// <summary>Sets the corrupt bit in the header's incompatible features (nothing else of the header changes).</summary>
    private void MarkCorruptOnDisk()
    {
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures | Qcow2IncompatibleFeatures.Corrupt };
        if (_header.Version < 3) return;
        var field = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(field, (ulong)_header.IncompatibleFeatures);
        try
        {
            _file.Write(Qcow2Header.IncompatibleFeaturesOffset, field);
            _file.Flush();
            field.CopyTo(_headerRaw.AsSpan(Qcow2Header.IncompatibleFeaturesOffset));
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            // The request fails anyway; the image stays closed to writes in memory.
        }
    }

    /// <summary>After a fatal corruption every change is refused, as QEMU's driver is gone from the node.</summary>
    private void ThrowIfCorrupt()
    {
        if (_corrupt) throw new BlockIOException("No medium found", Enomedium);
    }
}
