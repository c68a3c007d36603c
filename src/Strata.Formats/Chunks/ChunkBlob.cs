using System.Security.Cryptography;

namespace Strata.Formats.Chunks;

/// <summary>
/// The envelope of every chunk and point-index object: a 4-byte magic, a version byte and a flags byte, then the
/// payload: zstd(plaintext) when that is smaller, else the plaintext; when encrypted, nonce(12) ‖ AES-256-GCM
/// ciphertext ‖ tag(16). The additional data is the 6 header bytes then the caller's context (a chunk's id, an index's
/// key), so a blob moved under another name, or with its flags changed, fails to open.
/// </summary>
public static class ChunkBlob
{
    public const byte Version = 1;
    public const int HeaderSize = 6;
    public const byte FlagZstd = 1, FlagEncrypted = 2;
    private const int CompressionLevel = 1;

    public static ReadOnlySpan<byte> ChunkMagic => "STCK"u8;
    public static ReadOnlySpan<byte> PointIndexMagic => "STPI"u8;

    [ThreadStatic] private static ZstdSharp.Compressor? t_compressor;
    [ThreadStatic] private static ZstdSharp.Decompressor? t_decompressor;

    /// <summary>Encodes <paramref name="plaintext"/>; <paramref name="dataKey"/> empty means no encryption, else
    /// <paramref name="nonce"/> (12 fresh random bytes) is used once.</summary>
    public static byte[] Encode(ReadOnlySpan<byte> magic, ReadOnlySpan<byte> plaintext, ReadOnlySpan<byte> dataKey, ReadOnlySpan<byte> context, ReadOnlySpan<byte> nonce)
    {
        if (magic.Length != 4) throw new ArgumentException("the magic is 4 bytes");
        bool encrypt = !dataKey.IsEmpty;
        var compressor = t_compressor ??= new ZstdSharp.Compressor(CompressionLevel);
        var buffer = new byte[ZstdSharp.Compressor.GetCompressBound(plaintext.Length)];
        int compressedLength = compressor.Wrap(plaintext, buffer);
        bool compressed = compressedLength < plaintext.Length;
        ReadOnlySpan<byte> payload = compressed ? buffer.AsSpan(0, compressedLength) : plaintext;

        byte flags = (byte)((compressed ? FlagZstd : 0) | (encrypt ? FlagEncrypted : 0));
        int bodyLength = encrypt ? ChunkKeys.NonceSize + payload.Length + ChunkKeys.TagSize : payload.Length;
        var blob = new byte[HeaderSize + bodyLength];
        magic.CopyTo(blob);
        blob[4] = Version;
        blob[5] = flags;
        if (!encrypt)
        {
            payload.CopyTo(blob.AsSpan(HeaderSize));
            return blob;
        }
        if (nonce.Length != ChunkKeys.NonceSize) throw new ArgumentException("the nonce must be 12 bytes");
        var body = blob.AsSpan(HeaderSize);
        nonce.CopyTo(body);
        using var aes = new AesGcm(dataKey, ChunkKeys.TagSize);
        aes.Encrypt(nonce, payload, body.Slice(ChunkKeys.NonceSize, payload.Length), body[(ChunkKeys.NonceSize + payload.Length)..],
            AdditionalData(blob.AsSpan(0, HeaderSize), context));
        return blob;
    }

    /// <summary>Opens a blob: checks magic and version, that it is encrypted exactly when a key is given, decrypts
    /// (the tag covers header and context) and decompresses to at most <paramref name="maxPlaintext"/> bytes.
    /// Any mismatch is a <see cref="ChunkFormatException"/> saying which.</summary>
    public static byte[] Decode(ReadOnlySpan<byte> magic, ReadOnlySpan<byte> blob, ReadOnlySpan<byte> dataKey, ReadOnlySpan<byte> context, int maxPlaintext)
    {
        if (blob.Length < HeaderSize || !blob[..4].SequenceEqual(magic))
            throw new ChunkFormatException($"not a {System.Text.Encoding.ASCII.GetString(magic)} blob (bad magic)");
        if (blob[4] != Version) throw new ChunkFormatException($"unsupported blob version {blob[4]}");
        byte flags = blob[5];
        if ((flags & ~(FlagZstd | FlagEncrypted)) != 0) throw new ChunkFormatException($"unknown blob flags 0x{flags:x2}");
        bool encrypted = (flags & FlagEncrypted) != 0;
        if (encrypted != !dataKey.IsEmpty)
            throw new ChunkFormatException(encrypted ? "the blob is encrypted but the repository is not" : "the blob is not encrypted but the repository is");

        ReadOnlySpan<byte> payload = blob[HeaderSize..];
        byte[]? decrypted = null;
        if (encrypted)
        {
            if (payload.Length < ChunkKeys.NonceSize + ChunkKeys.TagSize) throw new ChunkFormatException("the encrypted blob is truncated");
            decrypted = new byte[payload.Length - ChunkKeys.NonceSize - ChunkKeys.TagSize];
            using var aes = new AesGcm(dataKey, ChunkKeys.TagSize);
            try
            {
                aes.Decrypt(payload[..ChunkKeys.NonceSize], payload.Slice(ChunkKeys.NonceSize, decrypted.Length), payload[(ChunkKeys.NonceSize + decrypted.Length)..],
                    decrypted, AdditionalData(blob[..HeaderSize], context));
            }
            catch (AuthenticationTagMismatchException)
            {
                throw new ChunkFormatException("the blob failed authentication (changed, truncated, or stored under another name)");
            }
            payload = decrypted;
        }

        if ((flags & FlagZstd) == 0)
        {
            if (payload.Length > maxPlaintext) throw new ChunkFormatException($"the blob holds {payload.Length} bytes, more than the {maxPlaintext} expected");
            return decrypted ?? payload.ToArray();
        }
        ulong size;
        try
        {
            size = ZstdSharp.Decompressor.GetDecompressedSize(payload);
        }
        catch (ZstdSharp.ZstdException e)
        {
            throw new ChunkFormatException($"the blob's zstd frame is corrupt: {e.Message}");
        }
        if (size > (ulong)maxPlaintext) throw new ChunkFormatException($"the blob decompresses to {size} bytes, more than the {maxPlaintext} expected");
        var plaintext = new byte[size];
        var decompressor = t_decompressor ??= new ZstdSharp.Decompressor();
        try
        {
            int written = decompressor.Unwrap(payload, plaintext);
            if (written != plaintext.Length) throw new ChunkFormatException($"the blob's zstd frame is corrupt: {written} bytes instead of {size}");
        }
        catch (ZstdSharp.ZstdException e)
        {
            throw new ChunkFormatException($"the blob's zstd frame is corrupt: {e.Message}");
        }
        return plaintext;
    }

    private static byte[] AdditionalData(ReadOnlySpan<byte> header, ReadOnlySpan<byte> context)
    {
        var aad = new byte[header.Length + context.Length];
        header.CopyTo(aad);
        context.CopyTo(aad.AsSpan(header.Length));
        return aad;
    }
}
