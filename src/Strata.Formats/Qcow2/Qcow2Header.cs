using System.Buffers.Binary;

namespace Strata.Formats.Qcow2;

/// <summary>Thrown when bytes on disk do not form a valid image structure.</summary>
public sealed class ImageFormatException(string message) : Exception(message);

/// <summary>Incompatible feature bits (header offset 72). Values are the on-disk bit masks.</summary>
[Flags]
public enum Qcow2IncompatibleFeatures : ulong
{
    None = 0,
    Dirty = 1 << 0,
    Corrupt = 1 << 1,
    ExternalDataFile = 1 << 2,
    CompressionType = 1 << 3,
    ExtendedL2 = 1 << 4,
}

/// <summary>Compatible feature bits (header offset 80).</summary>
[Flags]
public enum Qcow2CompatibleFeatures : ulong
{
    None = 0,
    LazyRefcounts = 1 << 0,
}

/// <summary>Autoclear feature bits (header offset 88).</summary>
[Flags]
public enum Qcow2AutoclearFeatures : ulong
{
    None = 0,
    Bitmaps = 1 << 0,
    RawExternalData = 1 << 1,
}

/// <summary>Compression type byte (header offset 104).</summary>
public enum Qcow2CompressionType : byte
{
    Deflate = 0,
    Zstd = 1,
}

/// <summary>
/// The fixed part of a qcow2 header (version 2 or 3). All fields big-endian on disk.
/// Parsing and serialisation are pure; extensions live in <see cref="Qcow2HeaderExtension"/>.
/// </summary>
public sealed record Qcow2Header
{
    public const uint Magic = 0x514649FB;
    public const int V2HeaderLength = 72;
    public const int V3MinHeaderLength = 104;
    /// <summary>What qemu-img 7.2 writes: 104 bytes plus the compression type byte and padding.</summary>
    public const int V3HeaderLength = 112;
    public const int MinClusterBits = 9;
    public const int MaxClusterBits = 21;
    public const int MaxBackingFileSize = 1023;
    /// <summary>Host offsets have 56 bits in every table entry.</summary>
    public const ulong MaxHostOffset = (1UL << 56) - 1;
    /// <summary>QEMU's largest active L1 table: 32 MiB of entries (128 GiB of guest at 512-byte clusters).</summary>
    public const uint MaxL1Entries = (32u << 20) / 8;
    /// <summary>QEMU's largest refcount table, in bytes (8 MiB).</summary>
    public const long MaxRefcountTableBytes = 8L << 20;
    /// <summary>Where the incompatible feature bits lie (version 3), rewritten alone to mark an image corrupt.</summary>
    public const int IncompatibleFeaturesOffset = 72;

    public uint Version { get; init; } = 3;
    public ulong BackingFileOffset { get; init; }
    public uint BackingFileSize { get; init; }
    public int ClusterBits { get; init; } = 16;
    public ulong Size { get; init; }
    public uint CryptMethod { get; init; }
    public uint L1Size { get; init; }
    public ulong L1TableOffset { get; init; }
    public ulong RefcountTableOffset { get; init; }
    public uint RefcountTableClusters { get; init; }
    public uint NbSnapshots { get; init; }
    public ulong SnapshotsOffset { get; init; }
    public Qcow2IncompatibleFeatures IncompatibleFeatures { get; init; }
    public Qcow2CompatibleFeatures CompatibleFeatures { get; init; }
    public Qcow2AutoclearFeatures AutoclearFeatures { get; init; }
    public int RefcountOrder { get; init; } = 4;
    public uint HeaderLength { get; init; } = V3HeaderLength;
    public Qcow2CompressionType CompressionType { get; init; }

    public long ClusterSize => 1L << ClusterBits;
    public int RefcountBits => 1 << RefcountOrder;

    /// <summary>Incompatible bits this implementation understands (others make the image unopenable).</summary>
    public const Qcow2IncompatibleFeatures KnownIncompatible =
        Qcow2IncompatibleFeatures.Dirty | Qcow2IncompatibleFeatures.Corrupt |
        Qcow2IncompatibleFeatures.ExternalDataFile | Qcow2IncompatibleFeatures.CompressionType |
        Qcow2IncompatibleFeatures.ExtendedL2;

    /// <summary>Quick probe: does the buffer start with the qcow2 magic?</summary>
    public static bool HasMagic(ReadOnlySpan<byte> data) =>
        data.Length >= 4 && BinaryPrimitives.ReadUInt32BigEndian(data) == Magic;

