using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

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
        Assert.Equal(2, file.Reservations);

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
    public void ReadOnlyAndDirectFilesAreNeverReserving()
    {
        string path = _dir["ro"];
        File.WriteAllBytes(path, Pattern(4096, 2));
        using (var file = HostFile.Open(path, readOnly: true))
        {
            file.ReserveBeforeWrite = true;
            Assert.False(file.ReserveBeforeWrite);
        }
        using (var file = HostFile.Open(path, readOnly: false, direct: true))
        {
            file.ReserveBeforeWrite = true;
            Assert.False(file.ReserveBeforeWrite);
        }
    }

    [Fact]
    public void ReservingPaysOnExtOnlyJudgedByTheFileNotItsLink()
    {
        // The scratch folder is on ext4 here and in CI: the converter tests below rely on it.
        Assert.Equal(FileSystemType.Ext, FileSystemType.Of(_dir.Path));
        string onShm = $"/dev/shm/strata-reserve-{Guid.NewGuid():N}";
        try
        {
            File.WriteAllBytes(onShm, []);
            File.CreateSymbolicLink(_dir["link"], onShm);
            using (var linked = HostFile.Open(_dir["link"], readOnly: false)) Assert.False(linked.ReservingPays);
            File.WriteAllBytes(_dir["plain"], []);
            using var plain = HostFile.Open(_dir["plain"], readOnly: false);
            Assert.True(plain.ReservingPays);
        }
        finally
        {
            File.Delete(onShm);
        }
    }

    private static MemoryImage DataAndZeros(long size)
    {
        var source = new MemoryImage(size);
        source.Write(0, Pattern(1 << 20, 5));
        source.Write(5 << 20, Pattern(64 << 10, 9));
        return source;
    }

    private static void AssertSameBytes(BlockImage expected, BlockImage actual)
    {
        var a = new byte[expected.Size];
        var b = new byte[actual.Size];
        expected.Read(0, a);
        actual.Read(0, b);
        Assert.Equal(a, b);
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void AConvertReservesAFreshRawTargetOnlyWhileItCopiesAndKeepsItsZerosAsHoles(bool fresh)
    {
        const long size = 8 << 20;
        var source = DataAndZeros(size);
        using var target = RawImage.Create(_dir["target.raw"], size);

        ImageConverter.Convert([source], target, new ConvertOptions { TargetIsZeroed = fresh });

        // One reservation per data write, none for the zeros; off again once the copy is done.
        Assert.Equal(fresh ? 2 : 0, target.File.Reservations);
        Assert.False(target.File.ReserveBeforeWrite);
        AssertSameBytes(source, target);
        // The zeros between the data were left out, not reserved.
        Assert.Equal(1 << 20, target.File.SeekHole(0));
        Assert.Equal(5 << 20, target.File.SeekData(1 << 20));
        Assert.Equal((5 << 20) + (64 << 10), target.File.SeekHole(5 << 20));
    }

    [Fact]
    public void AConvertReservesAQcow2TargetsDataFileAndNotWhenCompressing()
    {
        const long size = 8 << 20;
        var source = DataAndZeros(size);
        using (var target = Qcow2Image.Create(_dir["t.qcow2"], new Qcow2CreateOptions { Size = size, DataFile = _dir["t.data"] }))
        {
            ImageConverter.Convert([source], target, new ConvertOptions());
            Assert.True(target.DataFile!.Reservations > 0);
            Assert.False(target.DataFile.ReserveBeforeWrite || target.File.ReserveBeforeWrite);
            AssertSameBytes(source, target);
        }
        using (var target = Qcow2Image.Create(_dir["c.qcow2"], new Qcow2CreateOptions { Size = size }))
        {
            ImageConverter.Convert([source], target, new ConvertOptions { Compress = true });
            Assert.Equal(0, target.File.Reservations);
            AssertSameBytes(source, target);
        }
    }
}
