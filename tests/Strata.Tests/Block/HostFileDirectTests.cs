using Strata.Block;

namespace Strata.Tests.Block;

/// <summary>O_DIRECT host files: unaligned requests bounce through aligned buffers, small writes into one block
/// never undo each other, and the file keeps its logical length.</summary>
public class HostFileDirectTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private string NewFile(int length, byte fill)
    {
        string path = _dir["f"];
        File.WriteAllBytes(path, Enumerable.Repeat(fill, length).ToArray());
        return path;
    }

    [Fact]
    public void UnalignedReadsAndWritesSeeTheSameBytesAsBufferedIo()
    {
        string path = NewFile(10000, 0x11);
        var expect = new byte[12288];
        File.ReadAllBytes(path).CopyTo(expect, 0);
        using (var f = HostFile.Open(path, readOnly: false, direct: true))
        {
            Assert.True(f.Direct);
            var data = Enumerable.Range(0, 300).Select(i => (byte)i).ToArray();
            f.Write(100, data);
            data.CopyTo(expect, 100);
            var aligned = Enumerable.Repeat((byte)0x22, 8192).ToArray();
            f.Write(4096, aligned);
            aligned.CopyTo(expect.AsSpan(4096));
            var back = new byte[333];
            f.Read(77, back);
            Assert.Equal(expect.AsSpan(77, 333).ToArray(), back);
            // Past the end reads zeros.
            var tail = new byte[200];
            f.Read(12188, tail);
            Assert.Equal(expect.AsSpan(12188, 100).ToArray(), tail[..100]);
            Assert.All(tail[100..], b => Assert.Equal(0, b));
        }
        Assert.Equal(12288, new FileInfo(path).Length);
        Assert.Equal(expect, File.ReadAllBytes(path));
    }

    [Fact]
    public void ConcurrentSmallWritesIntoOneBlockAllSurvive()
    {
        string path = NewFile(65536, 0);
        using (var f = HostFile.Open(path, readOnly: false, direct: true))
            Parallel.For(0, 128, new ParallelOptions { MaxDegreeOfParallelism = 8 }, i =>
                f.Write(i * 512, Enumerable.Repeat((byte)(i + 1), 512).ToArray()));
        var bytes = File.ReadAllBytes(path);
        for (int i = 0; i < 128; i++) Assert.Equal((byte)(i + 1), bytes[i * 512]);
    }

    [Fact]
    public void AWriteThatGrowsTheFileKeepsItsLogicalLength()
    {
        string path = NewFile(5000, 0x33);
        using (var f = HostFile.Open(path, readOnly: false, direct: true))
        {
            f.Write(4990, new byte[110]);
            Assert.Equal(5100, f.Length);
        }
        Assert.Equal(5100, new FileInfo(path).Length);
    }
}
