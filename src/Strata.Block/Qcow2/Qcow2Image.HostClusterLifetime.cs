using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>When a host cluster an L2 entry stopped pointing at may be freed: after the new entry is on disk, and
/// once no request that mapped the old entry is still reading or writing it.</summary>
public sealed partial class Qcow2Image
{
    /// <summary>Host ranges released by changed L2 entries, freed at a later write-back (see below).</summary>
    private readonly List<(long Offset, long Length, long Generation)> _pendingFrees = new();

    // Reads and in-place writes map a run under the lock and move the data outside it. A discard (or a rewrite of a
    // compressed or shared cluster) can meanwhile drop the mapping and, at the next write-back, free the host cluster
    // for a new allocation: the old request would then read, or write into, another guest cluster's data. So every
    // release is stamped with a generation, every access outside the lock registers the generation it mapped in, and
    // a cluster is freed only once no access that mapped before its release is still going.

    private const long NoHostAccess = -1;
    private long _mapGeneration;
    private readonly Dictionary<long, int> _hostAccesses = new();
    /// <summary>Guards <see cref="_hostAccesses"/> alone and is never held across I/O, so that ending an access never
    /// waits behind the driver lock's holder writing metadata (a read served from memory ends its access on a thread
    /// that must not wait). Taken inside the driver lock, never the other way round.</summary>
    private readonly object _hostAccessLock = new();

    /// <summary>Registers an access to the host clusters just mapped. Caller holds the lock.</summary>
    private long BeginHostAccess(L2EntryKind kind)
    {
        if (kind is not (L2EntryKind.Normal or L2EntryKind.Compressed)) return NoHostAccess;
        long generation = _mapGeneration;
        lock (_hostAccessLock) _hostAccesses[generation] = _hostAccesses.GetValueOrDefault(generation) + 1;
        return generation;
    }

    private void EndHostAccess(long generation)
    {
        if (generation == NoHostAccess) return;
        lock (_hostAccessLock)
        {
            if (--_hostAccesses[generation] == 0) _hostAccesses.Remove(generation);
        }
    }

    /// <summary>The oldest generation an access still in flight mapped in (long.MaxValue when none). Caller holds the
    /// lock, so no access can begin meanwhile; one may end, which only makes the answer err on the safe side.</summary>
    private long OldestHostAccess()
    {
        long oldest = long.MaxValue;
        lock (_hostAccessLock)
            foreach (var g in _hostAccesses.Keys) if (g < oldest) oldest = g;
        return oldest;
    }

    /// <summary>Schedules the host storage an old L2 entry referenced to be freed once the new entry is on disk and
    /// no request that mapped the old entry is still using it.</summary>
    private void ReleaseEntry(ulong entry)
    {
        switch (KindOf(entry))
        {
            case L2EntryKind.Normal:
            case L2EntryKind.ZeroAllocated:
                if (_externalData) break; // data-file clusters have no refcounts to drop
                _pendingFrees.Add(((long)(entry & Qcow2Entry.OffsetMask), _clusterSize, ++_mapGeneration));
                break;
            case L2EntryKind.Compressed:
                var (host, sectors) = Qcow2Entry.DecodeCompressed(entry, _clusterBits);
                _pendingFrees.Add((host, Qcow2Entry.CompressedReadLength(host, sectors), ++_mapGeneration));
                break;
        }
    }
}
