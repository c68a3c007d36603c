using System.Diagnostics;
using System.Security.Cryptography;

namespace Strata.Formats.Crypto;

/// <summary>What <c>encrypt.*</c> asks of a new LUKS volume (QEMU's defaults).</summary>
public sealed record LuksFormatOptions
{
    public string CipherAlg { get; init; } = "aes-256";
    public string CipherMode { get; init; } = "xts";
    public string IvGenAlg { get; init; } = "plain64";
    public string HashAlg { get; init; } = "sha256";
    /// <summary>Wall time the password's PBKDF2 should take, in milliseconds.</summary>
    public long IterTimeMs { get; init; } = 2000;
}

/// <summary>
/// LUKS1 key management: formatting a volume (master key, its digest, key slot 0 holding it under the password)
/// and unlocking one (trying the password on every active slot). Layout as QEMU writes it: the header, then each
/// slot's key material 4 KiB aligned, then the payload.
/// </summary>
public static class Luks
{
    public const int Stripes = 4000;
    public const uint MinIterations = 1000;
    private const int Alignment = 4096;

    /// <summary>The hash a LUKS hash spec names, or null.</summary>
    public static HashAlgorithmName? Hash(string spec) => spec switch
    {
        "sha1" => HashAlgorithmName.SHA1,
        "sha256" => HashAlgorithmName.SHA256,
        "sha384" => HashAlgorithmName.SHA384,
        "sha512" => HashAlgorithmName.SHA512,
        _ => null,
    };

    /// <summary>Bytes of master key a cipher algorithm and mode need (XTS takes two keys), or 0 when unsupported.</summary>
    public static int KeyBytes(string cipherAlg, string cipherMode)
    {
        int single = cipherAlg switch { "aes-128" => 16, "aes-192" => 24, "aes-256" => 32, _ => 0 };
        return cipherMode switch { "xts" => single * 2, "cbc" => single, _ => 0 };
    }

    /// <summary>QEMU's name of a header's cipher ("aes-256"), from its name and key size.</summary>
    public static string CipherAlg(LuksHeader header)
    {
        int bits = (int)header.KeyBytes * 8 / (header.CipherMode.StartsWith("xts", StringComparison.Ordinal) ? 2 : 1);
        return $"{header.CipherName}-{bits}";
    }

    /// <summary>Formats a volume: returns its header, the bytes of the whole LUKS area (header and key material,
    /// payload offset long) and the master key the payload is to be encrypted with.</summary>
    public static (LuksHeader Header, byte[] Area, byte[] MasterKey) Format(ReadOnlySpan<byte> password, LuksFormatOptions options)
    {
        var hash = Hash(options.HashAlg) ?? throw new ArgumentException($"Unsupported hash algorithm '{options.HashAlg}'");
        int keyBytes = KeyBytes(options.CipherAlg, options.CipherMode);
        string mode = $"{options.CipherMode}-{options.IvGenAlg}";
        if (keyBytes == 0 || options.IvGenAlg != "plain64") throw new ArgumentException($"Unsupported cipher {options.CipherAlg} {mode}");
        var masterKey = RandomNumberGenerator.GetBytes(keyBytes);
        var digestSalt = RandomNumberGenerator.GetBytes(LuksHeader.SaltLength);
        double perSecond = Pbkdf2BlocksPerSecond(hash);
        uint digestIterations = Iterations(perSecond / Blocks(hash, LuksHeader.DigestLength), options.IterTimeMs / 8.0);
        uint slotIterations = Iterations(perSecond / Blocks(hash, keyBytes), options.IterTimeMs);

        long slotSectors = RoundUp((long)keyBytes * Stripes, Alignment) / SectorCipher.SectorSize;
        long firstSlot = RoundUp(LuksHeader.Length, Alignment) / SectorCipher.SectorSize;
        var slots = new LuksKeySlot[LuksHeader.SlotCount];
        for (int i = 0; i < slots.Length; i++)
            slots[i] = new LuksKeySlot(false, 0, new byte[LuksHeader.SaltLength], (uint)(firstSlot + i * slotSectors), Stripes);
        long payloadSectors = firstSlot + LuksHeader.SlotCount * slotSectors;
        var area = new byte[payloadSectors * SectorCipher.SectorSize];

        var slotSalt = RandomNumberGenerator.GetBytes(LuksHeader.SaltLength);
        var material = area.AsSpan((int)(slots[0].KeyMaterialOffsetSectors * SectorCipher.SectorSize), keyBytes * Stripes);
        AfSplitter.Split(masterKey, Stripes, hash, material);
        var slotKey = Rfc2898DeriveBytes.Pbkdf2(password, slotSalt, (int)slotIterations, hash, keyBytes);
        using (var cipher = SectorCipher.ForMode(mode, slotKey)!)
            EncryptPadded(cipher, area.AsSpan((int)(slots[0].KeyMaterialOffsetSectors * SectorCipher.SectorSize), (int)(slotSectors * SectorCipher.SectorSize)), material.Length);
        CryptographicOperations.ZeroMemory(slotKey);
        slots[0] = slots[0] with { Active = true, Iterations = slotIterations, Salt = slotSalt };

        var header = new LuksHeader
        {
            CipherName = options.CipherAlg[..options.CipherAlg.IndexOf('-')],
            CipherMode = mode,
            HashSpec = options.HashAlg,
            PayloadOffsetSectors = (uint)payloadSectors,
            KeyBytes = (uint)keyBytes,
            MasterKeyDigest = Rfc2898DeriveBytes.Pbkdf2(masterKey, digestSalt, (int)digestIterations, hash, LuksHeader.DigestLength),
            MasterKeyDigestSalt = digestSalt,
            MasterKeyDigestIterations = digestIterations,
            Uuid = Guid.NewGuid().ToString("D"),
            KeySlots = slots,
        };
        header.Encode().CopyTo(area, 0);
        return (header, area, masterKey);
    }

