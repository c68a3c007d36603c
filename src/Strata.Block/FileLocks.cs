using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Strata.Block;

/// <summary>What a user of an image does with it (QEMU's BLK_PERM_* bits, in QEMU's order: the bit index is the
/// lock byte's offset from its base).</summary>
[Flags]
public enum BlockPermissions
{
    None = 0,
    ConsistentRead = 1,
    Write = 2,
    WriteUnchanged = 4,
    Resize = 8,
    All = 15,
}

/// <summary>A user's claim on a file: the permissions it takes, and those it refuses to share with others.</summary>
public readonly record struct LockClaim(BlockPermissions Taken, BlockPermissions Unshared)
{
    public static readonly LockClaim None = new(BlockPermissions.None, BlockPermissions.None);

    /// <summary>A qcow2 node's claim on its file, whoever uses the node: metadata must not change under it, and a
    /// writable one may write and grow the file.</summary>
    public static LockClaim Qcow2(bool readOnly) => readOnly
        ? new(BlockPermissions.ConsistentRead, BlockPermissions.Write | BlockPermissions.Resize)
        : new(BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.Write | BlockPermissions.Resize);

    /// <summary>A qcow2 node's claim on its external data file: what the node's users take and refuse, passed
    /// through (the guest data is theirs), and, as QEMU measures it, a writer may grow the file while nobody else
    /// may resize it. <paramref name="users"/>: the union of the users' claims; nobody using it claims nothing
    /// but the size.</summary>
    public static LockClaim Qcow2DataFile(LockClaim users) => new(
        users.Taken | (users.Taken.HasFlag(BlockPermissions.Write) ? BlockPermissions.Resize : 0),
        users.Unshared | BlockPermissions.Resize);

    /// <summary>An NBD export: reads (and writes, if writable); the size must not change under its clients.</summary>
    public static LockClaim Export(bool writable) =>
        new(BlockPermissions.ConsistentRead | (writable ? BlockPermissions.Write : 0), BlockPermissions.Resize);

    /// <summary>A backup job's source: nobody else may change it while the point in time is copied.</summary>
    public static readonly LockClaim BackupSource = new(BlockPermissions.None, BlockPermissions.Write | BlockPermissions.Resize);
    public static readonly LockClaim BackupTarget = new(BlockPermissions.Write, BlockPermissions.Resize);
    public static readonly LockClaim MirrorSource = new(BlockPermissions.ConsistentRead, BlockPermissions.Resize);

    /// <summary>A mirror's target holds data that is not yet consistent: nobody else may read, write or resize it.</summary>
    public static readonly LockClaim MirrorTarget = new(BlockPermissions.Write, BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize);

    /// <summary>-U / force-share: read, and let everyone else do anything.</summary>
    public static readonly LockClaim SharedRead = new(BlockPermissions.ConsistentRead, BlockPermissions.None);

    public LockClaim Union(LockClaim other) => new(Taken | other.Taken, Unshared | other.Unshared);

    public static string PermissionName(BlockPermissions p) => p switch
    {
        BlockPermissions.ConsistentRead => "consistent read",
        BlockPermissions.Write => "write",
        BlockPermissions.WriteUnchanged => "write unchanged",
        BlockPermissions.Resize => "resize",
        _ => p.ToString(),
    };
}

/// <summary>
/// QEMU's image locking, so that Strata and QEMU processes keep off each other's images: open-file-description
/// locks on single bytes, a shared lock on byte 100+i for each permission i taken and on byte 200+i for each one
/// not shared. A new claim conflicts when another open file holds a byte it needs free.
/// </summary>
public static partial class FileLocks
{
    public const long PermBase = 100;
    public const long UnsharedBase = 200;

