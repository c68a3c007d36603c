using System.Buffers.Binary;

namespace Strata.Formats.Qcow2;

/// <summary>What a standard L2 entry says about one guest cluster.</summary>
public enum L2EntryKind : byte
{
    /// <summary>Not allocated here: read from the backing file, or zeros.</summary>
    Unallocated = 0,
    /// <summary>Zero flag set, no host cluster.</summary>
    ZeroUnallocated = 1,
    /// <summary>Zero flag set, host cluster preallocated.</summary>
    ZeroAllocated = 2,
    /// <summary>Data in a host cluster.</summary>
    Normal = 3,
    /// <summary>Compressed data at a byte offset.</summary>
    Compressed = 4,
}

/// <summary>Bit layout of L1/L2/refcount-table entries (qcow2 spec, frozen values).</summary>
public static class Qcow2Entry
{
    public const ulong Copied = 1UL << 63;
    public const ulong CompressedFlag = 1UL << 62;
    public const ulong ZeroFlag = 1UL;
    public const ulong OffsetMask = 0x00ff_ffff_ffff_fe00UL;
    public const ulong L1ReservedMask = 0x7f00_0000_0000_01ffUL;
    public const ulong L2ReservedMask = 0x3f00_0000_0000_01feUL;
    public const ulong RefcountTableReservedMask = 0x0000_0000_0000_01ffUL;

    public static L2EntryKind Classify(ulong entry)
    {
        if ((entry & CompressedFlag) != 0) return L2EntryKind.Compressed;
        bool zero = (entry & ZeroFlag) != 0;
        ulong off = entry & OffsetMask;
        if (zero) return off == 0 ? L2EntryKind.ZeroUnallocated : L2EntryKind.ZeroAllocated;
        return off == 0 ? L2EntryKind.Unallocated : L2EntryKind.Normal;
    }

    /// <summary>As <see cref="Classify(ulong)"/>, for an image whose data clusters live in an external data file:
    /// there host offset 0 is a real cluster, told apart from "unallocated" by the COPIED flag (every data-file
    /// cluster has refcount 1, so an allocated entry always carries it).</summary>
    public static L2EntryKind Classify(ulong entry, bool externalData)
    {
        var kind = Classify(entry);
        return externalData && kind == L2EntryKind.Unallocated && (entry & Copied) != 0 ? L2EntryKind.Normal : kind;
    }

    /// <summary>Host byte offset and sector count of a compressed cluster descriptor.</summary>
    public static (long HostOffset, int Sectors) DecodeCompressed(ulong entry, int clusterBits)
    {
        int x = 62 - (clusterBits - 8);
        ulong descriptor = entry & ~(Copied | CompressedFlag);
        long host = (long)(descriptor & ((1UL << x) - 1));
        int extraSectors = (int)(descriptor >> x);
        return (host, extraSectors + 1);
    }

    /// <summary>Builds a compressed descriptor covering [hostOffset, hostOffset+compressedLength).</summary>
    public static ulong EncodeCompressed(long hostOffset, int compressedLength, int clusterBits)
    {
        int x = 62 - (clusterBits - 8);
        long lastSector = (hostOffset + compressedLength - 1) >> 9;
        long firstSector = hostOffset >> 9;
        ulong extra = (ulong)(lastSector - firstSector);
        return CompressedFlag | (extra << x) | (ulong)hostOffset;
    }

    /// <summary>Number of compressed bytes to read for a descriptor (the sector span, from the byte offset).</summary>
    public static int CompressedReadLength(long hostOffset, int sectors) =>
        (int)(sectors * 512L - (hostOffset & 511));

    public static ulong ReadEntry(ReadOnlySpan<byte> table, int index) =>
        BinaryPrimitives.ReadUInt64BigEndian(table[(index * 8)..]);

    public static void WriteEntry(Span<byte> table, int index, ulong value) =>
        BinaryPrimitives.WriteUInt64BigEndian(table[(index * 8)..], value);
}

/// <summary>
/// The second word of an extended (128-bit) L2 entry: the cluster split into 32 subclusters, bit i "subcluster i
/// is allocated" (reads from the host cluster) and bit 32+i "subcluster i reads as zeros"; neither bit set means
/// the subcluster reads from the backing file. A compressed cluster has no subclusters (its bitmap is ignored).
/// </summary>
public static class Qcow2Subclusters
{
    public const int PerCluster = 32;
    public const ulong AllAllocated = 0x0000_0000_ffff_ffffUL;
    public const ulong AllZero = 0xffff_ffff_0000_0000UL;