    /// <summary>Parses and validates the header. <paramref name="fileLength"/> bounds table offsets.</summary>
    public static Qcow2Header Parse(ReadOnlySpan<byte> data)
    {
        if (data.Length < 4 || BinaryPrimitives.ReadUInt32BigEndian(data) != Magic)
            throw new ImageFormatException("Image is not in qcow2 format");
        if (data.Length < V2HeaderLength)
            throw new ImageFormatException("qcow2 header too short");
        uint version = BinaryPrimitives.ReadUInt32BigEndian(data[4..]);
        if (version is not (2 or 3))
            throw new ImageFormatException($"Unsupported qcow2 version {version}");

        var h = new Qcow2Header
        {
            Version = version,
            BackingFileOffset = BinaryPrimitives.ReadUInt64BigEndian(data[8..]),
            BackingFileSize = BinaryPrimitives.ReadUInt32BigEndian(data[16..]),
            ClusterBits = (int)BinaryPrimitives.ReadUInt32BigEndian(data[20..]),
            Size = BinaryPrimitives.ReadUInt64BigEndian(data[24..]),
            CryptMethod = BinaryPrimitives.ReadUInt32BigEndian(data[32..]),
            L1Size = BinaryPrimitives.ReadUInt32BigEndian(data[36..]),
            L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(data[40..]),
            RefcountTableOffset = BinaryPrimitives.ReadUInt64BigEndian(data[48..]),
            RefcountTableClusters = BinaryPrimitives.ReadUInt32BigEndian(data[56..]),
            NbSnapshots = BinaryPrimitives.ReadUInt32BigEndian(data[60..]),
            SnapshotsOffset = BinaryPrimitives.ReadUInt64BigEndian(data[64..]),
            RefcountOrder = 4,
            HeaderLength = V2HeaderLength,
        };
        if (version == 3)
        {
            if (data.Length < V3MinHeaderLength)
                throw new ImageFormatException("qcow2 header too short");
            uint headerLength = BinaryPrimitives.ReadUInt32BigEndian(data[100..]);
            if (headerLength < V3MinHeaderLength || headerLength % 8 != 0)
                throw new ImageFormatException($"qcow2 header length {headerLength} is invalid");
            if (data.Length < Math.Min(headerLength, 112))
                throw new ImageFormatException("qcow2 header too short");
            h = h with
            {
                IncompatibleFeatures = (Qcow2IncompatibleFeatures)BinaryPrimitives.ReadUInt64BigEndian(data[72..]),
                CompatibleFeatures = (Qcow2CompatibleFeatures)BinaryPrimitives.ReadUInt64BigEndian(data[80..]),
                AutoclearFeatures = (Qcow2AutoclearFeatures)BinaryPrimitives.ReadUInt64BigEndian(data[88..]),
                RefcountOrder = (int)BinaryPrimitives.ReadUInt32BigEndian(data[96..]),
                HeaderLength = headerLength,
                CompressionType = headerLength > 104 ? (Qcow2CompressionType)data[104] : Qcow2CompressionType.Deflate,
            };
        }
        h.Validate();
        return h;
    }

    /// <summary>Checks the rules that do not need the rest of the file.</summary>
    /// <summary>Refuses incompatible features this reader does not know, naming them from the image's own feature
    /// name table (header extension) where it has them, as QEMU reports them: the table's names in its order, then
    /// the bits left as one hex mask. Checked once the header extensions are read.</summary>
    public void ThrowIfUnsupportedFeatures(IReadOnlyList<Qcow2FeatureName> featureNames)
    {
        ulong unknown = (ulong)(IncompatibleFeatures & ~KnownIncompatible);
        if (unknown == 0) return;
        var parts = new List<string>();
        foreach (var f in featureNames)
        {
            if (f.Kind != 0 || f.Bit >= 64 || (unknown & (1UL << f.Bit)) == 0) continue;
            parts.Add(f.Name);
            unknown &= ~(1UL << f.Bit);
        }
        if (unknown != 0) parts.Add($"Unknown incompatible feature: {unknown:x}");
        throw new ImageFormatException($"Unsupported qcow2 feature(s): {string.Join(", ", parts)}");
    }

