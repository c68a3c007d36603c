using System.Buffers.Binary;
using System.Security.Cryptography;
using Strata.Formats.Crypto;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>How a new qcow2 image is encrypted: the legacy qcow "aes" method or LUKS in the image.</summary>
public sealed record Qcow2Encryption(string Format, byte[] Secret, LuksFormatOptions Luks);

/// <summary>
/// Encrypted qcow2 (crypt_method 1, legacy AES-CBC; 2, LUKS with its header in clusters named by the full disk
/// encryption header extension). Guest data in allocated clusters is encrypted in 512-byte sectors; the sector
/// number is the guest offset's for AES and the host offset's for LUKS, as QEMU does. The key is looked up and
/// the LUKS slots tried only at <see cref="Unlock"/> (or the first access to guest data), so that an image opens
/// for its metadata alone (qemu-img info) without its secret, as QEMU's no-I/O opens do.
/// </summary>
public sealed partial class Qcow2Image
{
    private const uint CryptAes = 1, CryptLuks = 2;

    private SectorCipher? _cipher;
    private Func<byte[]>? _keySecret;
    private readonly object _unlockLock = new();
    /// <summary>Encrypted in-place writes hold their whole sectors: a write of part of a sector rewrites the rest of it
    /// from what it read, which must not undo another write to that sector meanwhile.</summary>
    private readonly RangeLock _sectorWrites = new();
    /// <summary>Where the LUKS header clusters lie (the refcount check counts them), or null.</summary>
    private (long Offset, long Length)? _luksArea;

    /// <summary>The LUKS header of a LUKS-encrypted image (null otherwise).</summary>
    public LuksHeader? Luks { get; private set; }

    /// <summary>Whether guest data is encrypted ("aes" or "luks"), null when it is not.</summary>
    public string? EncryptionFormat => _header.CryptMethod switch { 0 => null, CryptAes => "aes", CryptLuks => "luks", _ => "unknown" };

    /// <summary>Encrypted, and opened without its key: guest data cannot be read or written.</summary>
    public bool NeedsKey => _header.CryptMethod != 0 && _cipher is null;

    /// <summary>Reads the encryption header at open; the key secret is kept for <see cref="Unlock"/>.</summary>
    private void OpenEncryption(Func<byte[]>? keySecret)
    {
        _keySecret = keySecret;
        switch (_header.CryptMethod)
        {
            case 0:
                return;
            case CryptAes:
                return;
            case CryptLuks:
                var ext = _extras.Find(Qcow2ExtensionType.FullDiskEncryption)
                          ?? throw new BlockException("qcow2: Could not read encryption header: No crypto header extension");
                if (ext.Data.Length < 16) throw new ImageFormatException("Invalid encryption header extension");
                long offset = (long)BinaryPrimitives.ReadUInt64BigEndian(ext.Data);
                long length = (long)BinaryPrimitives.ReadUInt64BigEndian(ext.Data.AsSpan(8));
                if ((offset & (_clusterSize - 1)) != 0) throw new ImageFormatException("Encryption header offset not cluster aligned");
                if (length > int.MaxValue || offset + length > _file.Length || length < LuksHeader.Length)
                    throw new ImageFormatException("Encryption header exceeds the end of the file");
                _luksArea = (offset, length);
                var head = new byte[LuksHeader.Length];
                _file.Read(offset, head);
                try
                {
                    Luks = LuksHeader.Parse(head);
                }
                catch (FormatException e)
                {
                    throw new BlockException(e.Message);
                }
                return;
            default:
                throw new BlockException($"Unsupported encryption method: {_header.CryptMethod}");
        }
    }

