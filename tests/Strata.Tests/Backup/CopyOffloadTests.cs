using Strata.Backup;

namespace Strata.Tests.Backup;

/// <summary>Copy offload is asked for only where copy_file_range copies: the filesystem type comes from statfs.</summary>
public class CopyOffloadTests
{
    private static string FsType(string path)
    {
        var psi = new System.Diagnostics.ProcessStartInfo("stat", ["-f", "-c", "%T", path]) { RedirectStandardOutput = true };
        using var p = System.Diagnostics.Process.Start(psi)!;
        string type = p.StandardOutput.ReadToEnd().Trim();
        p.WaitForExit();
        Assert.Equal(0, p.ExitCode);
        return type;
    }

    [Fact]
    public void TmpfsCopiesAndProcfsOrAMissingFolderDoNot()
    {
        Assert.Equal("tmpfs", FsType("/dev/shm"));
        Assert.True(CopyOffload.Copies("/dev/shm"));
        Assert.False(CopyOffload.Copies("/proc"));
        Assert.False(CopyOffload.Copies("/nonexistent-" + Guid.NewGuid().ToString("N")));
    }

    /// <summary>Whatever the scratch folder's filesystem is, the answer follows its type as stat(1) names it.</summary>
    [Fact]
    public void TheAnswerFollowsTheFilesystemType()
    {
        string dir = Path.GetTempPath();
        bool copies = FsType(dir) is "ext2/ext3" or "tmpfs" or "f2fs";
        Assert.Equal(copies, CopyOffload.Copies(dir));
    }
}
