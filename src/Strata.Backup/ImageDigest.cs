using System.Buffers;
using System.Security.Cryptography;
using Strata.Block;

namespace Strata.Backup;

/// <summary>
/// What a backup file's own layer holds (data and zero ranges, never what it reads through to), with a SHA-256
/// per data piece, and a SHA-256 of the whole file: the facts a manifest records and verify re-checks.
/// </summary>
public static class ImageDigest
{
    /// <summary>Data extents are hashed in pieces of at most this size, so that verify can say where damage is.</summary>
    public const int PieceSize = 4 << 20;

    public static List<ExtentDigest> TopLayer(BlockImage image)
    {
        var result = new List<ExtentDigest>();
        var buffer = ArrayPool<byte>.Shared.Rent(PieceSize);
        try
        {
            for (long pos = 0; pos < image.Size;)
            {
                var ext = image.GetLayerStatus(pos, Math.Min(PieceSize, image.Size - pos));
                long len = Math.Min(ext.Length, image.Size - pos);
                switch (ext.State)
                {
                    case LayerState.Data:
                        var span = buffer.AsSpan(0, (int)len);
                        image.Read(pos, span);
                        result.Add(new ExtentDigest(pos, len, ExtentDigest.Data, Convert.ToHexStringLower(SHA256.HashData(span))));
                        break;
                    case LayerState.Zero:
                        if (result.Count > 0 && result[^1] is { Kind: ExtentDigest.Zero } z && z.Offset + z.Length == pos)
                            result[^1] = z with { Length = z.Length + len };
                        else
                            result.Add(new ExtentDigest(pos, len, ExtentDigest.Zero, null));
                        break;
                }
                pos += len;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return result;
    }

    public static string FileSha256(string path)
    {
        using var handle = File.OpenHandle(path);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(PieceSize);
        try
        {
            int n;
            for (long pos = 0; (n = RandomAccess.Read(handle, buffer.AsSpan(0, PieceSize), pos)) > 0; pos += n)
                hash.AppendData(buffer, 0, n);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>The file's extents and its whole-file hash, computed side by side (two reads, two cores).</summary>
    public static (List<ExtentDigest> Extents, string FileSha256) Both(string path)
    {
        var whole = Task.Run(() => FileSha256(path));
        List<ExtentDigest> extents;
        using (var image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true)) extents = TopLayer(image);
        return (extents, whole.GetAwaiter().GetResult());
    }

    public static long DataBytes(IEnumerable<ExtentDigest> extents) => extents.Where(e => e.Kind == ExtentDigest.Data).Sum(e => e.Length);

    /// <summary>The manifest with the facts of its file as it is now: extents, bytes copied, size and hash.</summary>
    public static BackupManifest Describe(BackupManifest m, string path)
    {
        var (extents, sha256) = Both(path);
        return m with
        {
            Extents = extents,
            CopiedBytes = DataBytes(extents),
            FileSize = new FileInfo(path).Length,
            FileSha256 = sha256,
        };
    }
}
