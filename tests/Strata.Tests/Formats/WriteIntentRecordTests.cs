using Strata.Formats.Qcow2;

namespace Strata.Tests.Formats;

public class WriteIntentRecordTests
{
    [Fact]
    public void ARecordReadsBackAsWritten()
    {
        var record = WriteIntentRecord.Empty(7, 10L << 30, 24, 0x50000);
        record.Regions[0] = 0b1000_0101;
        record.Regions[^1] = 0x80;

        var parsed = WriteIntentRecord.TryParse(record.Encode())!;

        Assert.Equal((7UL, 24, 0x50000UL), (parsed.Generation, parsed.RegionBits, parsed.BitmapDirectoryOffset));
        Assert.Equal(record.Regions, parsed.Regions);
        Assert.True(parsed.IsMarked(0) && parsed.IsMarked(2) && parsed.IsMarked(7) && !parsed.IsMarked(1));
    }

    [Fact]
    public void EveryTornOrFlippedByteVoidsTheRecord()
    {
        var record = WriteIntentRecord.Empty(1, 1L << 30, 20, 0x30000);
        record.Regions[3] = 0x10;
        var bytes = record.Encode();
        for (int i = 0; i < bytes.Length; i++)
        {
            var damaged = (byte[])bytes.Clone();
            damaged[i] ^= 0x04;
            Assert.Null(WriteIntentRecord.TryParse(damaged));
        }
        Assert.Null(WriteIntentRecord.TryParse(bytes.AsSpan(0, bytes.Length - 8)));
        Assert.Null(WriteIntentRecord.TryParse(bytes.AsSpan(0, 16)));
    }

    [Fact]
    public void MarkedRegionsBecomeMergedByteRangesClippedToTheDisk()
    {
        long disk = (5L << 20) + 4096; // 5 MiB and a bit: six 1 MiB regions, the last one short
        var record = WriteIntentRecord.Empty(1, disk, 20, 0);
        foreach (long r in new long[] { 1, 2, 5 }) record.Regions[r >> 3] |= (byte)(1 << (int)(r & 7));

        Assert.Equal([(1L << 20, 2L << 20), (5L << 20, 4096L)], record.MarkedRanges(disk).ToArray());
    }

    [Theory]
    [InlineData(1L << 30, 2048, 20)]    // 1 GiB: 1024 regions of 1 MiB fit in 128 bytes
    [InlineData(1L << 40, 2048, 26)]    // 1 TiB: 16384 regions of 64 MiB = 2048 bytes
    [InlineData(3L << 40, 2048, 28)]
    public void TheRegionIsTheSmallestWhoseBitsFit(long disk, int maxBytes, int expectedBits)
    {
        int bits = WriteIntentRecord.ChooseRegionBits(disk, maxBytes);
        Assert.Equal(expectedBits, bits);
        Assert.True(WriteIntentRecord.RegionBytesFor(disk, bits) <= maxBytes);
        Assert.True(WriteIntentRecord.RegionBytesFor(disk, bits - 1) > maxBytes || bits == 20);
    }
}
