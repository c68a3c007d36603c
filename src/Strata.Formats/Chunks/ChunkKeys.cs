using System.Security.Cryptography;
using NSec.Cryptography;

namespace Strata.Formats.Chunks;

/// <summary>
/// The repository's key material: 64 random bytes, a 32-byte AES-256-GCM data key then a 32-byte HMAC-SHA256 id key.
/// Wrapped for storage under a key-encryption key (KEK) that Argon2id derives from the passphrase or key file.
/// </summary>
public static class ChunkKeys
{
    public const int KeySize = 32;
    public const int KeyMaterialSize = 2 * KeySize;
    public const int SaltSize = 16;
    public const int NonceSize = 12;
    public const int TagSize = 16;
    public const int WrappedSize = NonceSize + KeyMaterialSize + TagSize;

    /// <summary>Argon2id defaults: 64 MiB, 3 passes, one lane (about 0.2–0.5 s on a small machine).</summary>
    public const int DefaultMemoryKib = 64 * 1024, DefaultIterations = 3, DefaultParallelism = 1;

    /// <summary>Binds the wrapped keys to their purpose: the same ciphertext cannot be passed off as another blob.</summary>
    private static ReadOnlySpan<byte> WrapContext => "strata-chunks keys v1"u8;

    /// <summary>Refuses KDF parameters libsodium cannot run or that would make a config a denial of service.</summary>
    public static void CheckKdfParameters(int memoryKib, int iterations, int parallelism)
    {
        if (parallelism != 1) throw new ChunkFormatException($"unsupported Argon2id parallelism {parallelism} (only 1 is supported)");
        if (memoryKib is < 8 or > 4 * 1024 * 1024) throw new ChunkFormatException($"Argon2id memory {memoryKib} KiB is out of range (8 KiB–4 GiB)");
        if (iterations is < 1 or > 100) throw new ChunkFormatException($"Argon2id iterations {iterations} is out of range (1–100)");
    }

    /// <summary>The key-encryption key: Argon2id(secret, salt) with the given cost.</summary>
    public static byte[] DeriveKek(ReadOnlySpan<byte> secret, ReadOnlySpan<byte> salt, int memoryKib, int iterations, int parallelism)
    {
        CheckKdfParameters(memoryKib, iterations, parallelism);
        if (salt.Length != SaltSize) throw new ChunkFormatException($"the Argon2id salt must be {SaltSize} bytes");
        var argon = PasswordBasedKeyDerivationAlgorithm.Argon2id(new Argon2Parameters
        {
            DegreeOfParallelism = parallelism,
            MemorySize = memoryKib,
            NumberOfPasses = iterations,
        });
        var kek = new byte[KeySize];
        argon.DeriveBytes(secret, salt, kek);
        return kek;
    }

    /// <summary>nonce ‖ AES-256-GCM(kek, keys) ‖ tag.</summary>
    public static byte[] Wrap(ReadOnlySpan<byte> kek, ReadOnlySpan<byte> keyMaterial, ReadOnlySpan<byte> nonce)
    {
        if (keyMaterial.Length != KeyMaterialSize) throw new ArgumentException($"key material must be {KeyMaterialSize} bytes");
        if (nonce.Length != NonceSize) throw new ArgumentException($"the nonce must be {NonceSize} bytes");
        var wrapped = new byte[WrappedSize];
        nonce.CopyTo(wrapped);
        using var aes = new AesGcm(kek, TagSize);
        aes.Encrypt(nonce, keyMaterial, wrapped.AsSpan(NonceSize, KeyMaterialSize), wrapped.AsSpan(NonceSize + KeyMaterialSize), WrapContext);
        return wrapped;
    }

    /// <summary>The key material, or <see cref="ChunkKeyException"/> when the KEK is not the one it was wrapped with
    /// (or the wrapped bytes were changed: GCM cannot tell the two apart).</summary>
    public static byte[] Unwrap(ReadOnlySpan<byte> kek, ReadOnlySpan<byte> wrapped)
    {
        if (wrapped.Length != WrappedSize) throw new ChunkFormatException("the wrapped keys have the wrong length");
        var keys = new byte[KeyMaterialSize];
        using var aes = new AesGcm(kek, TagSize);
        try
        {
            aes.Decrypt(wrapped[..NonceSize], wrapped.Slice(NonceSize, KeyMaterialSize), wrapped[(NonceSize + KeyMaterialSize)..], keys, WrapContext);
        }
        catch (AuthenticationTagMismatchException)
        {
            throw new ChunkKeyException("wrong passphrase or key file: the repository's keys did not decrypt");
        }
        return keys;
    }

    /// <summary>A chunk's id: HMAC-SHA256 of its plaintext under the id key (the store cannot test for known content).</summary>
    public static void ChunkId(ReadOnlySpan<byte> idKey, ReadOnlySpan<byte> plaintext, Span<byte> id) =>
        HMACSHA256.HashData(idKey, plaintext, id);

    /// <summary>True when every byte is zero: such a chunk is never stored (its id is 32 zero bytes).</summary>
    public static bool IsAllZero(ReadOnlySpan<byte> data) => !data.ContainsAnyExcept((byte)0);
}