    /// <summary>Bytes of one L2 entry: 16 with extended entries, else 8.</summary>
    public static int EntryBytes(bool extended) => extended ? 16 : 8;

    /// <summary>Bits [first, first+count) of a 32-bit half, as a mask in the low half.</summary>
    public static ulong Range(int first, int count) =>
        count <= 0 ? 0 : ((count >= PerCluster ? 0xffff_ffffUL : (1UL << count) - 1) << first) & 0xffff_ffffUL;

    public static bool IsAllocated(ulong bitmap, int index) => (bitmap >> index & 1) != 0;
    public static bool IsZero(ulong bitmap, int index) => (bitmap >> (PerCluster + index) & 1) != 0;

    /// <summary>Subclusters marked both allocated and zero: an invalid entry (QEMU marks the image corrupt).</summary>
    public static bool HasConflict(ulong bitmap) => ((bitmap >> PerCluster) & bitmap & 0xffff_ffffUL) != 0;

    /// <summary>The bitmap with subclusters [first, first+count) made allocated (their zero bits cleared).</summary>
    public static ulong Allocate(ulong bitmap, int first, int count)
    {
        ulong mask = Range(first, count);
        return (bitmap | mask) & ~(mask << PerCluster);
    }

    /// <summary>The bitmap with subclusters [first, first+count) made to read as zeros (no longer allocated).</summary>
    public static ulong Zero(ulong bitmap, int first, int count)
    {
        ulong mask = Range(first, count);
        return (bitmap & ~mask) | (mask << PerCluster);
    }

    /// <summary>Reads entry <paramref name="index"/> of an extended L2 table: (standard word, subcluster bitmap).</summary>
    public static (ulong Entry, ulong Bitmap) ReadExtended(ReadOnlySpan<byte> table, int index) =>
        (BinaryPrimitives.ReadUInt64BigEndian(table[(index * 16)..]), BinaryPrimitives.ReadUInt64BigEndian(table[(index * 16 + 8)..]));

    public static void WriteExtended(Span<byte> table, int index, ulong entry, ulong bitmap)
    {
        BinaryPrimitives.WriteUInt64BigEndian(table[(index * 16)..], entry);
        BinaryPrimitives.WriteUInt64BigEndian(table[(index * 16 + 8)..], bitmap);
    }

    /// <summary>The standard word of an extended entry as a standard entry would read: the zero flag (bit 0) has no
    /// meaning in extended entries (the bitmap says what reads as zeros) and is ignored, as QEMU does.</summary>
    public static L2EntryKind ClassifyExtended(ulong entry) => Qcow2Entry.Classify(entry & ~Qcow2Entry.ZeroFlag);
}

/// <summary>Reads and writes refcount entries of any width (refcount_order 0..6) inside a refcount block.</summary>
public static class RefcountCodec
{
    public static ulong Get(ReadOnlySpan<byte> block, long index, int order)
    {
        switch (order)
        {
            case 4: return BinaryPrimitives.ReadUInt16BigEndian(block[(int)(index * 2)..]);
            case 3: return block[(int)index];
            case 5: return BinaryPrimitives.ReadUInt32BigEndian(block[(int)(index * 4)..]);
            case 6: return BinaryPrimitives.ReadUInt64BigEndian(block[(int)(index * 8)..]);
            default:
                int bits = 1 << order;
                long bitPos = index * bits;
                byte b = block[(int)(bitPos / 8)];
                return (ulong)((b >> (int)(bitPos % 8)) & ((1 << bits) - 1));
        }
    }

    public static void Set(Span<byte> block, long index, int order, ulong value)
    {
        switch (order)
        {
            case 4: BinaryPrimitives.WriteUInt16BigEndian(block[(int)(index * 2)..], (ushort)value); return;
            case 3: block[(int)index] = (byte)value; return;
            case 5: BinaryPrimitives.WriteUInt32BigEndian(block[(int)(index * 4)..], (uint)value); return;
            case 6: BinaryPrimitives.WriteUInt64BigEndian(block[(int)(index * 8)..], value); return;
            default:
                int bits = 1 << order;
                long bitPos = index * bits;
                int mask = ((1 << bits) - 1) << (int)(bitPos % 8);
                ref byte b = ref block[(int)(bitPos / 8)];
                b = (byte)((b & ~mask) | (((int)value << (int)(bitPos % 8)) & mask));
                return;
        }
    }

    public static ulong MaxValue(int order) => order == 6 ? ulong.MaxValue : (1UL << (1 << order)) - 1;
}
