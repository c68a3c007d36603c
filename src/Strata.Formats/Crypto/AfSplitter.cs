using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Strata.Formats.Crypto;

/// <summary>
/// LUKS's anti-forensic splitter: a key is spread over <c>stripes</c> blocks of its own size, so that losing any
/// one block (one sector a disk remapped) loses the key. Every block but the last is random; the last is the key
/// XORed with the hash-diffused XOR-chain of the others.
/// </summary>
public static class AfSplitter
{
    /// <summary>Splits <paramref name="key"/> into <paramref name="split"/> (key.Length × stripes bytes).</summary>
    public static void Split(ReadOnlySpan<byte> key, int stripes, HashAlgorithmName hash, Span<byte> split)
    {
        int n = key.Length;
        if (split.Length != n * stripes) throw new ArgumentException("Split buffer must hold stripes × key length bytes");
        RandomNumberGenerator.Fill(split[..(n * (stripes - 1))]);
        var chain = Chain(split, n, stripes, hash);
        var last = split.Slice(n * (stripes - 1), n);
        for (int i = 0; i < n; i++) last[i] = (byte)(chain[i] ^ key[i]);
        CryptographicOperations.ZeroMemory(chain);
    }

    /// <summary>Recovers the key from its split form.</summary>
    public static byte[] Merge(ReadOnlySpan<byte> split, int keyLength, int stripes, HashAlgorithmName hash)
    {
        if (split.Length != keyLength * stripes) throw new ArgumentException("Split data must hold stripes × key length bytes");
        var chain = Chain(split, keyLength, stripes, hash);
        var last = split.Slice(keyLength * (stripes - 1), keyLength);
        for (int i = 0; i < keyLength; i++) chain[i] ^= last[i];
        return chain;
    }

    /// <summary>XOR of the first stripes-1 blocks, diffused after each one.</summary>
    private static byte[] Chain(ReadOnlySpan<byte> split, int n, int stripes, HashAlgorithmName hash)
    {
        var buffer = new byte[n];
        for (int s = 0; s < stripes - 1; s++)
        {
            var block = split.Slice(s * n, n);
            for (int i = 0; i < n; i++) buffer[i] ^= block[i];
            Diffuse(buffer, hash);
        }
        return buffer;
    }

    /// <summary>Replaces each digest-sized piece of the buffer (the last may be shorter) by the hash of its index
    /// (32-bit big-endian) followed by the piece, cut to the piece's length.</summary>
    private static void Diffuse(Span<byte> buffer, HashAlgorithmName hash)
    {
        using var h = IncrementalHash.CreateHash(hash);
        int digestLength = h.HashLengthInBytes;
        Span<byte> index = stackalloc byte[4];
        Span<byte> digest = stackalloc byte[64];
        for (int at = 0, i = 0; at < buffer.Length; at += digestLength, i++)
        {
            var piece = buffer.Slice(at, Math.Min(digestLength, buffer.Length - at));
            BinaryPrimitives.WriteUInt32BigEndian(index, (uint)i);
            h.AppendData(index);
            h.AppendData(piece);
            h.GetHashAndReset(digest);
            digest[..piece.Length].CopyTo(piece);
        }
    }
}
