using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Qcow2;

/// <summary>One entry of the qcow2 internal snapshot table.</summary>
public sealed record Qcow2Snapshot
{
    public ulong L1TableOffset { get; init; }
    public uint L1Size { get; init; }
    public string Id { get; init; } = "";
    public string Name { get; init; } = "";
    public uint DateSeconds { get; init; }
    public uint DateNanoseconds { get; init; }
    public ulong VmClockNanoseconds { get; init; }
    /// <summary>The 64-bit VM state size from the extra data (the 32-bit header field when there is none).</summary>
    public ulong VmStateSize { get; init; }
    /// <summary>The guest disk size when the snapshot was taken (the image's size when the entry does not say).</summary>
    public ulong DiskSize { get; init; }
    /// <summary>Instruction count for record/replay; ulong.MaxValue ("-1") when the entry has none.</summary>
    public ulong Icount { get; init; } = ulong.MaxValue;
    /// <summary>Size of the extra data as stored (QEMU keeps it to tell incomplete entries apart).</summary>
    public uint ExtraDataSize { get; init; } = Qcow2SnapshotTable.KnownExtraDataSize;
    /// <summary>Extra data past the fields known here: kept and written back as it was.</summary>
    public byte[] UnknownExtraData { get; init; } = [];
}

/// <summary>
/// The snapshot table codec: entries are 8-byte aligned, each a 40-byte header, extra data (64-bit VM state size,
/// disk size, icount, then anything newer), the ID string and the name. Pure functions over spans.
/// </summary>
public static class Qcow2SnapshotTable
{
    /// <summary>QEMU's limits (QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOTS_SIZE, QCOW_MAX_SNAPSHOT_EXTRA_DATA).</summary>
    public const int MaxSnapshots = 65536;
    public const long MaxTableSize = 64L << 20;
    public const int MaxExtraData = 1024;
    public const int HeaderSize = 40;
    /// <summary>vm_state_size_large, disk_size and icount: what QEMU 7.2 writes.</summary>
    public const int KnownExtraDataSize = 24;
    /// <summary>Up to disk_size: entries of version-3 images with less are incomplete.</summary>
    public const int MinV3ExtraDataSize = 16;

    /// <summary>Validates the table's place as QEMU does on open (before reading it).</summary>
    public static void ValidateLocation(uint count, ulong offset, long clusterSize)
    {
        if (count > MaxSnapshots) throw new ImageFormatException("Snapshot table too large");
        ulong bytes = (ulong)count * HeaderSize;
        if (offset > (ulong)long.MaxValue - bytes || (offset & (ulong)(clusterSize - 1)) != 0)
            throw new ImageFormatException("Snapshot table offset invalid");
    }

    /// <summary>
    /// Parses <paramref name="count"/> entries from <paramref name="table"/> (the bytes at the table offset; may be
    /// longer than the table). Returns the entries and the table's length in bytes. Entries with no disk size get
    /// <paramref name="defaultDiskSize"/>.
    /// </summary>
    public static (List<Qcow2Snapshot> Snapshots, long Size) Parse(ReadOnlySpan<byte> table, uint count, ulong defaultDiskSize) =>
        Parse(table, count, defaultDiskSize, repair: null);

    /// <summary>What <see cref="ParseRepairing"/> dropped to make a table readable, with QEMU's messages.</summary>
    public sealed class Repairs
    {
        public List<string> Messages { get; } = new();
        /// <summary>Entries whose extra data was cut to <see cref="MaxExtraData"/> bytes.</summary>
        public int ExtraDataDropped { get; set; }
        /// <summary>Entries dropped off the end because the table would be larger than <see cref="MaxTableSize"/>.</summary>
        public int Overhanging { get; set; }
    }

    /// <summary>
    /// Parses as <c>check -r all</c> reads a broken table: extra data over the limit is cut to the limit, and the
    /// entries from the first one that ends past the table size limit on are dropped (as QEMU's repair does).
    /// </summary>
    public static (List<Qcow2Snapshot> Snapshots, long Size) ParseRepairing(ReadOnlySpan<byte> table, uint count, ulong defaultDiskSize,
        Repairs repairs) => Parse(table, count, defaultDiskSize, repairs);

