using System.Diagnostics.CodeAnalysis;

namespace Strata.Block.Qcow2;

/// <summary>A metadata cluster held in memory (an L2 table, a refcount block): changed in place, written back while
/// <see cref="Dirty"/>.</summary>
internal abstract class Qcow2CachedCluster
{
    public bool Dirty;
    /// <summary>The cache's clock at the last use (what eviction orders by).</summary>
    public long LastUse;
}

/// <summary>
/// A bounded cache of metadata clusters by key (an L2 table's host offset, a refcount block's index in the refcount
/// table), least recently used first to go. The image's lock guards it; when to evict, and whether dirty clusters
/// are written back first, is the image's decision (it knows the write-back order).
/// </summary>
internal sealed class Qcow2MetadataCache<T>(int capacity) where T : Qcow2CachedCluster
{
    private readonly Dictionary<long, T> _entries = new();
    private long _clock;

    public int Count => _entries.Count;

    /// <summary>At capacity: make room before adding.</summary>
    public bool IsFull => _entries.Count >= capacity;

    public bool AnyDirty
    {
        get
        {
            foreach (var entry in _entries.Values) if (entry.Dirty) return true;
            return false;
        }
    }

    /// <summary>The cluster under <paramref name="key"/>, marked used now.</summary>
    public bool TryGet(long key, [NotNullWhen(true)] out T? entry)
    {
        if (!_entries.TryGetValue(key, out entry)) return false;
        entry.LastUse = ++_clock;
        return true;
    }

    /// <summary>Puts a cluster under <paramref name="key"/> (replacing any), marked used now.</summary>
    public void Add(long key, T entry)
    {
        entry.LastUse = ++_clock;
        _entries[key] = entry;
    }

    public bool Remove(long key) => _entries.Remove(key);

    public void Clear() => _entries.Clear();

    /// <summary>Drops the least recently used half of the clusters; <paramref name="cleanOnly"/>: of the clean ones only
    /// (at least one, if any is clean), as a dirty one must stay until it is written back.</summary>
    public void DropLeastRecentlyUsedHalf(bool cleanOnly)
    {
        var candidates = (cleanOnly ? _entries.Where(kv => !kv.Value.Dirty) : _entries).OrderBy(kv => kv.Value.LastUse).ToList();
        int count = cleanOnly ? Math.Max(1, candidates.Count / 2) : _entries.Count / 2;
        foreach (var (key, _) in candidates.Take(count)) _entries.Remove(key);
    }

    /// <summary>The clusters by key (the write-back walks them; a struct enumerator, no allocation).</summary>
    public Dictionary<long, T>.Enumerator GetEnumerator() => _entries.GetEnumerator();
}
