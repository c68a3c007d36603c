using System.Buffers;
using System.IO.Pipelines;

namespace Strata.Protocol.Nbd;

/// <summary>Exact-length reads from a pipe, for a protocol whose messages say their own length.</summary>
internal static class PipeReaderExtensions
{
    public static async ValueTask<byte[]> ReadExactAsync(this PipeReader input, int count, CancellationToken ct)
    {
        var result = new byte[count];
        await input.ReadExactAsync(result, ct);
        return result;
    }

    /// <summary>Fills <paramref name="destination"/>; EndOfStreamException when the writer completes first.</summary>
    public static async ValueTask ReadExactAsync(this PipeReader input, Memory<byte> destination, CancellationToken ct)
    {
        int done = 0;
        while (done < destination.Length)
        {
            var r = await input.ReadAsync(ct);
            var buffer = r.Buffer;
            int take = (int)Math.Min(buffer.Length, destination.Length - done);
            buffer.Slice(0, take).CopyTo(destination.Span[done..]);
            done += take;
            input.AdvanceTo(buffer.GetPosition(take));
            if (done < destination.Length && r.IsCompleted) throw new EndOfStreamException();
        }
    }

    /// <summary>Consumes <paramref name="count"/> bytes without keeping them.</summary>
    public static async ValueTask SkipAsync(this PipeReader input, long count, CancellationToken ct)
    {
        while (count > 0)
        {
            var r = await input.ReadAsync(ct);
            long take = Math.Min(r.Buffer.Length, count);
            input.AdvanceTo(r.Buffer.GetPosition(take));
            count -= take;
            if (count > 0 && r.IsCompleted) throw new EndOfStreamException();
        }
    }
}
