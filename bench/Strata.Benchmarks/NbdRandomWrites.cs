using System.Diagnostics;
using Strata.Protocol.Nbd;

namespace Strata.Benchmarks;

/// <summary>
/// A guest's 4 KiB random writes over NBD, for bench/crash-safe.sh: QUEUE requests kept in flight for SECONDS,
/// offsets drawn from the first SPAN bytes of the export (a working set), each latency recorded. Prints one line:
/// writes/s, MiB/s, p50 and p99 latency in microseconds. Not a BenchmarkDotNet benchmark: it drives a daemon in
/// another process, which is what is measured.
/// Usage: Strata.Benchmarks nbd-random-writes SOCKET EXPORT SECONDS QUEUE SPAN_BYTES
/// </summary>
public static class NbdRandomWrites
{
    public static async Task<int> RunAsync(string[] args)
    {
        string socket = args[0], export = args[1];
        double seconds = double.Parse(args[2]);
        int queue = int.Parse(args[3]);
        long span = long.Parse(args[4]);
        await using var nbd = await NbdClient.ConnectUnixAsync(socket, export);
        span = Math.Min(span, nbd.Size);
        var latencies = new List<long>[queue];
        var clock = Stopwatch.StartNew();
        long until = (long)(seconds * Stopwatch.Frequency);
        var workers = Enumerable.Range(0, queue).Select(w => Task.Run(async () =>
        {
            var rng = new Random(w * 7919 + 1);
            var data = new byte[4096];
            rng.NextBytes(data);
            var mine = latencies[w] = new List<long>(1 << 16);
            while (clock.ElapsedTicks < until)
            {
                long offset = rng.NextInt64(span / 4096) * 4096;
                long t0 = Stopwatch.GetTimestamp();
                await nbd.WriteAsync(offset, data);
                mine.Add(Stopwatch.GetTimestamp() - t0);
            }
        })).ToArray();
        await Task.WhenAll(workers);
        double elapsed = clock.Elapsed.TotalSeconds;
        var all = latencies.SelectMany(l => l).Order().ToArray();
        double us(long ticks) => ticks * 1e6 / Stopwatch.Frequency;
        Console.WriteLine($"{all.Length / elapsed:F0}\t{all.Length * 4096.0 / elapsed / 1048576:F1}\t{us(all[all.Length / 2]):F0}\t{us(all[(int)(all.Length * 0.99)]):F0}");
        return 0;
    }
}
