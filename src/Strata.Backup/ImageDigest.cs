using System.Buffers;
using System.Security.Cryptography;
using Strata.Block;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>
/// What a backup file's own layer holds (data and zero ranges, never what it reads through to), with a SHA-256
/// per data piece, and a SHA-256 of the whole file: the facts a manifest records and verify re-checks.
/// </summary>
public static class ImageDigest
{
    /// <summary>Data extents are hashed in pieces of at most this size, so that verify can say where damage is.</summary>
    public const int PieceSize = 4 << 20;

    /// <summary>The layer's extents; <paramref name="granules"/>, when given, is fed every range in the same pass (the
    /// data read once for both).</summary>
    public static List<ExtentDigest> TopLayer(BlockImage image, GranuleDigestBuilder? granules = null)
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
                        byte[] pieceHash;
                        if (granules is null) pieceHash = SHA256.HashData(span);
                        else if (granules.IsWholeGranule(pos, len))
                        {
                            // One granule, one hash: a piece that is exactly a granule (every piece of a sparse
                            // incremental) gives the granule its digest from the piece's own SHA-256.
                            pieceHash = SHA256.HashData(span);
                            granules.WholeGranule(pos, len, pieceHash);
                        }
                        else
                        {
                            // Two hashes of the same bytes, on two cores.
                            int n = (int)len;
                            var piece = Task.Run(() => SHA256.HashData(buffer.AsSpan(0, n)));
                            try
                            {
                                granules.Data(pos, span);
                            }
                            finally
                            {
                                // Never return the buffer to the pool while the other hash still reads it.
                                pieceHash = piece.GetAwaiter().GetResult();
                            }
                        }
                        result.Add(new ExtentDigest(pos, len, ExtentDigest.Data, Convert.ToHexStringLower(pieceHash)));
                        break;
                    case LayerState.Unallocated:
                        granules?.Unallocated(pos, len);
                        break;
                    case LayerState.Zero:
                        granules?.Zero(pos, len);
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

    /// <summary>The read size of <see cref="FileSha256"/>: as fast as larger reads from the page cache, and a fresh
    /// buffer's first touch (a page fault per page, dear in a VM) is paid on a quarter of a piece, not on four MiB.</summary>
    private const int FileReadSize = 1 << 20;

    public static string FileSha256(string path)
    {
        using var handle = File.OpenHandle(path);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(FileReadSize);
        try
        {
            int n;
            for (long pos = 0; (n = RandomAccess.Read(handle, buffer.AsSpan(0, FileReadSize), pos)) > 0; pos += n)
                hash.AppendData(buffer, 0, n);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>The file's extents and its whole-file hash, computed side by side (two reads, two cores).</summary>
    public static (List<ExtentDigest> Extents, string FileSha256) Both(string path, GranuleDigestBuilder? granules = null)
    {
        var whole = Task.Run(() => FileSha256(path));
        List<ExtentDigest> extents;
        using (var image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true)) extents = TopLayer(image, granules);
        return (extents, whole.GetAwaiter().GetResult());
    }

    /// <summary>The builder's digests; granules it could not finish from the file's own layer are read through the
    /// chain of <paramref name="path"/>, which is opened only then.</summary>
    public static GranuleDigests FinishGranules(GranuleDigestBuilder builder, string path)
    {
        BlockImage? chain = null;
        try
        {
            return builder.Finish((offset, span) => (chain ??= ImageOpener.Open(path, "qcow2", readOnly: true)).Read(offset, span));
        }
        finally
        {
            chain?.Dispose();
        }
    }

    /// <summary>The granule digests of <paramref name="image"/> read whole (through its chain): zero ranges by block
    /// status, without a read.</summary>
    public static GranuleDigests ChainGranules(BlockImage image, long granularity)
    {
        var builder = new GranuleDigestBuilder(image.Size, granularity, parent: null);
        var buffer = ArrayPool<byte>.Shared.Rent(PieceSize);
        try
        {
            for (long pos = 0; pos < image.Size;)
            {
                var ext = ChainStatus.Get(image, pos, Math.Min(PieceSize, image.Size - pos));
                if (ext.Zero) builder.Zero(pos, ext.Length);
                else
                {
                    var span = buffer.AsSpan(0, (int)ext.Length);
                    image.Read(pos, span);
                    builder.Data(pos, span);
                }
                pos += ext.Length;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return builder.Finish();
    }

    public static long DataBytes(IEnumerable<ExtentDigest> extents) => extents.Where(e => e.Kind == ExtentDigest.Data).Sum(e => e.Length);

    /// <summary>The manifest with the facts of its file as it is now: extents, bytes copied, size and hash;
    /// <paramref name="granules"/>, when given, is fed the file's layer in the same pass.</summary>
    public static BackupManifest Describe(BackupManifest m, string path, GranuleDigestBuilder? granules = null)
    {
        var (extents, sha256) = Both(path, granules);
        return m with
        {
            Extents = extents,
            CopiedBytes = DataBytes(extents),
            FileSize = new FileInfo(path).Length,
            FileSha256 = sha256,
        };
    }
}
