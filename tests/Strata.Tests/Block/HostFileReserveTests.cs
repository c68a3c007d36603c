using Strata.Block;
using Strata.Block.Operations;

namespace Strata.Tests.Block;

/// <summary>Space reserved just before each write (fallocate) for files filled for the first time: the bytes and the
/// holes must come out as plain writes leave them, and a file that refuses is written without.</summary>
public class HostFileReserveTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static byte[] Pattern(int length, byte seed) => Enumerable.Range(0, length).Select(i => (byte)(i * 31 + seed)).ToArray();

    [Fact]
    public void ReservedWritesReadBackAndAllocateOnlyTheirOwnRanges()
    {
        string path = _dir["reserved"];
        using var file = HostFile.Create(path);
        file.ReserveBeforeWrite = true;
        var head = Pattern(1 << 20, 3);
        var tail = Pattern(4096, 7);
        file.Write(0, head);
        file.Write(32 << 20, tail);
        file.Flush();
        Assert.True(file.ReserveBeforeWrite, "the scratch folder's filesystem refused fallocate");

        Assert.Equal((32 << 20) + 4096, file.Length);
        Assert.Equal((32 << 20) + 4096, new FileInfo(path).Length);
        var back = new byte[head.Length];
        file.Read(0, back);
        Assert.Equal(head, back);
        var backTail = new byte[tail.Length];
        file.Read(32 << 20, backTail);
        Assert.Equal(tail, backTail);
        // Nothing reserved between the two writes: the hole is still a hole.
        Assert.Equal(1 << 20, file.SeekHole(0));
        Assert.Equal(32 << 20, file.SeekData(1 << 20));
        Assert.InRange(file.AllocatedBytes, (1 << 20) + 4096, (1 << 20) + (1 << 16));
    }

    [Fact]
    public void AFileThatRefusesReservingIsWrittenWithout()
    {
        // fallocate(2) on a character device fails (ENODEV); the write itself is fine.
        using var file = HostFile.Open("/dev/null", readOnly: false);
        file.ReserveBeforeWrite = true;
        file.Write(0, Pattern(8192, 1));
        Assert.False(file.ReserveBeforeWrite);
    }

    [Fact]
    public void AReadOnlyFileIsNeverReserving()
    {
        string path = _dir["ro"];
        File.WriteAllBytes(path, Pattern(4096, 2));
        using var file = HostFile.Open(path, readOnly: true);
        file.ReserveBeforeWrite = true;
        Assert.False(file.ReserveBeforeWrite);
    }

    [Fact]
    public void ReservingPaysOnExtOnly()
    {
        Assert.False(HostFile.ReservingPays("/dev/shm/x"));
        Assert.Equal(FileSystemType.Of(_dir.Path) == FileSystemType.Ext, HostFile.ReservingPays(_dir["x"]));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AConvertReservesAFreshTargetOnlyAndKeepsItsZerosAsHoles(bool fresh)
    {
        const long size = 8 << 20;
        var source = new MemoryImage(size);
        source.Write(0, Pattern(1 << 20, 5));
        source.Write(5 << 20, Pattern(64 << 10, 9));
        string path = _dir["target.raw"];
        using var target = RawImage.Create(path, size);

        ImageConverter.Convert([source], target, new ConvertOptions { TargetIsZeroed = fresh });

        Assert.Equal(fresh && HostFile.ReservingPays(path), target.File.ReserveBeforeWrite);
        var expected = new byte[size];
        var actual = new byte[size];
        source.Read(0, expected);
        target.Read(0, actual);
        Assert.Equal(expected, actual);
        if (fresh)
        {
            // The zeros between the data were left out, not reserved.
            Assert.Equal(1 << 20, target.File.SeekHole(0));
            Assert.Equal(5 << 20, target.File.SeekData(1 << 20));
            Assert.Equal((5 << 20) + (64 << 10), target.File.SeekHole(5 << 20));
        }
    }
}
