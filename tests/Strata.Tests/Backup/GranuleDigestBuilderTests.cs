using Strata.Backup;
using Strata.Formats.Backup;

namespace Strata.Tests.Backup;

/// <summary>The carry-over: a point's digests built from its own layer over its parent's must equal the digests of the
/// whole disk as the point reads, hashed from scratch (a byte-array model of the disk here).</summary>
public class GranuleDigestBuilderTests
{
    private const int G = 65536;

    /// <summary>The digests of a whole disk, hashed granule by granule.</summary>
    private static GranuleDigests Model(byte[] disk, long granularity = G)
    {
        var d = new GranuleDigests(disk.Length, granularity);
        for (int i = 0; i < d.Count; i++) d.Set(i, GranuleDigests.Hash(disk.AsSpan((int)d.OffsetOf(i), d.LengthOf(i))));
        return d;
    }

    private static byte[] Random(int size, int seed)
    {
        var b = new byte[size];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Fact]
    public void AFullHashesItsDataAndGivesZeroAndUnallocatedRangesTheZeroDigest()
    {
        var disk = new byte[8 * G];
        Random(2 * G, 1).CopyTo(disk, G);
        Random(G / 2, 2).CopyTo(disk, 5 * G);
        var b = new GranuleDigestBuilder(disk.Length, G, parent: null);
        b.Unallocated(0, G);
        b.Data(G, disk.AsSpan(G, 2 * G));
        b.Zero(3 * G, 2 * G);
        // Half a granule of data, half of it unallocated (zeros in a full).
        b.Data(5 * G, disk.AsSpan(5 * G, G / 2));
        b.Unallocated(5 * G + G / 2, G / 2 + 2 * G);
        Assert.Empty(b.NeedsChain);
        var built = b.Finish();
        Assert.Empty(built.Differences(Model(disk)));
    }

    [Fact]
    public void AnIncrementalCarriesTheParentsDigestsOverAndRehashesOnlyItsLayer()
    {
        var before = Random(16 * G + 4096, 3);
        var parent = Model(before);
        var after = (byte[])before.Clone();
        Random(G, 4).CopyTo(after, 2 * G);            // a granule rewritten
        Array.Clear(after, 7 * G, 2 * G);             // two granules zeroed
        Random(4096, 5).CopyTo(after, 16 * G);        // the short last granule rewritten
        var b = new GranuleDigestBuilder(after.Length, G, parent);
        b.Unallocated(0, 2 * G);
        b.Data(2 * G, after.AsSpan(2 * G, G));
        b.Unallocated(3 * G, 4 * G);
        b.Zero(7 * G, 2 * G);
        b.Unallocated(9 * G, 7 * G);
        b.Data(16 * G, after.AsSpan(16 * G, 4096));
        var built = b.Finish();
        Assert.Empty(built.Differences(Model(after)));
        Assert.Equal([2, 7, 8, 16], built.Differences(parent));
    }

    [Fact]
    public void DataArrivingInPiecesThatSplitGranulesHashesTheSame()
    {
        var disk = Random(4 * G, 6);
        var b = new GranuleDigestBuilder(disk.Length, G, parent: null);
        int[] cuts = [0, 1000, G, G + 5, 3 * G - 7, 4 * G];
        for (int i = 0; i + 1 < cuts.Length; i++) b.Data(cuts[i], disk.AsSpan(cuts[i], cuts[i + 1] - cuts[i]));
        Assert.Empty(b.Finish().Differences(Model(disk)));
    }

    [Fact]
    public void AGranulePartlyBelowTheLayerIsHashedFromTheChain()
    {
        // Granules of 128 KiB over a layer written in 64 KiB clusters: granule 0 is half in the layer, half below.
        const int Big = 2 * G;
        var before = Random(4 * Big, 7);
        var after = (byte[])before.Clone();
        Random(G, 8).CopyTo(after, 0);
        var parent = Model(before, Big);
        var b = new GranuleDigestBuilder(after.Length, Big, parent);
        b.Data(0, after.AsSpan(0, G));
        b.Unallocated(G, after.Length - G);
        Assert.Equal([0], b.NeedsChain);
        var reads = new List<long>();
        var built = b.Finish((offset, span) => { reads.Add(offset); after.AsSpan((int)offset, span.Length).CopyTo(span); });
        Assert.Equal([0L], reads);
        Assert.Empty(built.Differences(Model(after, Big)));
    }

