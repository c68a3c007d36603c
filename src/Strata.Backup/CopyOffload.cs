using Strata.Block;

namespace Strata.Backup;

/// <summary>
/// Whether a push asks the source's job to copy with copy_file_range(2) (QEMU's x-perf.use-copy-range). Asked only
/// where that call copies: on a filesystem that shares extents (XFS with reflink, btrfs, ZFS, bcachefs, OCFS2; over
/// NFS or SMB the server decides) the kernel clones instead, and a point would share its blocks with the live disk
/// image, each of the guest's later writes there a copy-on-write of the image. So: the repository on a filesystem
/// known to copy (ext2/3/4, tmpfs, f2fs), the source on this host (its view of the repository is this one).
/// </summary>
internal static class CopyOffload
{
    /// <summary>True for a directory on a filesystem whose copy_file_range always copies.</summary>
    public static bool Copies(string directory) =>
        FileSystemType.Of(directory) is FileSystemType.Ext or FileSystemType.Tmpfs or FileSystemType.F2fs;
}