    private static (List<Qcow2Snapshot> Snapshots, long Size) Parse(ReadOnlySpan<byte> table, uint count, ulong defaultDiskSize,
        Repairs? repair)
    {
        var list = new List<Qcow2Snapshot>((int)Math.Min(count, 1024));
        long pos = 0;
        long tableLength = 0; // the table's length as it will be written: cut extra data counts with its new size
        for (int i = 0; i < count; i++)
        {
            long entryStart = pos;
            pos = (pos + 7) & ~7L;
            tableLength = (tableLength + 7) & ~7L;
            var h = Slice(table, pos, HeaderSize);
            uint extraSize = BinaryPrimitives.ReadUInt32BigEndian(h[36..]);
            uint keptExtraSize = extraSize;
            if (extraSize > MaxExtraData)
            {
                if (repair is null)
                    throw new ImageFormatException($"Too much extra metadata in snapshot table entry {i}\n" +
                                                   "You can force-remove this extra metadata with qemu-img check -r all");
                repair.Messages.Add($"Discarding too much extra metadata in snapshot table entry {i} ({extraSize} > {MaxExtraData})");
                repair.ExtraDataDropped++;
                keptExtraSize = MaxExtraData;
            }
            int idSize = BinaryPrimitives.ReadUInt16BigEndian(h[12..]);
            int nameSize = BinaryPrimitives.ReadUInt16BigEndian(h[14..]);
            var extra = Slice(table, pos + HeaderSize, (int)keptExtraSize);
            ulong vmState = BinaryPrimitives.ReadUInt32BigEndian(h[32..]);
            if (extraSize >= 8) vmState = BinaryPrimitives.ReadUInt64BigEndian(extra);
            ulong diskSize = extraSize >= 16 ? BinaryPrimitives.ReadUInt64BigEndian(extra[8..]) : defaultDiskSize;
            ulong icount = extraSize >= 24 ? BinaryPrimitives.ReadUInt64BigEndian(extra[16..]) : ulong.MaxValue;
            long strings = pos + HeaderSize + extraSize;
            var id = Slice(table, strings, idSize);
            var name = Slice(table, strings + idSize, nameSize);
            pos = strings + idSize + nameSize;
            tableLength += HeaderSize + keptExtraSize + idSize + nameSize;
            if (tableLength > MaxTableSize || pos > int.MaxValue)
            {
                if (repair is null)
                    throw new ImageFormatException("Snapshot table is too big\n" +
                                                   $"You can force-remove all {count - i} overhanging snapshots with qemu-img check -r all");
                repair.Messages.Add($"Discarding {count - i} overhanging snapshots (snapshot table is too big)");
                repair.Overhanging += (int)(count - i);
                pos = entryStart;
                break;
            }
            list.Add(new Qcow2Snapshot
            {
                L1TableOffset = BinaryPrimitives.ReadUInt64BigEndian(h),
                L1Size = BinaryPrimitives.ReadUInt32BigEndian(h[8..]),
                DateSeconds = BinaryPrimitives.ReadUInt32BigEndian(h[16..]),
                DateNanoseconds = BinaryPrimitives.ReadUInt32BigEndian(h[20..]),
                VmClockNanoseconds = BinaryPrimitives.ReadUInt64BigEndian(h[24..]),
                VmStateSize = vmState,
                DiskSize = diskSize,
                Icount = icount,
                ExtraDataSize = keptExtraSize,
                UnknownExtraData = keptExtraSize > KnownExtraDataSize ? extra[KnownExtraDataSize..].ToArray() : [],
                Id = CString(id),
                Name = CString(name),
            });
        }
        return (list, pos);
    }

    /// <summary>QEMU keeps IDs and names as C strings: they end at the first NUL.</summary>
    private static string CString(ReadOnlySpan<byte> bytes)
    {
        int nul = bytes.IndexOf((byte)0);
        return Encoding.UTF8.GetString(nul < 0 ? bytes : bytes[..nul]);
    }

    private static ReadOnlySpan<byte> Slice(ReadOnlySpan<byte> table, long offset, int length)
    {
        if (offset + length > table.Length) throw new ImageFormatException("Snapshot table lies past the end of the file");
        return table.Slice((int)offset, length);
    }

    /// <summary>Bytes one entry takes when written (without the alignment before it).</summary>
    private static long EntrySize(Qcow2Snapshot s) =>
        HeaderSize + KnownExtraDataSize + s.UnknownExtraData.Length + Encoding.UTF8.GetByteCount(s.Id) + Encoding.UTF8.GetByteCount(s.Name);

    /// <summary>The table's size in bytes once written (QEMU's snapshots_size: no padding after the last entry).</summary>
    public static long EncodedSize(IReadOnlyList<Qcow2Snapshot> snapshots)
    {
        long pos = 0;
        foreach (var s in snapshots) pos = ((pos + 7) & ~7L) + EntrySize(s);
        return pos;
    }

    /// <summary>Encodes the table as QEMU writes it: full extra data for every entry, unknown extra data kept.</summary>
    public static byte[] Encode(IReadOnlyList<Qcow2Snapshot> snapshots)
    {
        var bytes = new byte[EncodedSize(snapshots)];
        long pos = 0;
        foreach (var s in snapshots)
        {
            pos = (pos + 7) & ~7L;
            var h = bytes.AsSpan((int)pos);
            var id = Encoding.UTF8.GetBytes(s.Id);
            var name = Encoding.UTF8.GetBytes(s.Name);
            int extraSize = KnownExtraDataSize + s.UnknownExtraData.Length;
            BinaryPrimitives.WriteUInt64BigEndian(h, s.L1TableOffset);
            BinaryPrimitives.WriteUInt32BigEndian(h[8..], s.L1Size);
            BinaryPrimitives.WriteUInt16BigEndian(h[12..], (ushort)id.Length);
            BinaryPrimitives.WriteUInt16BigEndian(h[14..], (ushort)name.Length);
            BinaryPrimitives.WriteUInt32BigEndian(h[16..], s.DateSeconds);
            BinaryPrimitives.WriteUInt32BigEndian(h[20..], s.DateNanoseconds);
            BinaryPrimitives.WriteUInt64BigEndian(h[24..], s.VmClockNanoseconds);
            // A VM state that does not fit in 32 bits reads as "no VM state" to programs that only know the old field.
            BinaryPrimitives.WriteUInt32BigEndian(h[32..], s.VmStateSize <= uint.MaxValue ? (uint)s.VmStateSize : 0);
            BinaryPrimitives.WriteUInt32BigEndian(h[36..], (uint)extraSize);
            var extra = h[HeaderSize..];
            BinaryPrimitives.WriteUInt64BigEndian(extra, s.VmStateSize);
            BinaryPrimitives.WriteUInt64BigEndian(extra[8..], s.DiskSize);
            BinaryPrimitives.WriteUInt64BigEndian(extra[16..], s.Icount);
            s.UnknownExtraData.CopyTo(extra[KnownExtraDataSize..]);
            id.CopyTo(extra[extraSize..]);
            name.CopyTo(extra[(extraSize + id.Length)..]);
            pos += EntrySize(s);
        }
        return bytes;
    }
}
