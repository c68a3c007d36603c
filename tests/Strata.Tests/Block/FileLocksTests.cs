using Strata.Block;

namespace Strata.Tests.Block;

public class FileLocksTests
{
    [Fact]
    public void AWritableQcow2HoldsTheBytesQemuHolds() =>
        Assert.Equal([100, 101, 103, 201, 203], FileLocks.Bytes(LockClaim.Qcow2(readOnly: false)).Order());

    [Fact]
    public void TakingAPermissionSomeoneRefusesToShareNamesThatPermission()
    {
        // Another process's qcow2 reader refuses writers (byte 201 held): a writer is told it cannot get "write".
        var heldByReader = new HashSet<long>(FileLocks.Bytes(LockClaim.Qcow2(readOnly: true)));
        Assert.Equal("Failed to get \"write\" lock", FileLocks.FindConflict(LockClaim.Qcow2(readOnly: false), heldByReader.Contains));
        // Two readers get on.
        Assert.Null(FileLocks.FindConflict(LockClaim.Qcow2(readOnly: true), heldByReader.Contains));
    }

    [Fact]
    public void RefusingToShareAPermissionSomeoneHoldsNamesItAsShared()
    {
        var heldByWriter = new HashSet<long>(FileLocks.Bytes(LockClaim.Export(writable: true)));
        Assert.Equal("Failed to get shared \"write\" lock", FileLocks.FindConflict(LockClaim.Qcow2(readOnly: true), heldByWriter.Contains));
        // -U shares everything: it only needs nobody to refuse reads.
        Assert.Null(FileLocks.FindConflict(LockClaim.SharedRead, heldByWriter.Contains));
        var heldByMirrorTarget = new HashSet<long>(FileLocks.Bytes(LockClaim.MirrorTarget));
        Assert.Equal("Failed to get \"consistent read\" lock", FileLocks.FindConflict(LockClaim.SharedRead, heldByMirrorTarget.Contains));
    }

    [Fact]
    public void TheQmpTextOfALockErrorHasNoHintLine()
    {
        var e = new ImageLockedException("Failed to get \"write\" lock", "disk.qcow2");
        Assert.Equal("Failed to get \"write\" lock\nIs another process using the image [disk.qcow2]?", e.Message);
        Assert.Equal("Could not open 'disk.qcow2': Failed to get \"write\" lock", ImageLockedException.WithoutHint("Could not open 'disk.qcow2': " + e.Message));
        Assert.Equal("unrelated", ImageLockedException.WithoutHint("unrelated"));
    }

    [Fact]
    public void TwoOpenFilesOfOneImageInOneProcessExcludeEachOtherAsInQemu()
    {
        string path = Path.GetTempFileName();
        try
        {
            using var writer = HostFile.Open(path, readOnly: false);
            writer.SetLockClaim(LockClaim.Qcow2(readOnly: false));
            using var reader = HostFile.Open(path, readOnly: true);
            var e = Assert.Throws<ImageLockedException>(() => reader.SetLockClaim(LockClaim.Qcow2(readOnly: true)));
            Assert.StartsWith("Failed to get shared \"write\" lock", e.Message);
            Assert.Equal(LockClaim.None, reader.LockClaim);
            reader.SetLockClaim(LockClaim.SharedRead);
            // Giving up the write claim lets the reader take the full read claim.
            writer.SetLockClaim(LockClaim.None);
            reader.SetLockClaim(LockClaim.Qcow2(readOnly: true));
            Assert.Equal(LockClaim.Qcow2(readOnly: true), reader.LockClaim);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void CreatingOverAFileInUseLeavesItWhole()
    {
        string path = Path.GetTempFileName();
        try
        {
            File.WriteAllBytes(path, new byte[12345]);
            using (var user = HostFile.Open(path, readOnly: false))
            {
                user.SetLockClaim(LockClaim.Qcow2(readOnly: false));
                var e = Assert.Throws<ImageLockedException>(() => HostFile.Create(path));
                Assert.StartsWith("Failed to get \"write\" lock", e.Message);
                Assert.Equal(12345, new FileInfo(path).Length);
            }
            using (var created = HostFile.Create(path)) Assert.Equal(0, created.Length);
        }
        finally
        {
            File.Delete(path);
        }
    }
}
