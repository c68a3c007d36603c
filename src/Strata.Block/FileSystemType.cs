using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Strata.Block;

/// <summary>The filesystem a path lives on, by statfs(2)'s f_type magic: some of our choices (whether
/// copy_file_range copies or clones, whether reserving space before a write pays) depend on it.</summary>
public static partial class FileSystemType
{
    /// <summary>ext2, ext3 and ext4 share one magic.</summary>
    public const long Ext = 0xEF53;
    public const long Tmpfs = 0x01021994;
    public const long F2fs = 0xF2F52010;

    // struct statfs (x86-64 and arm64 alike): f_type is its first member, a long; the whole struct is 120 bytes.
    private const int StatfsSize = 256;

    /// <summary>f_type of the filesystem holding <paramref name="path"/>, or 0 when it cannot be asked.</summary>
    public static long Of(string path)
    {
        Span<byte> buffer = stackalloc byte[StatfsSize];
        return statfs(path, ref MemoryMarshal.GetReference(buffer)) == 0 ? MemoryMarshal.Read<long>(buffer) : 0;
    }

    /// <summary>f_type of the filesystem an open file is on (a symlink's target, not the link's folder).</summary>
    public static long Of(SafeFileHandle file)
    {
        Span<byte> buffer = stackalloc byte[StatfsSize];
        return fstatfs((int)file.DangerousGetHandle(), ref MemoryMarshal.GetReference(buffer)) == 0 ? MemoryMarshal.Read<long>(buffer) : 0;
    }

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8)]
    private static partial int statfs(string path, ref byte buffer);

    [LibraryImport("libc")]
    private static partial int fstatfs(int fd, ref byte buffer);
}
