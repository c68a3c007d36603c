using System.Buffers.Binary;
using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `check -r` on images built here byte by byte: what is reported, in which order, how the refcounts are rebuilt
/// (a dirty lazy-refcounts image whose data cluster has refcount 0), compared line for line with qemu-img, and
/// the repaired image is clean for qemu-img with its data intact.
/// </summary>
public class CheckRepairOrderTests
{
    private const int ClusterBits = 16;
    private const int ClusterSize = 1 << ClusterBits;
    private const ulong Copied = 1UL << 63;

    /// <summary>
    /// A 1 MiB version 3 image: header (cluster 0), refcount table (1), refcount block (2), L1 (3), L2 (4) and two
    /// data clusters (5 filled with 0x5a, 6 with 0xa5). <paramref name="l2"/> gives the L2 entries by guest cluster;
    /// <paramref name="refcounts"/> the stored refcount of every host cluster.
    /// </summary>
    private static void BuildImage(string path, bool dirtyLazyRefcounts, (int Index, ulong Entry)[] l2, ushort[] refcounts)
    {
        var file = new byte[7 * ClusterSize];
        var h = file.AsSpan();
        BinaryPrimitives.WriteUInt32BigEndian(h, 0x514649fb);
        BinaryPrimitives.WriteUInt32BigEndian(h[4..], 3);
        BinaryPrimitives.WriteUInt32BigEndian(h[20..], ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(h[24..], 1 << 20);
        BinaryPrimitives.WriteUInt32BigEndian(h[36..], 1); // L1 entries
        BinaryPrimitives.WriteUInt64BigEndian(h[40..], 3 * ClusterSize);
        BinaryPrimitives.WriteUInt64BigEndian(h[48..], 1 * ClusterSize);
        BinaryPrimitives.WriteUInt32BigEndian(h[56..], 1);
        BinaryPrimitives.WriteUInt64BigEndian(h[72..], dirtyLazyRefcounts ? 1UL : 0); // incompatible: dirty
        BinaryPrimitives.WriteUInt64BigEndian(h[80..], dirtyLazyRefcounts ? 1UL : 0); // compatible: lazy refcounts
        BinaryPrimitives.WriteUInt32BigEndian(h[96..], 4);   // refcount order: 16 bits
        BinaryPrimitives.WriteUInt32BigEndian(h[100..], 104); // header length
        BinaryPrimitives.WriteUInt64BigEndian(h[ClusterSize..], 2 * ClusterSize);
        for (int c = 0; c < refcounts.Length; c++)
            BinaryPrimitives.WriteUInt16BigEndian(h[(2 * ClusterSize + 2 * c)..], refcounts[c]);
        BinaryPrimitives.WriteUInt64BigEndian(h[(3 * ClusterSize)..], 4 * ClusterSize | Copied);
        foreach (var (index, entry) in l2) BinaryPrimitives.WriteUInt64BigEndian(h[(4 * ClusterSize + 8 * index)..], entry);
        h.Slice(5 * ClusterSize, ClusterSize).Fill(0x5a);
        h.Slice(6 * ClusterSize, ClusterSize).Fill(0xa5);
        File.WriteAllBytes(path, file);
    }

    private static ulong Data(int cluster) => (ulong)cluster * ClusterSize | Copied;

    /// <summary>Runs `check ARGS` with qemu-img on one copy and strata on another; output, exit code and the
    /// repaired files must be the same (the header's fixed fields and every cluster after the header: QEMU also
    /// rewrites the header's length and extensions when it opens an image for writing, which says nothing about
    /// the repair).</summary>
    private static ToolResult AssertSameRepair(TempDir t, string built, params string[] args)
    {
        var (q, s, sr) = AssertSameCheckOnCopies(t, built, args);
        byte[] qb = File.ReadAllBytes(q), sb = File.ReadAllBytes(s);
        Assert.Equal(qb.AsSpan(0, 100).ToArray(), sb.AsSpan(0, 100).ToArray());
        Assert.Equal(qb.AsSpan(ClusterSize).ToArray(), sb.AsSpan(ClusterSize).ToArray());
        return sr;
    }


    [Fact]
    public void DirtyImageWithUncountedDataCluster_RebuildsRefcountsAsQemu_AndKeepsData()
    {
        using var t = new TempDir();
        string built = t["built.qcow2"];
        // Lazy refcounts: the data clusters were written, their refcounts never were.
        BuildImage(built, dirtyLazyRefcounts: true, [(0, Data(5)), (1, Data(6))], [1, 1, 1, 1, 1, 0, 0]);

        // A plain check opens the dirty image as it is: it reports the missing refcounts and changes nothing.
        string hash = Sha256(built);
        var plain = StrataCmd("img", "check", built);
        Assert.Equal(2, plain.Exit);
        Assert.Contains("ERROR cluster 5 refcount=0 reference=1", plain.Stderr);
        Assert.Equal(hash, Sha256(built));

        var repair = AssertSameRepair(t, built, "-r", "all");
        Assert.Contains("ERROR cluster 5 refcount=0 reference=1\nERROR cluster 6 refcount=0 reference=1\nRebuilding refcount structure\n", repair.Stderr);
        string s = t["s.qcow2"];
        AssertQemuCheckClean(s);
        Assert.Equal(0UL, Qcow2Edit.ReadU64(s, 72) & 1); // no longer dirty
        var read = QemuIo(s, ["read -P 0x5a 0 64k", "read -P 0xa5 64k 64k"], "qcow2");
        Assert.Equal(0, read.Exit);
        Assert.DoesNotContain("Pattern verification failed", read.Stdout);
    }

    [Fact]
    public void DirtyImage_RepairLeaksOnly_CannotRebuild_FailsAsQemu()
    {
        using var t = new TempDir();
        string built = t["built.qcow2"];
        BuildImage(built, dirtyLazyRefcounts: true, [(0, Data(5))], [1, 1, 1, 1, 1, 0, 0]);
        AssertSameRepair(t, built, "-r", "leaks");
    }

    [Fact]
    public void SharedClustersWithRefcountOne_ReportsAllErrorsBeforeRepairing_AsQemu()
    {
        using var t = new TempDir();
        string built = t["built.qcow2"];
        // Cluster 5 is referenced three times and cluster 6 twice, each with refcount 1 and OFLAG_COPIED set.
        BuildImage(built, dirtyLazyRefcounts: false,
            [(0, Data(5)), (1, Data(5)), (2, Data(5)), (3, Data(6)), (4, Data(6))], [1, 1, 1, 1, 1, 1, 1]);
        AssertSameRepair(t, built);
        var repair = AssertSameRepair(t, built, "-r", "all");
        Assert.Contains("ERROR cluster 6", repair.Stderr.Split("Repairing cluster 5")[0]); // all errors before any repair
        string s = t["s.qcow2"];
        AssertQemuCheckClean(s);
        var read = QemuIo(s, ["read -P 0x5a 0 192k", "read -P 0xa5 192k 128k"], "qcow2");
        Assert.DoesNotContain("Pattern verification failed", read.Stdout);
        Assert.Equal(0, read.Exit);
    }

    [Fact]
    public void LeakedCluster_RepairLeaks_ListsLeaksThenRepairs_AsQemu()
    {
        using var t = new TempDir();
        string built = t["built.qcow2"];
        BuildImage(built, dirtyLazyRefcounts: false, [(0, Data(5))], [1, 1, 1, 1, 1, 1, 1]);
        AssertSameRepair(t, built, "-r", "leaks");
        AssertQemuCheckClean(t["s.qcow2"]);
    }
}
