using System.Runtime.InteropServices;

namespace Strata.Backup;

/// <summary>
/// fsync(2) of a directory: a rename or a new name is on disk only once its directory is. Without it, a power cut
/// after a run reported success could take the new point's manifest away while the source's bitmap already moved on,
/// and the next incremental, built on the point before, would miss what the lost point held.
/// </summary>
internal static partial class DirectorySync
{
    private const int O_RDONLY = 0, O_DIRECTORY = 0x10000, O_CLOEXEC = 0x80000;

    public static void Sync(string directory)
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

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport("libc")]
    private static partial int close(int fd);
}
