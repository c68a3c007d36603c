using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>Block status runs that cross L2 tables: with 512-byte clusters a table covers 32 KiB, so a 1 MiB image
/// has 32 of them, some never allocated. Every run answered for a large range must agree cluster by cluster with
/// the one-cluster answers, and end only where the next cluster differs (state, or a host offset out of sequence).</summary>
public class Qcow2LayerRunTests
{
    [Fact]
    public void RunsAcrossL2TablesAgreeWithEveryClustersOwnAnswer()
    {
        using var dir = new TempDir();
        const int cluster = 512;
        const long size = 1 << 20;
        using var img = Qcow2Image.Create(dir["a.qcow2"], new Qcow2CreateOptions { Size = size, ClusterSize = cluster });
        var random = new Random(7);
        // Data written in one go across table boundaries (host-contiguous), data written backwards (not contiguous),
        // zeroes over data and over nothing, all straddling the 32 KiB tables; the rest never written.
        img.Write(20 * 1024, Bytes(random, 80 * 1024));
        for (long at = 300 * 1024; at >= 200 * 1024; at -= cluster) img.Write(at, Bytes(random, cluster));
        img.WriteZeroes(60 * 1024, 40 * 1024, mayUnmap: false);
        img.WriteZeroes(500 * 1024, 100 * 1024, mayUnmap: false);
        img.Write(640 * 1024 - cluster, Bytes(random, 2 * cluster));

        var one = new LayerExtent[size / cluster];
        for (long c = 0; c < one.Length; c++) one[c] = img.GetLayerStatus(c * cluster, cluster);
        bool Continues(LayerExtent run, long c) =>
            one[c].State == run.State && one[c].Compressed == run.Compressed
            && (run.HostOffset < 0 ? one[c].HostOffset < 0 : one[c].HostOffset == run.HostOffset + (c * cluster - run.Offset));
        foreach (long limit in new[] { size, 64 * 1024, 48 * 1024 + cluster })
        {
            int runs = 0;
            for (long pos = 0; pos < size;)
            {
                var run = img.GetLayerStatus(pos, Math.Min(limit, size - pos)) with { Offset = pos };
                Assert.True(run.Length > 0 && run.Length % cluster == 0, $"run at {pos}: {run}");
                for (long c = pos / cluster; c < (pos + run.Length) / cluster; c++)
                    Assert.True(Continues(run, c), $"cluster {c} ({one[c]}) is not part of the run at {pos} ({run})");
                long end = pos + run.Length;
                if (end < size && run.Length < limit)
                    Assert.False(Continues(run, end / cluster), $"the run at {pos} ({run}) stops at {end}, but the cluster there ({one[end / cluster]}) continues it");
                pos = end;
                runs++;
            }
            if (limit == size) Assert.InRange(runs, 8, 400);
        }
    }

    private static byte[] Bytes(Random random, int length)
    {
        var b = new byte[length];
        random.NextBytes(b);
        return b;
    }
}
