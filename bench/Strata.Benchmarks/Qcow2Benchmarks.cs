using BenchmarkDotNet.Attributes;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Benchmarks;

/// <summary>Micro benchmarks of the qcow2 engine's hot paths: header parsing, L2 lookups, cluster allocation.</summary>
[MemoryDiagnoser]
public class Qcow2Benchmarks
{
    private string _dir = "";
    private byte[] _header = [];
    private Qcow2Image _allocated = null!;
    private byte[] _cluster = [];
    private long _next;

    [GlobalSetup]
    public void Setup()
    {
        _dir = Directory.CreateTempSubdirectory("strata-bench-").FullName;
        var h = new Qcow2Header { ClusterBits = 16, Size = 1UL << 40, L1Size = 2048, L1TableOffset = 0x30000, RefcountTableOffset = 0x10000, RefcountTableClusters = 1 };
        var exts = new[] { new Qcow2HeaderExtension(Qcow2ExtensionType.FeatureNameTable, Qcow2FeatureName.EncodeTable(Qcow2FeatureName.Standard)) };
        (_header, _) = Qcow2HeaderExtensionCodec.Build(h, exts, "base.qcow2");

        // A 1 GiB image, fully allocated, for lookups.
        string path = Path.Combine(_dir, "full.qcow2");
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 1L << 30 }))
        {
            var buf = new byte[8 << 20];
            for (long off = 0; off < 1L << 30; off += buf.Length) img.Write(off, buf);
        }
        _allocated = (Qcow2Image)ImageOpener.Open(path, "qcow2");
        _cluster = new byte[65536];
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _allocated.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    [Benchmark(Description = "parse header + extensions")]
    public int ParseHeader()
    {
        var h = Qcow2Header.Parse(_header);
        return Qcow2HeaderExtensionCodec.Parse(h, _header).Extensions.Count;
    }

    [Benchmark(Description = "block status lookup (1 cluster, cached L2)")]
    public long L2Lookup()
    {
        _next = (_next + 7919 * 65536L) % (1L << 30);
        return _allocated.GetLayerStatus(_next, 65536).HostOffset;
    }

    [Benchmark(Description = "allocate + write 64 KiB cluster (new image)", OperationsPerInvoke = 1024)]
    public void AllocateClusters()
    {
        string path = Path.Combine(_dir, "alloc.qcow2");
        using var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 1L << 30 });
        img.File.FlushEnabled = false;
        for (long i = 0; i < 1024; i++) img.Write(i * 65536, _cluster);
    }
}