    /// <summary>The master key the password opens, or null when it opens no active slot. <paramref name="area"/>
    /// holds the LUKS area from its start (at least up to the end of the last active slot's key material).</summary>
    public static byte[]? Unlock(LuksHeader header, ReadOnlySpan<byte> area, ReadOnlySpan<byte> password)
    {
        var hash = Hash(header.HashSpec) ?? throw new NotSupportedException($"Unsupported hash algorithm '{header.HashSpec}'");
        int keyBytes = (int)header.KeyBytes;
        foreach (var slot in header.KeySlots)
        {
            if (!slot.Active) continue;
            long start = (long)slot.KeyMaterialOffsetSectors * SectorCipher.SectorSize;
            int length = checked(keyBytes * (int)slot.Stripes);
            int padded = (int)RoundUp(length, SectorCipher.SectorSize);
            if (slot.Stripes == 0 || start + padded > area.Length) throw new FormatException("LUKS key material lies past the end of the header area");
            var material = area.Slice((int)start, padded).ToArray();
            var slotKey = Rfc2898DeriveBytes.Pbkdf2(password, slot.Salt, (int)slot.Iterations, hash, keyBytes);
            using (var cipher = SectorCipher.ForMode(header.CipherMode, slotKey)
                                ?? throw new NotSupportedException($"Unsupported cipher mode '{header.CipherMode}'"))
                cipher.Decrypt(0, material);
            CryptographicOperations.ZeroMemory(slotKey);
            var candidate = AfSplitter.Merge(material.AsSpan(0, length), keyBytes, (int)slot.Stripes, hash);
            CryptographicOperations.ZeroMemory(material);
            var digest = Rfc2898DeriveBytes.Pbkdf2(candidate, header.MasterKeyDigestSalt, (int)header.MasterKeyDigestIterations, hash, LuksHeader.DigestLength);
            if (CryptographicOperations.FixedTimeEquals(digest, header.MasterKeyDigest)) return candidate;
            CryptographicOperations.ZeroMemory(candidate);
        }
        return null;
    }

    /// <summary>Encrypts key material whose last sector may be partial: the cipher works on whole sectors, so the
    /// region (already sector padded, zeros after the material) is encrypted whole.</summary>
    private static void EncryptPadded(SectorCipher cipher, Span<byte> region, int materialLength)
    {
        int padded = (int)RoundUp(materialLength, SectorCipher.SectorSize);
        cipher.Encrypt(0, region[..padded]);
    }

    private static int Blocks(HashAlgorithmName hash, int outputLength)
    {
        int digest = hash == HashAlgorithmName.SHA1 ? 20 : hash == HashAlgorithmName.SHA384 ? 48 : hash == HashAlgorithmName.SHA512 ? 64 : 32;
        return (outputLength + digest - 1) / digest;
    }

    private static uint Iterations(double perSecond, double milliseconds) =>
        (uint)Math.Clamp(perSecond * milliseconds / 1000, MinIterations, uint.MaxValue);

    /// <summary>How many PBKDF2 iterations of one output block this machine computes per second (measured for
    /// about a tenth of a second, as QEMU measures before choosing iteration counts).</summary>
    private static double Pbkdf2BlocksPerSecond(HashAlgorithmName hash)
    {
        var salt = new byte[LuksHeader.SaltLength];
        int iterations = 1 << 12;
        while (true)
        {
            var watch = Stopwatch.StartNew();
            Rfc2898DeriveBytes.Pbkdf2("probe"u8, salt, iterations, hash, 16);
            double ms = watch.Elapsed.TotalMilliseconds;
            if (ms >= 100 || iterations >= 1 << 30) return iterations * 1000.0 / Math.Max(ms, 0.001);
            iterations *= 2;
        }
    }

    private static long RoundUp(long value, long to) => (value + to - 1) / to * to;
}
