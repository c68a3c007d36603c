using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Strata.Backup;

/// <summary>fsync(2) of what the repository makes durable: directories (their entries) and files written by others.</summary>
internal static partial class Durability
{
    private const int O_RDONLY = 0, O_DIRECTORY = 0x10000, O_CLOEXEC = 0x80000;

    /// <summary>
    /// A rename or a new name is on disk only once its directory is. Without it, a power cut after a run reported
    /// success could take the new point's manifest away while the source's bitmap already moved on, and the next
    /// incremental, built on the point before, would miss what the lost point held.
    /// </summary>
    public static void SyncDirectory(string directory)
    {
        int fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0) throw new IOException($"cannot open '{directory}' to make its entries durable: {Marshal.GetLastPInvokeErrorMessage()}");
        try
        {
            if (fsync(fd) != 0) throw new IOException($"cannot make the entries of '{directory}' durable: {Marshal.GetLastPInvokeErrorMessage()}");
        }
        finally
        {
            close(fd);
        }
    }

    /// <summary>A file's data and metadata on disk, through a descriptor the caller has held since before the file was
    /// written: it reports any write-back error since its opening (<paramref name="path"/> names the file in the error).</summary>
    public static void SyncFile(SafeFileHandle file, string path)
    {
        bool added = false;
        try
        {
            file.DangerousAddRef(ref added);
            if (fsync((int)file.DangerousGetHandle()) != 0)
                throw new IOException($"cannot make '{path}' durable: {Marshal.GetLastPInvokeErrorMessage()}");
        }
        finally
        {
            if (added) file.DangerousRelease();
        }
    }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport("libc")]
    private static partial int close(int fd);
}