    public void Validate()
    {
        if (ClusterBits < MinClusterBits || ClusterBits > MaxClusterBits)
            throw new ImageFormatException($"Unsupported cluster size: 2^{ClusterBits}");
        if (RefcountOrder < 0 || RefcountOrder > 6)
            throw new ImageFormatException($"Reference count entry width too large; may not exceed 64 bits (order {RefcountOrder})");
        if (Size > long.MaxValue / 2)
            throw new ImageFormatException($"Image size {Size} is too large");
        if (BackingFileSize > MaxBackingFileSize)
            throw new ImageFormatException("Backing file name too long");
        if (BackingFileOffset != 0 && BackingFileOffset + BackingFileSize > (ulong)ClusterSize)
            throw new ImageFormatException("Backing file name is not inside the first cluster");
        if (L1TableOffset > MaxHostOffset || RefcountTableOffset > MaxHostOffset || SnapshotsOffset > MaxHostOffset)
            throw new ImageFormatException("Table offset lies beyond the largest possible host offset");
        if (L1TableOffset % (ulong)ClusterSize != 0)
            throw new ImageFormatException("Active L1 table offset invalid");
        if (RefcountTableOffset % (ulong)ClusterSize != 0 || RefcountTableOffset == 0)
            throw new ImageFormatException("Refcount table offset invalid");
        if (RefcountTableClusters == 0)
            throw new ImageFormatException("Image does not contain a reference count table");
        if (RefcountTableClusters > MaxRefcountTableBytes >> ClusterBits)
            throw new ImageFormatException("Reference count table too large");
        if (L1Size > MaxL1Entries)
            throw new ImageFormatException("Active L1 table too large");
        long l2Entries = ClusterSize / 8;
        ulong needL1 = (ulong)((((long)Size + ClusterSize - 1) / ClusterSize + l2Entries - 1) / l2Entries);
        if (needL1 > int.MaxValue)
            throw new ImageFormatException("Image is too big");
        if (L1Size < needL1)
            throw new ImageFormatException("L1 table is too small");
        if (HeaderLength > (ulong)ClusterSize)
            throw new ImageFormatException("qcow2 header exceeds cluster size");
        bool ctBit = (IncompatibleFeatures & Qcow2IncompatibleFeatures.CompressionType) != 0;
        if (CompressionType is not (Qcow2CompressionType.Deflate or Qcow2CompressionType.Zstd))
            throw new ImageFormatException($"Unknown compression type {(byte)CompressionType}");
        if (ctBit != (CompressionType != Qcow2CompressionType.Deflate))
            throw new ImageFormatException("Compression type incompatible feature bit does not match the compression type field");
        if (Version == 2 && CompressionType != Qcow2CompressionType.Deflate)
            throw new ImageFormatException("qcow2 v2 images cannot use zstd compression");
    }

    /// <summary>Writes the header into <paramref name="dest"/> (at least HeaderLength bytes).</summary>
    public void Write(Span<byte> dest)
    {
        int len = Version == 2 ? V2HeaderLength : (int)HeaderLength;
        dest[..len].Clear();
        BinaryPrimitives.WriteUInt32BigEndian(dest, Magic);
        BinaryPrimitives.WriteUInt32BigEndian(dest[4..], Version);
        BinaryPrimitives.WriteUInt64BigEndian(dest[8..], BackingFileOffset);
        BinaryPrimitives.WriteUInt32BigEndian(dest[16..], BackingFileSize);
        BinaryPrimitives.WriteUInt32BigEndian(dest[20..], (uint)ClusterBits);
        BinaryPrimitives.WriteUInt64BigEndian(dest[24..], Size);
        BinaryPrimitives.WriteUInt32BigEndian(dest[32..], CryptMethod);
        BinaryPrimitives.WriteUInt32BigEndian(dest[36..], L1Size);
        BinaryPrimitives.WriteUInt64BigEndian(dest[40..], L1TableOffset);
        BinaryPrimitives.WriteUInt64BigEndian(dest[48..], RefcountTableOffset);
        BinaryPrimitives.WriteUInt32BigEndian(dest[56..], RefcountTableClusters);
        BinaryPrimitives.WriteUInt32BigEndian(dest[60..], NbSnapshots);
        BinaryPrimitives.WriteUInt64BigEndian(dest[64..], SnapshotsOffset);
        if (Version == 2) return;
        BinaryPrimitives.WriteUInt64BigEndian(dest[72..], (ulong)IncompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(dest[80..], (ulong)CompatibleFeatures);
        BinaryPrimitives.WriteUInt64BigEndian(dest[88..], (ulong)AutoclearFeatures);
        BinaryPrimitives.WriteUInt32BigEndian(dest[96..], (uint)RefcountOrder);
        BinaryPrimitives.WriteUInt32BigEndian(dest[100..], HeaderLength);
        if (HeaderLength > 104) dest[104] = (byte)CompressionType;
    }

    public int WrittenLength => Version == 2 ? V2HeaderLength : (int)HeaderLength;
}
