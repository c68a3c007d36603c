using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Strata.Formats.Crypto;

/// <summary>
/// A disk cipher over 512-byte sectors whose IV is the sector number ("plain64": the number as 64-bit
/// little-endian, zero-padded to the block size). Data passed in is a whole number of sectors; the first sector
/// has number <c>firstSector</c>. Instances are safe to share between threads.
/// </summary>
public abstract class SectorCipher : IDisposable
{
    public const int SectorSize = 512;
    private const int BlockSize = 16;

    public abstract void Encrypt(long firstSector, Span<byte> sectors);
    public abstract void Decrypt(long firstSector, Span<byte> sectors);
    public abstract void Dispose();

    /// <summary>The cipher for a LUKS cipher mode ("xts-plain64", "cbc-plain64") with its key, or null when the
    /// mode is not one Strata implements.</summary>
    public static SectorCipher? ForMode(string mode, ReadOnlySpan<byte> key) => mode switch
    {
        "xts-plain64" when key.Length is 32 or 48 or 64 => new XtsPlain64(key),
        "cbc-plain64" when key.Length is 16 or 24 or 32 => new CbcPlain64(key),
        _ => null,
    };

    protected static void CheckWholeSectors(ReadOnlySpan<byte> data)
    {
        if (data.Length % SectorSize != 0) throw new ArgumentException("Encrypted data must be a whole number of 512-byte sectors");
    }

    /// <summary>Writes the plain64 IV of a sector into a 16-byte block.</summary>
    protected static void Plain64(long sector, Span<byte> block)
    {
        BinaryPrimitives.WriteUInt64LittleEndian(block, (ulong)sector);
        block[8..BlockSize].Clear();
    }

    /// <summary>One Aes object per thread and key: the one-shot methods keep state in the object.</summary>
    protected sealed class AesPerThread(byte[] key) : IDisposable
    {
        private readonly ThreadLocal<Aes> _aes = new(() =>
        {
            var aes = Aes.Create();
            aes.Key = key;
            return aes;
        }, trackAllValues: true);

        public Aes Value => _aes.Value!;

        public void Dispose()
        {
            foreach (var aes in _aes.Values) aes.Dispose();
            _aes.Dispose();
            CryptographicOperations.ZeroMemory(key);
        }
    }

    /// <summary>
    /// AES-XTS (IEEE 1619) with plain64 tweaks: the key is the data key followed by the tweak key. A 512-byte
    /// sector is a multiple of the block size, so no ciphertext stealing is needed.
    /// </summary>
    public sealed class XtsPlain64 : SectorCipher
    {
        private readonly AesPerThread _data;
        private readonly AesPerThread _tweak;

        public XtsPlain64(ReadOnlySpan<byte> key)
        {
            int half = key.Length / 2;
            _data = new AesPerThread(key[..half].ToArray());
            _tweak = new AesPerThread(key[half..].ToArray());
        }

        public override void Encrypt(long firstSector, Span<byte> sectors) => Transform(firstSector, sectors, encrypt: true);

        public override void Decrypt(long firstSector, Span<byte> sectors) => Transform(firstSector, sectors, encrypt: false);

        private void Transform(long firstSector, Span<byte> sectors, bool encrypt)
        {
            CheckWholeSectors(sectors);
            const int chunkSectors = 64;
            var tweaks = new byte[chunkSectors * SectorSize];
            var data = _data.Value;
            var tweak = _tweak.Value;
            for (int at = 0; at < sectors.Length; at += chunkSectors * SectorSize)
            {
                var chunk = sectors[at..Math.Min(sectors.Length, at + chunkSectors * SectorSize)];
                int count = chunk.Length / SectorSize;
                long sector = firstSector + at / SectorSize;
                var t = tweaks.AsSpan(0, chunk.Length);
                // The first tweak of every sector is its encrypted IV; the rest follow by multiplying by x in GF(2^128).
                var ivs = new byte[count * BlockSize];
                for (int s = 0; s < count; s++) Plain64(sector + s, ivs.AsSpan(s * BlockSize, BlockSize));
                tweak.EncryptEcb(ivs, ivs, PaddingMode.None);
                for (int s = 0; s < count; s++)
                {
                    var sectorTweaks = t.Slice(s * SectorSize, SectorSize);
                    ivs.AsSpan(s * BlockSize, BlockSize).CopyTo(sectorTweaks);
                    for (int b = BlockSize; b < SectorSize; b += BlockSize)
                        MultiplyByX(sectorTweaks.Slice(b - BlockSize, BlockSize), sectorTweaks.Slice(b, BlockSize));
                }
                Xor(chunk, t);
                if (encrypt) data.EncryptEcb(chunk, chunk, PaddingMode.None);
                else data.DecryptEcb(chunk, chunk, PaddingMode.None);
                Xor(chunk, t);
            }
            CryptographicOperations.ZeroMemory(tweaks);
        }

        /// <summary>next = previous · x, the block read as a little-endian 128-bit number (IEEE 1619 §5.2).</summary>
        private static void MultiplyByX(ReadOnlySpan<byte> previous, Span<byte> next)
        {
            ulong low = BinaryPrimitives.ReadUInt64LittleEndian(previous);
            ulong high = BinaryPrimitives.ReadUInt64LittleEndian(previous[8..]);
            ulong carry = high >> 63;
            high = (high << 1) | (low >> 63);
            low = (low << 1) ^ (carry * 0x87);
            BinaryPrimitives.WriteUInt64LittleEndian(next, low);
            BinaryPrimitives.WriteUInt64LittleEndian(next[8..], high);
        }

        private static void Xor(Span<byte> target, ReadOnlySpan<byte> with)
        {
            var t = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(target);
            var w = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ulong>(with);
            for (int i = 0; i < t.Length; i++) t[i] ^= w[i];
        }

        public override void Dispose()
        {
            _data.Dispose();
            _tweak.Dispose();
        }
    }

    /// <summary>AES-CBC, each sector chained on its own from its plain64 IV (LUKS cbc-plain64, and the legacy
    /// qcow "aes" encryption).</summary>
    public sealed class CbcPlain64(ReadOnlySpan<byte> key) : SectorCipher
    {
        private readonly AesPerThread _aes = new(key.ToArray());

        public override void Encrypt(long firstSector, Span<byte> sectors) => Transform(firstSector, sectors, encrypt: true);

        public override void Decrypt(long firstSector, Span<byte> sectors) => Transform(firstSector, sectors, encrypt: false);

        /// <summary>Each sector on its own, chained from an IV that is its sector number.</summary>
        private void Transform(long firstSector, Span<byte> sectors, bool encrypt)
        {
            CheckWholeSectors(sectors);
            var aes = _aes.Value;
            Span<byte> iv = stackalloc byte[BlockSize];
            for (int at = 0; at < sectors.Length; at += SectorSize)
            {
                Plain64(firstSector + at / SectorSize, iv);
                var sector = sectors.Slice(at, SectorSize);
                if (encrypt) aes.EncryptCbc(sector, iv, sector, PaddingMode.None);
                else aes.DecryptCbc(sector, iv, sector, PaddingMode.None);
            }
        }

        public override void Dispose() => _aes.Dispose();
    }

    /// <summary>The legacy qcow "aes" cipher: AES-128-CBC keyed by the password's first 16 bytes, zero-padded.</summary>
    public static SectorCipher LegacyQcowAes(ReadOnlySpan<byte> password)
    {
        Span<byte> key = stackalloc byte[16];
        key.Clear();
        password[..Math.Min(16, password.Length)].CopyTo(key);
        return new CbcPlain64(key);
    }
}