    /// <summary>Turns a fresh, empty image into an encrypted one: the key material goes into newly allocated clusters
    /// (LUKS), and the header says how data is encrypted.</summary>
    private void SetUpEncryption(Qcow2Encryption encryption)
    {
        lock (_lock)
        {
            if (encryption.Format == "aes")
            {
                _header = _header with { CryptMethod = CryptAes };
                WriteHeaderFields();
                _cipher = SectorCipher.LegacyQcowAes(encryption.Secret);
                _file.Flush();
                return;
            }
            var (luks, area, masterKey) = Formats.Crypto.Luks.Format(encryption.Secret, encryption.Luks);
            long clusters = (area.Length + _clusterSize - 1) >> _clusterBits;
            long offset = AllocateClusters(clusters);
            WriteBackMetadata();
            var padded = new byte[clusters << _clusterBits];
            area.CopyTo(padded, 0);
            _file.Write(offset, padded);
            _file.Flush();
            var extension = new byte[16];
            BinaryPrimitives.WriteUInt64BigEndian(extension, (ulong)offset);
            BinaryPrimitives.WriteUInt64BigEndian(extension.AsSpan(8), (ulong)area.Length);
            // QEMU's order: backing format and data file first, then the crypto header, then the rest.
            var exts = _extras.Extensions.Where(e => e.Type is Qcow2ExtensionType.BackingFormat or Qcow2ExtensionType.ExternalDataFile).ToList();
            exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.FullDiskEncryption, extension));
            exts.AddRange(_extras.Extensions.Where(e => e.Type is not (Qcow2ExtensionType.BackingFormat or Qcow2ExtensionType.ExternalDataFile or Qcow2ExtensionType.FullDiskEncryption)));
            // With small clusters the feature name table no longer fits beside the crypto header: QEMU leaves it out.
            int backingLength = _backingFile is null ? 0 : System.Text.Encoding.UTF8.GetByteCount(_backingFile);
            if (_header.WrittenLength + exts.Sum(e => e.EncodedLength) + 8 + backingLength > _clusterSize)
                exts.RemoveAll(e => e.Type == Qcow2ExtensionType.FeatureNameTable);
            _header = _header with { CryptMethod = CryptLuks };
            RewriteHeaderExtensions(exts);
            _luksArea = (offset, area.Length);
            Luks = luks;
            _cipher = SectorCipher.ForMode(luks.CipherMode, masterKey);
            CryptographicOperations.ZeroMemory(masterKey);
        }
    }

    /// <summary>Makes guest data readable: looks the key secret up and opens a LUKS key slot with it. Throws QEMU's
    /// message when there is no secret, no such secret, or the password opens no slot. Nothing to do for a plain
    /// image or one already unlocked.</summary>
    public void Unlock()
    {
        if (!NeedsKey) return;
        lock (_unlockLock)
        {
            if (_cipher is not null) return;
            if (_keySecret is null) throw new BlockException("Parameter 'encrypt.key-secret' is required for cipher");
            var secret = _keySecret();
            if (_header.CryptMethod == CryptAes)
            {
                _cipher = SectorCipher.LegacyQcowAes(secret);
                return;
            }
            var (offset, length) = _luksArea!.Value;
            var area = new byte[length];
            _file.Read(offset, area);
            byte[]? masterKey;
            try
            {
                masterKey = Formats.Crypto.Luks.Unlock(Luks!, area, secret);
            }
            catch (Exception e) when (e is FormatException or NotSupportedException)
            {
                throw new BlockException(e.Message);
            }
            if (masterKey is null) throw new BlockException("Invalid password, cannot unlock any keyslot");
            _cipher = SectorCipher.ForMode(Luks!.CipherMode, masterKey)
                      ?? throw new BlockException($"Unsupported cipher mode '{Luks.CipherMode}'");
            CryptographicOperations.ZeroMemory(masterKey);
        }
    }

    private void ThrowIfNoKey()
    {
        if (_cipher is null) Unlock();
    }

    /// <summary>The first sector number of data at a guest offset stored at a host offset.</summary>
    private long FirstSector(long guestOffset, long hostOffset) =>
        (_header.CryptMethod == CryptAes ? guestOffset : hostOffset) / SectorCipher.SectorSize;

    /// <summary>Reads guest data from an allocated cluster range and decrypts it. A request not on sector boundaries
    /// reads (and decrypts) the whole sectors around it.</summary>
    private void ReadDecrypted(long guestOffset, long hostOffset, Span<byte> output)
    {
        ThrowIfNoKey();
        long head = hostOffset & (SectorCipher.SectorSize - 1);
        if (head == 0 && (output.Length & (SectorCipher.SectorSize - 1)) == 0)
        {
            _file.Read(hostOffset, output);
            _cipher!.Decrypt(FirstSector(guestOffset, hostOffset), output);
            return;
        }
        long start = hostOffset - head;
        var sectors = new byte[(head + output.Length + SectorCipher.SectorSize - 1) & ~(SectorCipher.SectorSize - 1L)];
        _file.Read(start, sectors);
        _cipher!.Decrypt(FirstSector(guestOffset - head, start), sectors);
        sectors.AsSpan((int)head, output.Length).CopyTo(output);
    }

    /// <summary>Encrypts guest data and writes it to allocated clusters. A request not on sector boundaries merges
    /// the old content of its first and last sectors (read and decrypted) around the new bytes.</summary>
    private void WriteEncrypted(long guestOffset, long hostOffset, ReadOnlySpan<byte> data)
    {
        ThrowIfNoKey();
        const int sector = SectorCipher.SectorSize;
        long head = hostOffset & (sector - 1);
        long start = hostOffset - head;
        var sectors = new byte[(head + data.Length + sector - 1) & ~(sector - 1L)];
        using var hold = _sectorWrites.Exclusive(start, sectors.Length);
        if (head != 0) ReadDecrypted(guestOffset - head, start, sectors.AsSpan(0, sector));
        if (((head + data.Length) & (sector - 1)) != 0 && (sectors.Length > sector || head == 0))
            ReadDecrypted(guestOffset - head + sectors.Length - sector, start + sectors.Length - sector, sectors.AsSpan(sectors.Length - sector));
        data.CopyTo(sectors.AsSpan((int)head));
        _cipher!.Encrypt(FirstSector(guestOffset - head, start), sectors);
        _file.Write(start, sectors);
    }

    /// <summary>The bytes to write into freshly allocated clusters (cluster aligned): encrypted when the image is.</summary>
    private ReadOnlySpan<byte> EncryptForAllocation(long guestOffset, long hostOffset, ReadOnlySpan<byte> plain)
    {
        if (_header.CryptMethod == 0) return plain;
        ThrowIfNoKey();
        var encrypted = plain.ToArray();
        _cipher!.Encrypt(FirstSector(guestOffset, hostOffset), encrypted);
        return encrypted;
    }
}