    /// <summary>Which of <paramref name="claim"/>'s needs a foreign lock probe would refuse, as QEMU words it; null
    /// when none. <paramref name="heldByOthers"/> answers whether some other open file holds the byte.</summary>
    public static string? FindConflict(LockClaim claim, Func<long, bool> heldByOthers)
    {
        for (int i = 0; i < 4; i++)
        {
            var p = (BlockPermissions)(1 << i);
            if (claim.Taken.HasFlag(p) && heldByOthers(UnsharedBase + i)) return $"Failed to get \"{LockClaim.PermissionName(p)}\" lock";
        }
        for (int i = 0; i < 4; i++)
        {
            var p = (BlockPermissions)(1 << i);
            if (!claim.Unshared.HasFlag(p)) continue;
            if (heldByOthers(PermBase + i)) return $"Failed to get shared \"{LockClaim.PermissionName(p)}\" lock";
        }
        return null;
    }

    /// <summary>The bytes a claim holds.</summary>
    public static IEnumerable<long> Bytes(LockClaim claim)
    {
        for (int i = 0; i < 4; i++)
        {
            var p = (BlockPermissions)(1 << i);
            if (claim.Taken.HasFlag(p)) yield return PermBase + i;
            if (claim.Unshared.HasFlag(p)) yield return UnsharedBase + i;
        }
    }

    /// <summary>Moves the file's locks from <paramref name="held"/> to <paramref name="wanted"/>: the union is locked
    /// first (so two processes racing for the same image cannot both win), then checked, then the surplus released.
    /// On a conflict the file is left holding <paramref name="held"/> and a <see cref="BlockException"/> says why.</summary>
    internal static void Move(SafeFileHandle handle, string displayName, LockClaim held, LockClaim wanted)
    {
        var union = held.Union(wanted);
        foreach (long b in Bytes(union).Except(Bytes(held))) SetShared(handle, b, true);
        string? conflict = FindConflict(wanted, b => HeldByOthers(handle, b));
        var keep = conflict is null ? wanted : held;
        foreach (long b in Bytes(union).Except(Bytes(keep))) SetShared(handle, b, false);
        if (conflict is not null) throw new ImageLockedException(conflict, displayName);
    }

    [StructLayout(LayoutKind.Sequential)]
    private struct Flock
    {
        public short Type;
        public short Whence;
        public long Start;
        public long Length;
        public int Pid;
    }

    private const int F_OFD_GETLK = 36, F_OFD_SETLK = 37;
    private const short F_RDLCK = 0, F_WRLCK = 1, F_UNLCK = 2;

    [LibraryImport("libc", SetLastError = true, EntryPoint = "fcntl")]
    private static partial int FcntlLock(int fd, int cmd, ref Flock lk);

    private static void SetShared(SafeFileHandle handle, long offset, bool locked)
    {
        var lk = new Flock { Type = locked ? F_RDLCK : F_UNLCK, Whence = 0, Start = offset, Length = 1 };
        // A shared lock only fails where another file holds an exclusive one, which QEMU never takes: the check
        // that follows reports the conflict in QEMU's words.
        FcntlLock((int)handle.DangerousGetHandle(), F_OFD_SETLK, ref lk);
    }

    private static bool HeldByOthers(SafeFileHandle handle, long offset)
    {
        var lk = new Flock { Type = F_WRLCK, Whence = 0, Start = offset, Length = 1 };
        if (FcntlLock((int)handle.DangerousGetHandle(), F_OFD_GETLK, ref lk) != 0) return false;
        return lk.Type != F_UNLCK;
    }
}

/// <summary>An image another process (or another node of this one) uses in a way that excludes this use. The
/// message ends with QEMU's hint line, for people; <see cref="WithoutHint"/> gives what QMP reports.</summary>
public sealed class ImageLockedException(string reason, string imageName)
    : BlockException($"{reason}{HintStart}{imageName}]?")
{
    private const string HintStart = "\nIs another process using the image [";

    /// <summary>A message (perhaps wrapped in context) without the hint line: QMP errors carry none.</summary>
    public static string WithoutHint(string message)
    {
        int at = message.IndexOf(HintStart, StringComparison.Ordinal);
        return at < 0 ? message : message[..at];
    }
}
