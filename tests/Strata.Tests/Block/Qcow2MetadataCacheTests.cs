using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>The qcow2 metadata cache: least recently used first to go, a lookup counts as a use, and a dirty cluster
/// stays when only clean ones may go.</summary>
public class Qcow2MetadataCacheTests
{
    private sealed class Cluster : Qcow2CachedCluster;

    private static Qcow2MetadataCache<Cluster> Filled(int capacity, params long[] keys)
    {
        var cache = new Qcow2MetadataCache<Cluster>(capacity);
        foreach (long key in keys) cache.Add(key, new Cluster());
        return cache;
    }

    private static long[] Keys(Qcow2MetadataCache<Cluster> cache)
    {
        var keys = new List<long>();
        foreach (var (key, _) in cache) keys.Add(key);
        return keys.Order().ToArray();
    }

    [Fact]
    public void ALookupKeepsAClusterFromBeingTheNextToGo()
    {
        var cache = Filled(4, 1, 2, 3, 4);
        Assert.True(cache.IsFull);
        Assert.True(cache.TryGet(1, out _));
        Assert.False(cache.TryGet(5, out _));

        cache.DropLeastRecentlyUsedHalf(cleanOnly: false);
        Assert.Equal([1, 4], Keys(cache));
        Assert.False(cache.IsFull);
    }

    [Fact]
    public void OnlyCleanClustersGoWhenDirtyOnesMustStay()
    {
        var cache = Filled(4, 1, 2, 3, 4);
        cache.TryGet(1, out var one);
        cache.TryGet(2, out var two);
        one!.Dirty = true;
        two!.Dirty = true;
        Assert.True(cache.AnyDirty);

        // Clean: 3 and 4 (3 the older); half of them, at least one.
        cache.DropLeastRecentlyUsedHalf(cleanOnly: true);
        Assert.Equal([1, 2, 4], Keys(cache));
        cache.DropLeastRecentlyUsedHalf(cleanOnly: true);
        Assert.Equal([1, 2], Keys(cache));
        cache.DropLeastRecentlyUsedHalf(cleanOnly: true);
        Assert.Equal([1, 2], Keys(cache));

        // Without the restriction the least recently used go whatever their state.
        cache.DropLeastRecentlyUsedHalf(cleanOnly: false);
        Assert.Equal([2], Keys(cache));
    }
}
