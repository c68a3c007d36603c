using System.Buffers.Binary;
using System.Numerics;

namespace Strata.Formats.Qcow2;

/// <summary>
/// Strata's write-intent record, a header extension in cluster 0 of a qcow2 image whose persistent bitmaps Strata
/// tracks crash-safely: one bit per region of the disk, set (and made durable) before the first write to that
/// region since the bitmaps were last checkpointed. It is valid only while the header's autoclear bit
/// <see cref="ValidBit"/> is set: a program that does not know the bit clears it on a read-write open, so writes
/// made by anyone else void the record and the bitmaps fall back to QEMU's rule (in_use = inconsistent).
/// Layout (big-endian): version u32, region_bits u32, generation u64, bitmap directory offset u64, regions length
/// u32, CRC-32C u32 (over the record with this field zero), then the region bits (bit i of byte i/8, LSB first).
/// </summary>
public sealed record WriteIntentRecord(ulong Generation, int RegionBits, ulong BitmapDirectoryOffset, byte[] Regions)
{
    /// <summary>"STWI": not a type QEMU knows, so QEMU keeps it verbatim when it rewrites the header.</summary>
    public const Qcow2ExtensionType ExtensionType = (Qcow2ExtensionType)0x53545749;

    /// <summary>The autoclear bit that says the record may be trusted.</summary>
    public const Qcow2AutoclearFeatures ValidBit = (Qcow2AutoclearFeatures)(1UL << 60);

    public const uint Version = 1;
    private const int FixedBytes = 32;

    /// <summary>Bytes of region bits for a disk: one bit per region, rounded up to whole 8-byte words.</summary>
    public static int RegionBytesFor(long diskSize, int regionBits)
    {
        long regions = (diskSize + (1L << regionBits) - 1) >> regionBits;
        return (int)((regions + 63) / 64 * 8);
    }

    /// <summary>The smallest region (at least 2^<paramref name="minBits"/> bytes) whose bits fit in
    /// <paramref name="maxRegionBytes"/>: the record must stay small enough to share cluster 0.</summary>
    public static int ChooseRegionBits(long diskSize, int maxRegionBytes, int minBits = 20)
    {
        int bits = minBits;
        while (RegionBytesFor(diskSize, bits) > maxRegionBytes) bits++;
        return bits;
    }

    /// <summary>A record with no region marked.</summary>
    public static WriteIntentRecord Empty(ulong generation, long diskSize, int regionBits, ulong directoryOffset) =>
        new(generation, regionBits, directoryOffset, new byte[RegionBytesFor(diskSize, regionBits)]);

    public int EncodedLength => FixedBytes + Regions.Length;

    public byte[] Encode()
    {
        var data = new byte[EncodedLength];
        BinaryPrimitives.WriteUInt32BigEndian(data, Version);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(4), (uint)RegionBits);
        BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(8), Generation);
        BinaryPrimitives.WriteUInt64BigEndian(data.AsSpan(16), BitmapDirectoryOffset);
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(24), (uint)Regions.Length);
        Regions.CopyTo(data.AsSpan(FixedBytes));
        BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(28), Crc32C(data));
        return data;
    }

    /// <summary>The record in an extension's data, or null when it is not one this version wrote whole (a torn or
    /// foreign record is never trusted).</summary>
    public static WriteIntentRecord? TryParse(ReadOnlySpan<byte> data)
    {
        if (data.Length < FixedBytes || BinaryPrimitives.ReadUInt32BigEndian(data) != Version) return null;
        uint regionBits = BinaryPrimitives.ReadUInt32BigEndian(data[4..]);
        uint length = BinaryPrimitives.ReadUInt32BigEndian(data[24..]);
        if (regionBits is < 9 or > 62 || length % 8 != 0 || length != data.Length - FixedBytes) return null;
        var copy = data.ToArray();
        uint stored = BinaryPrimitives.ReadUInt32BigEndian(copy.AsSpan(28));
        BinaryPrimitives.WriteUInt32BigEndian(copy.AsSpan(28), 0);
        if (Crc32C(copy) != stored) return null;
        return new WriteIntentRecord(BinaryPrimitives.ReadUInt64BigEndian(data[8..]), (int)regionBits,
            BinaryPrimitives.ReadUInt64BigEndian(data[16..]), copy.AsSpan(FixedBytes).ToArray());
    }

    public bool IsMarked(long region) => (Regions[region >> 3] & (1 << (int)(region & 7))) != 0;

    /// <summary>The byte ranges of the disk whose regions are marked, merged where adjacent.</summary>
    public IEnumerable<(long Offset, long Length)> MarkedRanges(long diskSize)
    {
        long regionSize = 1L << RegionBits;
        long regions = (diskSize + regionSize - 1) >> RegionBits;
        for (long r = 0; r < regions;)
        {
            if (!IsMarked(r)) { r++; continue; }
            long first = r;
            while (r < regions && IsMarked(r)) r++;
            long start = first << RegionBits;
            yield return (start, Math.Min(r << RegionBits, diskSize) - start);
        }
    }

    private static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        int i = 0;
        for (; i + 8 <= data.Length; i += 8) crc = BitOperations.Crc32C(crc, BinaryPrimitives.ReadUInt64LittleEndian(data[i..]));
        for (; i < data.Length; i++) crc = BitOperations.Crc32C(crc, data[i]);
        return ~crc;
    }
}
