using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Formats;

public class Qcow2SnapshotTableTests
{
    [Fact]
    public void EntriesRoundTripWithTheirUnknownExtraDataAndAlignment()
    {
        var snapshots = new List<Qcow2Snapshot>
        {
            new() { Id = "1", Name = "first", L1TableOffset = 0x70000, L1Size = 1, DateSeconds = 1_700_000_000, DateNanoseconds = 5,
                    VmClockNanoseconds = 3_600_000_000_123, VmStateSize = 5UL << 32, DiskSize = 64 << 20, Icount = 0 },
            new() { Id = "22", Name = "second", L1TableOffset = 0x90000, L1Size = 2, DiskSize = 32 << 20,
                    UnknownExtraData = "newer fields"u8.ToArray(), ExtraDataSize = 24 + 12 },
        };
        var bytes = Qcow2SnapshotTable.Encode(snapshots);
        Assert.Equal(Qcow2SnapshotTable.EncodedSize(snapshots), bytes.Length);
        // The second entry starts 8-byte aligned after the first (40 + 24 + 1 + 5 = 70 → 72).
        Assert.Equal(0x90000ul, BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(72)));
        // A VM state over 4 GiB is only in the extra data; the old 32-bit field says none.
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(32)));

        var (parsed, size) = Qcow2SnapshotTable.Parse(bytes, 2, defaultDiskSize: 1);
        Assert.Equal(bytes.Length, size);
        Assert.Equal(snapshots[0] with { ExtraDataSize = 24 }, parsed[0] with { UnknownExtraData = snapshots[0].UnknownExtraData });
        Assert.Equal("newer fields"u8.ToArray(), parsed[1].UnknownExtraData);
        Assert.Equal(36u, parsed[1].ExtraDataSize);
    }

    [Fact]
    public void ShortExtraDataTakesTheImageSizeAndNoIcount()
    {
        var entry = new byte[48];
        BinaryPrimitives.WriteUInt16BigEndian(entry.AsSpan(12), 1);   // id size
        BinaryPrimitives.WriteUInt16BigEndian(entry.AsSpan(14), 2);   // name size
        BinaryPrimitives.WriteUInt32BigEndian(entry.AsSpan(32), 77);  // 32-bit VM state size
        entry[40] = (byte)'1';
        "sn"u8.CopyTo(entry.AsSpan(41));
        var (parsed, size) = Qcow2SnapshotTable.Parse(entry, 1, defaultDiskSize: 12345);
        Assert.Equal(43, size);
        Assert.Equal(77ul, parsed[0].VmStateSize);
        Assert.Equal(12345ul, parsed[0].DiskSize);
        Assert.Equal(ulong.MaxValue, parsed[0].Icount);
        Assert.Equal(0u, parsed[0].ExtraDataSize);
    }

    [Fact]
    public void LimitsAreQemus()
    {
        var entry = new byte[64];
        BinaryPrimitives.WriteUInt32BigEndian(entry.AsSpan(36), 1025);
        var e = Assert.Throws<ImageFormatException>(() => Qcow2SnapshotTable.Parse(entry, 1, 0));
        Assert.StartsWith("Too much extra metadata in snapshot table entry 0", e.Message);
        Assert.Equal("Snapshot table too large",
            Assert.Throws<ImageFormatException>(() => Qcow2SnapshotTable.ValidateLocation(65537, 0x10000, 65536)).Message);
        Assert.Equal("Snapshot table offset invalid",
            Assert.Throws<ImageFormatException>(() => Qcow2SnapshotTable.ValidateLocation(1, 0x10200, 65536)).Message);
    }
}
