namespace Strata.Block.Bitmaps;

/// <summary>
/// QEMU's successor mechanism: a job freezes a bitmap at its start point, an anonymous successor records the writes
/// made while it runs, and at the end the successor either replaces the bitmap (the job synchronised it: bits up to
/// the start point are in the backup) or is merged back into it (the job failed or was not to synchronise) — so no
/// write is ever lost from the bitmap.
/// </summary>
public sealed partial class BitmapSet
{
    /// <summary>Freezes a bitmap for a job: an empty successor takes over recording (QEMU's create_successor).</summary>
    public DirtyBitmap CreateSuccessor(DirtyBitmap parent)
    {
        lock (_lock)
        {
            if (parent.Successor is not null || parent.Busy)
                throw new BitmapException($"Bitmap '{parent.Name}' is currently in use by another operation and cannot be used");
            var successor = new DirtyBitmap(null, parent.Granularity, parent.DiskSize, parent.Enabled);
            parent.Successor = successor;
            parent.SuccessorListing = new InternalBitmap(successor.Granularity, () => successor.CountBytes, () => successor.Enabled) { Sequence = ++_sequence };
            _internal.Add(parent.SuccessorListing);
            parent.Enabled = false;
            parent.Busy = true;
            return successor;
        }
    }

    /// <summary>Job succeeded and the bitmap is synchronised: the successor replaces it (old bits dropped).</summary>
    public void Abdicate(DirtyBitmap parent)
    {
        lock (_lock)
        {
            var s = parent.Successor ?? throw new BitmapException("Cannot abdicate: bitmap has no successor");
            parent.Bits = s.Bits;
            EndSuccession(parent, s);
        }
    }

    /// <summary>Job failed or is not to synchronise: the successor's bits are merged back (nothing is lost).</summary>
    public void Reclaim(DirtyBitmap parent)
    {
        lock (_lock)
        {
            var s = parent.Successor ?? throw new BitmapException("Cannot reclaim: bitmap has no successor");
            parent.Bits.Merge(s.Bits);
            EndSuccession(parent, s);
        }
    }

    /// <summary>The bitmap records again as its successor did, and is free for the next job. Caller holds the lock.</summary>
    private void EndSuccession(DirtyBitmap parent, DirtyBitmap successor)
    {
        parent.Enabled = successor.Enabled;
        parent.Successor = null;
        _internal.Remove(parent.SuccessorListing!);
        parent.SuccessorListing = null;
        parent.Busy = false;
        Changed?.Invoke();
    }
}
