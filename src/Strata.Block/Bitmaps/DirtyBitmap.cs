namespace Strata.Block.Bitmaps;

/// <summary>A bitmap operation refused, with the message QEMU gives (QMP class GenericError).</summary>
public sealed class BitmapException(string message) : BlockException(message);

/// <summary>
/// A dirty bitmap of a node: one bit per <see cref="Granularity"/> bytes of the disk, and the state QEMU keeps
/// with it (recording, busy, persistent, inconsistent, read-only, successor).
/// </summary>
public sealed class DirtyBitmap
{
    public const int MaxNameBytes = 1023;

    internal DirtyBitmap(string? name, long granularity, long diskSize, bool enabled)
    {
        Name = name;
        Granularity = granularity;
        DiskSize = diskSize;
        Enabled = enabled;
        Bits = new HierarchicalBitmap(BitCount(diskSize, granularity));
    }

    /// <summary>Null for the anonymous bitmaps jobs create (successors, copy bitmaps).</summary>
    public string? Name { get; internal set; }
    public long Granularity { get; }
    /// <summary>Creation order within the node.</summary>
    internal long Sequence { get; set; }
    public long DiskSize { get; private set; }
    public HierarchicalBitmap Bits { get; internal set; }

    /// <summary>Writes set bits (QEMU: not disabled).</summary>
    public bool Enabled { get; internal set; }
    /// <summary>In use by a job, an export or a migration: nearly every operation is refused.</summary>
    public bool Busy { get; set; }
    public bool Persistent { get; internal set; }
    /// <summary>Loaded from an image with in_use set: its bits cannot be trusted; only remove works.</summary>
    public bool Inconsistent { get; internal set; }
    /// <summary>A persistent bitmap of an image opened read-only.</summary>
    public bool ReadOnly { get; internal set; }
    /// <summary>Records writes while this bitmap is frozen by a job (QEMU's successor).</summary>
    public DirtyBitmap? Successor { get; internal set; }

    /// <summary>The successor's entry in the node's listing while it exists.</summary>
    internal InternalBitmap? SuccessorListing { get; set; }

    /// <summary>As query output reports it: enabled, or frozen with an enabled successor.</summary>
    public bool Recording => !Inconsistent && (Enabled || Successor is { Enabled: true });

    /// <summary>Dirty bytes: set bits × granularity (not clipped to the disk size, as in QEMU).</summary>
    public long CountBytes => Inconsistent ? 0 : Bits.Count * Granularity;

    /// <summary>Follows a disk resize: bits past the new end are dropped, a grown tail is clean.</summary>
    internal void Resize(long newDiskSize)
    {
        long bits = BitCount(newDiskSize, Granularity);
        if (bits != Bits.Length)
        {
            var resized = new HierarchicalBitmap(bits);
            foreach (var (start, count) in Bits.SetRuns())
                if (start < bits) resized.SetRange(start, Math.Min(count, bits - start));
            Bits = resized;
        }
        DiskSize = newDiskSize;
    }

    public static long BitCount(long diskSize, long granularity) => (diskSize + granularity - 1) / granularity;

    /// <summary>Sets the bits covering [offset, offset+length).</summary>
    public void MarkDirty(long offset, long length)
    {
        if (length <= 0 || offset >= DiskSize) return;
        long end = Math.Min(DiskSize, offset + length);
        long first = offset / Granularity;
        long last = (end - 1) / Granularity;
        Bits.SetRange(first, last - first + 1);
    }

    /// <summary>Clears the bits wholly inside [offset, offset+length).</summary>
    public void ResetBytes(long offset, long length)
    {
        long first = (offset + Granularity - 1) / Granularity;
        long endBit = Math.Min(Bits.Length, (offset + length) >= DiskSize ? Bits.Length : (offset + length) / Granularity);
        if (endBit > first) Bits.ResetRange(first, endBit - first);
    }

    /// <summary>Dirty byte ranges in [offset, offset+length), merged.</summary>
    public IEnumerable<(long Offset, long Length)> DirtyExtents(long offset = 0, long length = -1)
    {
        if (length < 0) length = DiskSize - offset;
        long end = Math.Min(DiskSize, offset + length);
        foreach (var (start, count) in Bits.SetRuns(offset / Granularity, (end + Granularity - 1) / Granularity))
        {
            long s = Math.Max(offset, start * Granularity);
            long e = Math.Min(end, (start + count) * Granularity);
            if (e > s) yield return (s, e - s);
        }
    }

    /// <summary>this |= source, at any granularity: a source bit sets every bit its byte range touches.</summary>
    internal void MergeFrom(DirtyBitmap source)
    {
        if (source.Granularity == Granularity)
        {
            Bits.Merge(source.Bits);
            return;
        }
        foreach (var (off, len) in source.DirtyExtentsUnclipped()) MarkDirty(off, len);
    }

    private IEnumerable<(long Offset, long Length)> DirtyExtentsUnclipped()
    {
        foreach (var (start, count) in Bits.SetRuns())
            yield return (start * Granularity, count * Granularity);
    }
}
