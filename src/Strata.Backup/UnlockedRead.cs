using System.Runtime.InteropServices;
using System.Text;

namespace Strata.Backup;

/// <summary>
/// Reads a small file with open(2) and read(2) alone. Every open through .NET takes an advisory flock (shared for
/// reading), which is refused while another process holds the exclusive one: the repository's lock file, whose pid
/// is what a run kept out by that lock has to report.
/// </summary>
internal static partial class UnlockedRead
{
    private const int O_RDONLY = 0, O_CLOEXEC = 0x80000;

    /// <summary>The file's first <paramref name="max"/> bytes as ASCII; null when it cannot be opened or read.</summary>
    public static unsafe string? Text(string path, int max = 64)
    {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return null;
        try
        {
            byte* buffer = stackalloc byte[max];
            nint n = read(fd, buffer, max);
            return n < 0 ? null : Encoding.ASCII.GetString(buffer, (int)n);
        }
        finally
        {
            close(fd);
        }
    }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags);

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial nint read(int fd, byte* buffer, nint count);

    [LibraryImport("libc")]
    private static partial int close(int fd);
}
