using System.IO.Compression;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>Compressed-cluster codecs: raw deflate (no zlib header) or zstd frames, per the header's type.</summary>
internal static class ClusterCompression
{
    /// <summary>Decompresses until <paramref name="output"/> is full; trailing bytes of the last sector are ignored.</summary>
    public static void Decompress(Qcow2CompressionType type, ReadOnlySpan<byte> input, Span<byte> output)
    {
        try
        {
            using var source = new MemoryStream(input.ToArray(), writable: false);
            using Stream stream = type == Qcow2CompressionType.Zstd
                ? new ZstdSharp.DecompressionStream(source)
                : new DeflateStream(source, CompressionMode.Decompress);
            int done = 0;
            while (done < output.Length)
            {
                int n = stream.Read(output[done..]);
                if (n <= 0) break;
                done += n;
            }
            if (done < output.Length)
                throw new BlockException($"qcow2: compressed cluster is truncated ({done} of {output.Length} bytes)");
        }
        catch (Exception e) when (e is not BlockException)
        {
            // Whatever a decoder throws on garbage (InvalidDataException, ZstdException, EndOfStreamException, …).
            throw new BlockException($"qcow2: compressed cluster is corrupt: {e.Message}");
        }
    }

    /// <summary>Compresses a cluster; null when the result would exceed <paramref name="maxLength"/>.</summary>
    public static byte[]? Compress(Qcow2CompressionType type, ReadOnlySpan<byte> cluster, int maxLength)
    {
        byte[] result;
        if (type == Qcow2CompressionType.Zstd)
        {
            using var compressor = new ZstdSharp.Compressor(1);
            result = compressor.Wrap(cluster).ToArray();
        }
        else
        {
            using var ms = new MemoryStream();
            using (var deflate = new DeflateStream(ms, CompressionLevel.Optimal, leaveOpen: true))
                deflate.Write(cluster);
            result = ms.ToArray();
        }
        return result.Length > maxLength ? null : result;
    }
}