    [Fact]
    public void AGranuleNeedingTheChainCannotFinishWithoutIt()
    {
        var parent = Model(new byte[2 * 2 * G], 2 * G);
        var b = new GranuleDigestBuilder(4 * G, 2 * G, parent);
        b.Zero(0, G);
        b.Unallocated(G, 3 * G);
        Assert.Throws<InvalidOperationException>(() => b.Finish());
    }

    [Fact]
    public void RangesOutOfOrderOrShortOfTheEndAreRefused()
    {
        var b = new GranuleDigestBuilder(4 * G, G, parent: null);
        b.Zero(0, G);
        Assert.Throws<InvalidOperationException>(() => b.Zero(2 * G, G));
        Assert.Throws<InvalidOperationException>(() => b.Zero(G, 4 * G));
        Assert.Throws<InvalidOperationException>(() => b.Finish());
    }

    [Fact]
    public void AWholeGranuleGivenByItsSha256GetsTheDigestItsBytesHashTo()
    {
        // How a sparse incremental's pieces arrive: one granule each, hashed once for the manifest's piece record.
        var before = Random(6 * G + 4096, 6);
        var after = (byte[])before.Clone();
        Random(G, 7).CopyTo(after, G);
        Random(G, 8).CopyTo(after, 4 * G);
        Random(4096, 9).CopyTo(after, 6 * G);
        var b = new GranuleDigestBuilder(after.Length, G, Model(before));
        b.Unallocated(0, G);
        Assert.True(b.IsWholeGranule(G, G));
        b.WholeGranule(G, G, System.Security.Cryptography.SHA256.HashData(after.AsSpan(G, G)));
        b.Unallocated(2 * G, 2 * G);
        b.WholeGranule(4 * G, G, System.Security.Cryptography.SHA256.HashData(after.AsSpan(4 * G, G)));
        b.Unallocated(5 * G, G);
        // The short last granule is whole at its own length.
        Assert.True(b.IsWholeGranule(6 * G, 4096));
        b.WholeGranule(6 * G, 4096, System.Security.Cryptography.SHA256.HashData(after.AsSpan(6 * G, 4096)));
        Assert.Empty(b.Finish().Differences(Model(after)));
    }

    [Fact]
    public void OnlyTheNextGranuleWholeIsTakenByItsSha256()
    {
        var b = new GranuleDigestBuilder(4 * G, G, parent: null);
        Assert.False(b.IsWholeGranule(G, G));              // not the next range
        Assert.False(b.IsWholeGranule(0, 2 * G));          // two granules
        Assert.False(b.IsWholeGranule(0, G / 2));          // half of one
        b.Data(0, new byte[G / 2]);
        Assert.False(b.IsWholeGranule(G / 2, G));          // unaligned, inside a granule under construction
        Assert.Throws<InvalidOperationException>(() => b.WholeGranule(G / 2, G, new byte[32]));
        b.Zero(G / 2, G / 2);
        Assert.True(b.IsWholeGranule(G, G));
        Assert.Throws<ArgumentException>(() => b.WholeGranule(G, G, new byte[16]));   // not a SHA-256
    }

    [Fact]
    public void AParentOfAnotherGeometryIsRefused()
    {
        Assert.Throws<ArgumentException>(() => new GranuleDigestBuilder(4 * G, G, new GranuleDigests(8 * G, G)));
        Assert.Throws<ArgumentException>(() => new GranuleDigestBuilder(4 * G, G, new GranuleDigests(4 * G, 2 * G)));
    }
}
