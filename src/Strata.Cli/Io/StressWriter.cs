using System.Buffers.Binary;
using Strata.Block;

namespace Strata.Cli.Io;

/// <summary>
/// A deterministic stream of writes for crash tests: write number <c>n</c> stamps every 8 bytes of its range
/// with <c>n</c>, so after a crash the content of each sector names the write that produced it. After each
/// flush it prints <c>flushed N</c>: every write up to N is durable.
/// </summary>
internal static class StressWriter
{
    public readonly record struct PlannedWrite(long Sequence, long Offset, int Length, bool Zero);

    /// <summary>The writes a seed produces, for an image of <paramref name="imageSize"/> bytes.</summary>
    public static IEnumerable<PlannedWrite> Plan(int seed, long imageSize)
    {
        var rng = new Random(seed);
        for (long seq = 1; ; seq++)
        {
            int sectors = rng.Next(1, 257);
            long maxStart = imageSize / 512 - sectors;
            long offset = rng.NextInt64(0, maxStart + 1) * 512;
            bool zero = rng.Next(10) == 0;
            yield return new PlannedWrite(seq, offset, sectors * 512, zero);
        }
    }

    public static int Run(BlockImage image, int seed, int flushEvery, TextWriter stdout)
    {
        var buffer = new byte[256 * 512];
        foreach (var w in Plan(seed, image.Size))
        {
            if (w.Zero)
            {
                image.WriteZeroes(w.Offset, w.Length, mayUnmap: true);
            }
            else
            {
                var span = buffer.AsSpan(0, w.Length);
                for (int i = 0; i < span.Length; i += 8) BinaryPrimitives.WriteInt64LittleEndian(span[i..], w.Sequence);
                image.Write(w.Offset, span);
            }
            if (w.Sequence % flushEvery == 0)
            {
                image.Flush();
                stdout.WriteLine($"flushed {w.Sequence}");
                stdout.Flush();
            }
        }
        return 0;
    }
}
