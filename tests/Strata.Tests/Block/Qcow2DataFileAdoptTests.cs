using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>A new qcow2 over an existing raw disk (AdoptDataFile; blockdev-create with a data-file node): the disk's
/// bytes are never cut, zeroed or rewritten, the new image reads exactly them, and a larger disk only extends it.</summary>
public class Qcow2DataFileAdoptTests
{
    private static byte[] Pattern(int length)
    {
        var bytes = new byte[length];
        new Random(15).NextBytes(bytes);
        Array.Clear(bytes, 200_000, 300_000); // a zeroed range, which must stay as it is too
        return bytes;
    }

    [Theory]
    [InlineData(1 << 20, 1 << 20)]
    [InlineData(1 << 20, 3 << 20)]
    public void CreateAdoptsTheRawDiskAndReadsIt(int diskBytes, int size)
    {
        using var dir = new TempDir();
        var disk = Pattern(diskBytes);
        File.WriteAllBytes(dir["disk.raw"], disk);
        using (var img = Qcow2Image.Create(dir["meta.qcow2"], new Qcow2CreateOptions
               {
                   Size = size, DataFile = dir["disk.raw"], DataFileRaw = true, AdoptDataFile = true,
               }))
        {
            var read = new byte[size];
            img.Read(0, read);
            Assert.True(read.AsSpan(0, diskBytes).SequenceEqual(disk));
            Assert.True(read.AsSpan(diskBytes).IndexOfAnyExcept((byte)0) < 0);
            Assert.True(img.DataFileRaw);
        }
        var after = File.ReadAllBytes(dir["disk.raw"]);
        Assert.Equal(size, after.Length);
        Assert.True(after.AsSpan(0, diskBytes).SequenceEqual(disk));
    }

    [Fact]
    public void FormatOverAnOpenDataFileKeepsALongerDiskWhole()
    {
        using var dir = new TempDir();
        var disk = Pattern(2 << 20);
        File.WriteAllBytes(dir["disk.raw"], disk);
        File.WriteAllBytes(dir["meta.qcow2"], []);
        using (var meta = HostFile.Open(dir["meta.qcow2"], readOnly: false))
        using (var data = HostFile.Open(dir["disk.raw"], readOnly: false))
            Qcow2Image.Format(meta, new Qcow2CreateOptions { Size = 1 << 20, DataFile = dir["disk.raw"], DataFileRaw = true, AdoptDataFile = true }, data);
        // A smaller disk leaves the data file as long as it was (as QEMU's blockdev-create does).
        Assert.True(File.ReadAllBytes(dir["disk.raw"]).AsSpan().SequenceEqual(disk));
        using var img = Qcow2Image.Open(HostFile.Open(dir["meta.qcow2"], readOnly: true));
        Assert.Equal(dir["disk.raw"], img.DataFileName);
        var read = new byte[1 << 20];
        img.Read(0, read);
        Assert.True(read.AsSpan().SequenceEqual(disk.AsSpan(0, 1 << 20)));
    }
}
