using System.Buffers.Binary;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>
/// Many threads at once on one qcow2 image — writers, readers, discards, zero writes and flushes — against a model.
/// Every cluster written holds a pattern naming its own cluster and a version, so a read that returns another
/// cluster's bytes (a host cluster freed by a discard and reused by an allocation while the read was still on it)
/// or a torn cluster is caught the moment it happens; at the end the image must equal the model exactly and check
/// clean. Readers race discards and zero writes of the very clusters they read on purpose: that is the window.
/// </summary>
public class Qcow2ConcurrencyModelTests
{
    private const int Threads = 6;

    public static TheoryData<int, int> Cases => new()
    {
        { 4096, 1 },
        { 65536, 2 },
        { 512, 3 },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void ConcurrentOperationsKeepEveryClusterItsOwn(int clusterSize, int seed)
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        const int clusters = 96; // few clusters: discards and allocations reuse the same host clusters constantly
        long size = (long)clusters * clusterSize;
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, ClusterSize = clusterSize }).Dispose();
        var model = new Cluster[clusters];
        var locks = Enumerable.Range(0, clusters).Select(_ => new ClusterLock()).ToArray();
        var failures = new List<string>();
        long operations = 0;

        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            // Hold some reads between mapping and reading for a moment: the window in which a discard, a flush and
            // a new allocation could hand their host cluster to another guest cluster.
            int held = 0;
            img.File.BeforeDataIo = (write, _, _) =>
            {
                if (!write && Interlocked.Increment(ref held) % 2 == 0) Thread.Sleep(1);
            };
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(4);
            var threads = Enumerable.Range(0, Threads).Select(t => new Thread(() =>
            {
                var rng = new Random(seed * 100 + t);
                var buffer = new byte[4 * clusterSize];
                try
                {
                    for (int op = 0; op < 4000 && DateTime.UtcNow < deadline && failures.Count == 0; op++)
                    {
                        int first = rng.Next(clusters);
                        int count = Math.Min(clusters - first, 1 + rng.Next(4));
                        var span = buffer.AsSpan(0, count * clusterSize);
                        switch (rng.Next(10))
                        {
                            case 0 or 1 or 2:
                                // A write: exclusive against readers and other changes of these clusters.
                                using (Take(locks, first, count, change: true, exclusive: true))
                                {
                                    for (int i = 0; i < count; i++)
                                    {
                                        int v = model[first + i].Version + 1;
                                        model[first + i] = new Cluster(v, Zero: false);
                                        Fill(span.Slice(i * clusterSize, clusterSize), first + i, v);
                                    }
                                    img.Write((long)first * clusterSize, span);
                                }
                                break;
                            case 3:
                                // Discards and zero writes change the clusters but let readers in: a reader may see
                                // the old data or zeros, never anything else.
                                using (Take(locks, first, count, change: true, exclusive: false))
                                {
                                    img.Discard((long)first * clusterSize, count * clusterSize);
                                    for (int i = 0; i < count; i++) model[first + i] = new Cluster(model[first + i].Version, Zero: true);
                                }
                                break;
                            case 4:
                                using (Take(locks, first, count, change: true, exclusive: false))
                                {
                                    img.WriteZeroes((long)first * clusterSize, count * clusterSize, mayUnmap: rng.Next(2) == 0);
                                    for (int i = 0; i < count; i++) model[first + i] = new Cluster(model[first + i].Version, Zero: true);
                                }
                                break;
                            case 5:
                                img.Flush();
                                break;
                            default:
                                using (Take(locks, first, count, change: false, exclusive: false))
                                {
                                    img.Read((long)first * clusterSize, span);
                                    for (int i = 0; i < count; i++)
                                        if (Check(span.Slice(i * clusterSize, clusterSize), first + i) is { } problem)
                                            lock (failures) failures.Add($"read of cluster {first + i}: {problem}");
                                }
                                break;
                        }
                        Interlocked.Increment(ref operations);
                    }
                }
                catch (Exception e)
                {
                    lock (failures) failures.Add(e.ToString());
                }
            })).ToList();
            threads.ForEach(t => t.Start());
            threads.ForEach(t => t.Join());
            Assert.True(failures.Count == 0, string.Join("\n", failures.Take(5)));
            Assert.True(operations > 1000, $"only {operations} operations ran");
            AssertMatchesModel(img, model, clusterSize);
        }

        using var reopened = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true);
        AssertMatchesModel(reopened, model, clusterSize);
        var report = reopened.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    private readonly record struct Cluster(int Version, bool Zero);

    /// <summary>Every 8 bytes: the cluster's index, its version and the word's position — so a cluster that is
    /// someone else's, or half of one version and half of another, never passes.</summary>
    private static void Fill(Span<byte> cluster, int index, int version)
    {
        for (int w = 0; w < cluster.Length / 8; w++)
            BinaryPrimitives.WriteUInt64LittleEndian(cluster[(w * 8)..], Word(index, version, w));
    }

    private static ulong Word(int index, int version, int w) => ((ulong)(uint)index << 40) | ((ulong)(uint)version << 16) | (uint)(w & 0xffff);

    private static string? Check(ReadOnlySpan<byte> cluster, int index)
    {
        if (!cluster.ContainsAnyExcept((byte)0)) return null;
        ulong first = BinaryPrimitives.ReadUInt64LittleEndian(cluster);
        int owner = (int)(first >> 40), version = (int)((first >> 16) & 0xffffff);
        if (owner != index) return $"holds cluster {owner}'s data (version {version})";
        for (int w = 0; w < cluster.Length / 8; w++)
            if (BinaryPrimitives.ReadUInt64LittleEndian(cluster[(w * 8)..]) != Word(index, version, w))
                return $"torn at byte {w * 8} (version {version})";
        return null;
    }

    private static void AssertMatchesModel(BlockImage img, Cluster[] model, int clusterSize)
    {
        var expected = new byte[clusterSize];
        var actual = new byte[clusterSize];
        for (int c = 0; c < model.Length; c++)
        {
            if (model[c].Zero || model[c].Version == 0) expected.AsSpan().Clear();
            else Fill(expected, c, model[c].Version);
            img.Read((long)c * clusterSize, actual);
            Assert.True(expected.AsSpan().SequenceEqual(actual), $"cluster {c}: expected {(model[c].Zero ? "zeros" : $"version {model[c].Version}")}, got {Check(actual, c) ?? "another version"}");
        }
    }

    /// <summary>Per-cluster locks of the test (not of the driver): changes of one cluster are ordered, so the model is
    /// exact; writes also keep readers out, since a read racing a write may legitimately see a mix.</summary>
    private sealed class ClusterLock
    {
        public readonly object Change = new();
        public readonly ReaderWriterLockSlim Data = new(LockRecursionPolicy.NoRecursion);
    }

    private static IDisposable Take(ClusterLock[] locks, int first, int count, bool change, bool exclusive)
    {
        // Always in ascending order: no deadlock between threads taking overlapping runs.
        var taken = new List<Action>();
        for (int i = first; i < first + count; i++)
        {
            var l = locks[i];
            if (change)
            {
                Monitor.Enter(l.Change);
                taken.Add(() => Monitor.Exit(l.Change));
            }
            if (exclusive)
            {
                l.Data.EnterWriteLock();
                taken.Add(l.Data.ExitWriteLock);
            }
            else if (!change)
            {
                l.Data.EnterReadLock();
                taken.Add(l.Data.ExitReadLock);
            }
        }
        return new Release(taken);
    }

    private sealed class Release(List<Action> taken) : IDisposable
    {
        public void Dispose()
        {
            for (int i = taken.Count - 1; i >= 0; i--) taken[i]();
        }
    }
}
