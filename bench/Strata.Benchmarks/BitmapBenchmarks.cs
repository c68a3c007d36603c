using BenchmarkDotNet.Attributes;
using Strata.Block.Bitmaps;

namespace Strata.Benchmarks;

/// <summary>
/// Dirty bitmap costs on a 1 TiB disk at 64 KiB granularity (16 M bits) with 0.1 %, 1 % and 50 % of it dirty:
/// marking random 64 KiB writes, iterating the dirty extents, counting, merging and clearing.
/// </summary>
[MemoryDiagnoser]
public class BitmapBenchmarks
{
    private const long Bits = (1L << 40) / 65536;

    [Params(0.001, 0.01, 0.5)]
    public double DirtyFraction { get; set; }

    private HierarchicalBitmap _bitmap = null!;
    private HierarchicalBitmap _target = null!;
    private long[] _writes = [];
    private int _next;

    [GlobalSetup]
    public void Setup()
    {
        var rng = new Random(42);
        _bitmap = new HierarchicalBitmap(Bits);
        long wanted = (long)(Bits * DirtyFraction);
        while (_bitmap.Count < wanted) _bitmap.SetRange(rng.NextInt64(Bits), 1);
        _target = new HierarchicalBitmap(Bits);
        _writes = Enumerable.Range(0, 4096).Select(_ => rng.NextInt64(Bits)).ToArray();
        Console.WriteLine($"// memory with {DirtyFraction:P1} dirty: {_bitmap.MemoryBytes} bytes; empty: {new HierarchicalBitmap(Bits).MemoryBytes} bytes");
    }

    [Benchmark(Description = "mark one random 64 KiB write")]
    public void MarkWrite() => _bitmap.SetRange(_writes[_next++ & 4095], 1);

    [Benchmark(Description = "iterate every dirty extent")]
    public long IterateExtents()
    {
        long n = 0;
        foreach (var (_, count) in _bitmap.SetRuns()) n += count;
        return n;
    }

    [Benchmark(Description = "count")]
    public long Count() => _bitmap.Count;

    [Benchmark(Description = "merge into an empty bitmap, then clear it")]
    public long MergeAndClear()
    {
        _target.Merge(_bitmap);
        long c = _target.Count;
        _target.Clear();
        return c;
    }
}
