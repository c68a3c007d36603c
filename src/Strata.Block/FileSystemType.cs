using System.Runtime.InteropServices;

namespace Strata.Block;

/// <summary>The filesystem a path lives on, by statfs(2)'s f_type magic: some of our choices (whether
/// copy_file_range copies or clones, whether reserving space before a write pays) depend on it.</summary>
public static partial class FileSystemType
{
    /// <summary>ext2, ext3 and ext4 share one magic.</summary>
    public const long Ext = 0xEF53;
    public const long Tmpfs = 0x01021994;
    public const long F2fs = 0xF2F52010;

    /// <summary>f_type of the filesystem holding <paramref name="path"/>, or 0 when it cannot be asked.</summary>
    public static long Of(string path)
    {
        // struct statfs (x86-64 and arm64 alike): f_type is its first member, a long; the whole struct is 120 bytes.
        Span<byte> buffer = stackalloc byte[256];
        if (statfs(path, ref MemoryMarshal.GetReference(buffer)) != 0) return 0;
        return MemoryMarshal.Read<long>(buffer);
    }

    [LibraryImport("libc", StringMarshalling = StringMarshalling.Utf8, SetLastError = true)]
    private static partial int statfs(string path, ref byte buffer);
}
