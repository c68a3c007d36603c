using System.Diagnostics;
using System.Globalization;
using Strata.Block;

namespace Strata.Tests.Block;

/// <summary>"disk size" comes from statx's stx_blocks: it must agree with what stat(1) reports for the same file.</summary>
public class HostFileAllocationTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private static long StatBlocksTimes512(string path)
    {
        var psi = new ProcessStartInfo("stat", ["--format=%b %B", path]) { RedirectStandardOutput = true };
        using var p = Process.Start(psi)!;
        string[] parts = p.StandardOutput.ReadToEnd().Trim().Split(' ');
        p.WaitForExit();
        return long.Parse(parts[0], CultureInfo.InvariantCulture) * long.Parse(parts[1], CultureInfo.InvariantCulture);
    }

    [Fact]
    public void AllocatedBytesAreStatsBlocksOfASparseFile()
    {
        string path = _dir["sparse"];
        using (var f = HostFile.Create(path))
        {
            f.Write(0, Enumerable.Repeat((byte)7, 1 << 20).ToArray());
            f.Write(32 << 20, Enumerable.Repeat((byte)9, 4096).ToArray());
            f.Flush();
        }
        using var file = HostFile.Open(path, readOnly: true);
        long allocated = file.AllocatedBytes;
        Assert.Equal(StatBlocksTimes512(path), allocated);
        Assert.InRange(allocated, (1 << 20) + 4096, 8 << 20);
    }

    [Fact]
    public void AMissingFileHasNoAllocatedBytes()
    {
        string path = _dir["gone"];
        using var file = HostFile.Create(path);
        File.Delete(path);
        Assert.Equal(0, file.AllocatedBytes);
    }
}
