using System.Runtime.InteropServices;

namespace Strata.Backup;

/// <summary>
/// Whether a push asks the source's job to copy with copy_file_range(2) (QEMU's x-perf.use-copy-range). Asked only
/// where that call copies: on a filesystem that shares extents (XFS with reflink, btrfs, ZFS, bcachefs, OCFS2; over
/// NFS or SMB the server decides) the kernel clones instead, and a point would share its blocks with the live disk
/// image, each of the guest's later writes there a copy-on-write of the image. So: the repository on a filesystem
/// known to copy (ext2/3/4, tmpfs, f2fs), the source on this host (its view of the repository is this one).
/// </summary>
internal static partial class CopyOffload
{
    private const long Ext = 0xEF53, Tmpfs = 0x01021994, F2fs = 0xF2F52010;

    /// <summary>True for a directory on a filesystem whose copy_file_range always copies.</summary>
    public static bool Copies(string directory)
    {
        // struct statfs (x86-64 and arm64 alike): f_type is its first member, a long; the whole struct is 120 bytes.
        Span<byte> buffer = stackalloc byte[256];
        if (statfs(directory, ref MemoryMarshal.GetReference(buffer)) != 0) return false;
        return MemoryMarshal.Read<long>(buffer) is Ext or Tmpfs or F2fs;
    }

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int statfs(string path, ref byte buffer);
}
