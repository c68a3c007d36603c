using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Qcow2;

/// <summary>Flags of a bitmap directory entry (frozen on-disk values).</summary>
[Flags]
public enum BitmapFlags : uint
{
    None = 0,
    InUse = 1 << 0,
    Auto = 1 << 1,
    ExtraDataCompatible = 1 << 2,
}

/// <summary>The 24-byte data of the bitmaps header extension.</summary>
public readonly record struct BitmapsExtension(uint NbBitmaps, ulong DirectorySize, ulong DirectoryOffset)
{
    public const int Length = 24;
    public const uint MaxBitmaps = 65535;
    public const ulong MaxDirectorySize = 64UL << 20;

    public static BitmapsExtension Parse(ReadOnlySpan<byte> data)
    {
        if (data.Length < Length) throw new ImageFormatException("Bitmaps header extension is too short");
        return new BitmapsExtension(
            BinaryPrimitives.ReadUInt32BigEndian(data),
            BinaryPrimitives.ReadUInt64BigEndian(data[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(data[16..]));
    }

    public byte[] Encode()
    {
        var b = new byte[Length];
        BinaryPrimitives.WriteUInt32BigEndian(b, NbBitmaps);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(8), DirectorySize);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(16), DirectoryOffset);
        return b;
    }
}

/// <summary>A bitmap directory entry breaks the rules QEMU checks on open: the image is refused, read-only too.</summary>
public sealed class BitmapConstraintException(string message) : Exception(message);

/// <summary>One bitmap directory entry.</summary>
public sealed record BitmapDirectoryEntry(ulong TableOffset, uint TableSize, BitmapFlags Flags, byte Type, byte GranularityBits, string Name, byte[] ExtraData)
{
    public const byte DirtyTrackingType = 1;
    public const uint MaxTableSize = 0x8000000;
    public const long MaxBitmapBytes = 0x20000000;
    /// <summary>QEMU rejects any flag outside in_use and auto.</summary>
    public const uint ReservedFlagsMask = 0xfffffffc;
    /// <summary>Bits that must be zero in a bitmap table entry.</summary>
    public const ulong TableEntryReservedMask = 0xff000000000001feUL;

    public long Granularity => 1L << GranularityBits;

    public int EncodedSize => (24 + ExtraData.Length + Encoding.UTF8.GetByteCount(Name) + 7) & ~7;

    /// <summary>Parses a directory of <paramref name="count"/> entries and checks each as QEMU does.</summary>
    public static List<BitmapDirectoryEntry> ParseDirectory(ReadOnlySpan<byte> dir, uint count, long clusterSize, long diskSize)
    {
        if (count == 0 || count > BitmapsExtension.MaxBitmaps)
            throw new ImageFormatException($"Invalid number of bitmaps: {count}");
        var list = new List<BitmapDirectoryEntry>();
        var names = new HashSet<string>(StringComparer.Ordinal);
        int pos = 0;
        for (uint i = 0; i < count; i++)
        {
            if (pos + 24 > dir.Length) throw new ImageFormatException("Bitmap directory is truncated");
            var e = dir[pos..];
            ulong tableOffset = BinaryPrimitives.ReadUInt64BigEndian(e);
            uint tableSize = BinaryPrimitives.ReadUInt32BigEndian(e[8..]);
            uint flags = BinaryPrimitives.ReadUInt32BigEndian(e[12..]);
            byte type = e[16];
            byte gbits = e[17];
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(e[18..]);
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(e[20..]);
            if (extraSize > (uint)(dir.Length - pos - 24)) throw new ImageFormatException("Bitmap directory entry overruns the directory");
            int size = (int)((24 + extraSize + (uint)nameSize + 7) & ~7u);
            if (pos + size > dir.Length) throw new ImageFormatException("Bitmap directory entry overruns the directory");
            string name;
            try
            {
                name = new UTF8Encoding(false, throwOnInvalidBytes: true).GetString(e.Slice(24 + (int)extraSize, nameSize));
            }
            catch (DecoderFallbackException)
            {
                throw new ImageFormatException($"Bitmap {i}: name is not valid UTF-8");
            }
            var entry = new BitmapDirectoryEntry(tableOffset, tableSize, (BitmapFlags)flags, type, gbits, name, e.Slice(24, (int)extraSize).ToArray());
            entry.Validate(clusterSize, diskSize);
            if (!names.Add(name)) throw new ImageFormatException($"Bitmap '{name}' appears twice in the bitmap directory");
            list.Add(entry);
            pos += size;
        }
        return list;
    }

    private void Validate(long clusterSize, long diskSize)
    {
        string who = $"Bitmap '{Name}'";
        if (Name.Length == 0 || Encoding.UTF8.GetByteCount(Name) > 1023) throw new ImageFormatException($"{who}: invalid name length");
        // What QEMU checks of every entry on open: an image breaking any of these is not opened at all.
        bool broken = TableSize == 0 || TableOffset == 0 || TableOffset % (ulong)clusterSize != 0 || TableOffset > Qcow2Header.MaxHostOffset ||
                      TableSize > MaxTableSize || TableSize * clusterSize > MaxBitmapBytes ||
                      GranularityBits < 9 || GranularityBits > 31 || ((uint)Flags & ReservedFlagsMask) != 0 || Type != DirtyTrackingType ||
                      ((Flags & BitmapFlags.InUse) == 0 && TableSize < RequiredTableSize(diskSize, Granularity, clusterSize));
        if (broken) throw new BitmapConstraintException($"{who} doesn't satisfy the constraints");
        if (ExtraData.Length != 0) throw new ImageFormatException($"{who}: Bitmap extra data is not supported");
    }

    /// <summary>Table entries needed: one per cluster of bitmap data.</summary>
    public static long RequiredTableSize(long diskSize, long granularity, long clusterSize)
    {
        long bits = (diskSize + granularity - 1) / granularity;
        long bytes = (bits + 7) / 8;
        return (bytes + clusterSize - 1) / clusterSize;
    }

    public static byte[] EncodeDirectory(IReadOnlyList<BitmapDirectoryEntry> entries)
    {
        var bytes = new byte[entries.Sum(e => e.EncodedSize)];
        int pos = 0;
        foreach (var e in entries)
        {
            var s = bytes.AsSpan(pos);
            BinaryPrimitives.WriteUInt64BigEndian(s, e.TableOffset);
            BinaryPrimitives.WriteUInt32BigEndian(s[8..], e.TableSize);
            BinaryPrimitives.WriteUInt32BigEndian(s[12..], (uint)e.Flags);
            s[16] = e.Type;
            s[17] = e.GranularityBits;
            var name = Encoding.UTF8.GetBytes(e.Name);
            BinaryPrimitives.WriteUInt16BigEndian(s[18..], (ushort)name.Length);
            BinaryPrimitives.WriteUInt32BigEndian(s[20..], (uint)e.ExtraData.Length);
            e.ExtraData.CopyTo(s[24..]);
            name.CopyTo(s[(24 + e.ExtraData.Length)..]);
            pos += e.EncodedSize;
        }
        return bytes;
    }
}
