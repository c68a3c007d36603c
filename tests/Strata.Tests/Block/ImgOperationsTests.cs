using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>The pure parts of the img operations: qemu-img's sparse detection, measure's size formula, compare's
/// read errors.</summary>
public class ImgOperationsTests
{
    private static byte[] Sectors(params bool[] data)
    {
        var buffer = new byte[data.Length * 512];
        for (int i = 0; i < data.Length; i++)
            if (data[i]) buffer[i * 512 + 7] = 1;
        return buffer;
    }

    [Fact]
    public void SparseDetection_ZeroRunShorterThanMinimum_IsWrittenWithTheData()
    {
        // data, 2 zero sectors, data, then 8 zero sectors: with -S 4k (8 sectors) only the last run is a hole.
        var buffer = Sectors(true, false, false, true, false, false, false, false, false, false, false, false);
        int first = SparseDetection.NextRun(buffer, 0, 4096, out bool data);
        Assert.True(data);
        // The data run ends on the 8-sector grid (4 KiB), where the long zero run starts.
        Assert.Equal(8 * 512, first);
        int second = SparseDetection.NextRun(buffer.AsSpan(first), first, 4096, out bool secondData);
        Assert.False(secondData);
        Assert.Equal(4 * 512, second);
    }

    [Fact]
    public void SparseDetection_AllZero_IsOneHole()
    {
        var buffer = new byte[64 * 1024];
        Assert.Equal(buffer.Length, SparseDetection.NextRun(buffer, 1 << 20, 4096, out bool data));
        Assert.False(data);
    }

    [Theory]
    // Values qemu-img measure prints (QEMU 7.2, checked on this machine).
    [InlineData(1L << 30, 65536, 4, false, 1074135040L)]
    [InlineData(1L << 20, 65536, 4, false, 1376256L)]
    [InlineData(3000L * 1024, 65536, 4, false, 3407872L)]
    [InlineData(2L << 40, 65536, 4, false, 2199359062016L)]
    [InlineData(2L << 40, 2 << 20, 4, false, 2199042129920L)]
    public void Measure_FullyAllocatedQcow2_MatchesQemu(long size, int cluster, int refcountOrder, bool extendedL2, long expected) =>
        Assert.Equal(expected, ImageMeasure.FullyAllocatedQcow2(size, cluster, refcountOrder, extendedL2));

    [Fact]
    public void Compare_ReadError_NamesTheImageAndChunk()
    {
        using var t = new TempDir();
        using (var a = Qcow2Image.Create(t["a.qcow2"], new Qcow2CreateOptions { Size = 8 << 20 })) a.Write(4096, new byte[] { 1, 2, 3 });
        using (var b = Qcow2Image.Create(t["b.qcow2"], new Qcow2CreateOptions { Size = 8 << 20 })) b.Write(4096, new byte[] { 1, 2, 3 });
        using var first = (Qcow2Image)ImageOpener.Open(t["a.qcow2"]);
        using var second = ImageOpener.Open(t["b.qcow2"]);
        ChainStatus.Get(first, 0, first.Size); // the L2 table is cached: only the data read fails
        first.File.Faults = new Blkdebug([], [new BlkdebugErrorRule("read_aio", 5, null, null, Once: false)]);
        var e = Assert.Throws<CompareReadException>(() => ImageComparer.Compare(first, second, strict: false));
        Assert.True(e.InFirstImage);
        Assert.Equal(0, e.Offset);
        Assert.Equal("Input/output error", e.Message);
    }
}
