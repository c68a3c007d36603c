using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace Strata.Block;

/// <summary>
/// A host file accessed with positional I/O only (pread/pwrite), so any number of threads can use it
/// at once. This is the protocol layer under every format driver.
/// </summary>
public sealed partial class HostFile : IDisposable
{
    private readonly SafeFileHandle _handle;
    private long _length;

    public string Path { get; }
    public bool ReadOnly { get; }

    /// <summary>Opened with O_DIRECT (QEMU's cache.direct=on): I/O bypasses the page cache, and requests that are
    /// not aligned to <see cref="DirectAlignment"/> go through an aligned bounce buffer (read-modify-write).</summary>
    public bool Direct { get; }

    public const int DirectAlignment = 4096;

    /// <summary>Serialises the read-modify-write of partial blocks under O_DIRECT: two small writes into one block
    /// must not undo each other.</summary>
    private readonly object[] _blockLocks = Enumerable.Range(0, 64).Select(_ => new object()).ToArray();

    /// <summary>When false, <see cref="Flush"/> does nothing (qemu's cache=unsafe): ordering of writes is
    /// kept, durability against power loss is not.</summary>
    public bool FlushEnabled { get; set; } = true;

    private HostFile(string path, SafeFileHandle handle, bool readOnly, bool direct = false)
    {
        Path = path;
        _handle = handle;
        ReadOnly = readOnly;
        Direct = direct;
        _length = RandomAccess.GetLength(handle);
    }

    public static HostFile Open(string path, bool readOnly, bool direct = false)
    {
        try
        {
            var handle = File.OpenHandle(path, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite,
                FileShare.ReadWrite | FileShare.Delete);
            if (direct) return new HostFile(path, ReopenDirect(path, handle, readOnly), readOnly, direct: true);
            return new HostFile(path, handle, readOnly);
        }
        catch (FileNotFoundException)
        {
            throw new BlockException($"Could not open '{path}': No such file or directory");
        }
        catch (DirectoryNotFoundException)
        {
            throw new BlockException($"Could not open '{path}': No such file or directory");
        }
        catch (Exception e) when ((e is IOException or UnauthorizedAccessException) && Directory.Exists(path))
        {
            throw new BlockException($"'file' driver requires '{path}' to be a regular file");
        }
        catch (UnauthorizedAccessException)
        {
            throw new BlockException($"Could not open '{path}': Permission denied");
        }
    }

    /// <summary>What creating a file claims, as QEMU's file driver does: it writes and sizes the file, so an image
    /// another process uses (and keeps writers off) is refused before a byte of it is cut.</summary>
    public static readonly LockClaim CreateClaim = new(BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.Resize);

    /// <summary>Creates (or empties) a file for a new image. The existing file is only truncated once its image
    /// locks show nobody else is using it.</summary>
    public static HostFile Create(string path)
    {
        HostFile file;
        try
        {
            var handle = File.OpenHandle(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
            file = new HostFile(path, handle, false);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BlockException($"Could not create '{path}': {e.Message}");
        }
        try
        {
            file.SetLockClaim(CreateClaim);
            file.SetLength(0);
            return file;
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    public long Length => Interlocked.Read(ref _length);

    /// <summary>The same file opened again with O_DIRECT (after the normal open has produced QEMU's error messages).</summary>
    private static SafeFileHandle ReopenDirect(string path, SafeFileHandle plain, bool readOnly)
    {
        plain.Dispose();
        const int O_RDONLY = 0, O_RDWR = 2, O_DIRECT = 0x4000, O_CLOEXEC = 0x80000;
        int fd = open(path, (readOnly ? O_RDONLY : O_RDWR) | O_DIRECT | O_CLOEXEC, 0);
        if (fd < 0) throw new BlockException($"Could not open '{path}': O_DIRECT refused (errno {Marshal.GetLastPInvokeError()})");
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    private static bool Aligned(long offset, int length, ReadOnlySpan<byte> buffer)
    {
        unsafe
        {
            fixed (byte* p = buffer)
                return (offset | (long)length | (long)p) % DirectAlignment == 0;
        }
    }

    /// <summary>O_DIRECT and unaligned: read the covering aligned blocks into a bounce buffer.</summary>
    private unsafe void ReadBounced(long offset, Span<byte> buffer)
    {
        long start = offset & ~(long)(DirectAlignment - 1);
        int span = checked((int)(((offset + buffer.Length + DirectAlignment - 1) & ~(long)(DirectAlignment - 1)) - start));
        byte* bounce = (byte*)NativeMemory.AlignedAlloc((nuint)span, DirectAlignment);
        try
        {
            var b = new Span<byte>(bounce, span);
            int got = ReadFully(start, b);
            b[got..].Clear();
            b.Slice((int)(offset - start), buffer.Length).CopyTo(buffer);
        }
        finally
        {
            NativeMemory.AlignedFree(bounce);
        }
    }

    /// <summary>O_DIRECT and unaligned: the data goes through an aligned bounce buffer; partial first and last blocks
    /// are read, merged and written back under a lock (read-modify-write); past the file's end the block is
    /// written whole, and the file is cut back to its logical length when closed. An aligned request from an unaligned buffer is only copied.</summary>
    private unsafe void WriteBounced(long offset, ReadOnlySpan<byte> data)
    {
        const long A = DirectAlignment;
        long start = offset & ~(A - 1), stop = offset + data.Length;
        long end = (stop + A - 1) & ~(A - 1);
        int span = checked((int)(end - start));
        bool headPartial = offset != start, tailPartial = stop != end;
        object? headLock = headPartial ? _blockLocks[start / A % _blockLocks.Length] : null;
        object? tailLock = tailPartial ? _blockLocks[(end - 1) / A % _blockLocks.Length] : null;
        if (tailLock == headLock) tailLock = null;
        byte* bounce = (byte*)NativeMemory.AlignedAlloc((nuint)span, (nuint)A);
        bool tookHead = false, tookTail = false;
        try
        {
            if (headLock is not null) Monitor.Enter(headLock, ref tookHead);
            if (tailLock is not null) Monitor.Enter(tailLock, ref tookTail);
            var b = new Span<byte>(bounce, span);
            if (headPartial) b[ReadFully(start, b[..(int)A])..(int)A].Clear();
            if (tailPartial && (!headPartial || span > A))
            {
                var last = b[(span - (int)A)..];
                last[ReadFully(end - A, last)..].Clear();
            }
            data.CopyTo(b[(int)(offset - start)..]);
            RandomAccess.Write(_handle, (ReadOnlySpan<byte>)b, start);
        }
        finally
        {
            if (tookTail) Monitor.Exit(tailLock!);
            if (tookHead) Monitor.Exit(headLock!);
            NativeMemory.AlignedFree(bounce);
        }
    }

    private int ReadFully(long offset, Span<byte> buffer)
    {
        int done = 0;
        while (done < buffer.Length)
        {
            int n = RandomAccess.Read(_handle, buffer[done..], offset + done);
            if (n <= 0) break;
            done += n;
        }
        return done;
    }

    /// <summary>Fault injection for tests (a blkdebug node). Format drivers raise read_aio / write_aio for guest data
    /// only, as QEMU's qcow2 does, and their metadata events through <see cref="DebugEvent"/>; flushes raise
    /// flush_to_disk here. Every read, write and flush then meets the rules those events armed.</summary>
    public Blkdebug? Faults { get; set; }

    private volatile bool _writtenSinceFlush;

    /// <summary>A format driver's blkdebug event (QEMU's BLKDBG_EVENT on bs->file); nothing without blkdebug.</summary>
    public void DebugEvent(string name)
    {
        if (Faults is null) return;
        if (CachedReads.Active) CachedReads.ThrowIfActive(); // an attempt that may be redone fires no event
        Faults.Event(name);
    }

    /// <summary>Runs before each guest-data read or write of this file (after its mapping was decided), as blkdebug's
    /// suspend points do in QEMU: tests hold a request there to widen a race window on purpose.</summary>
    public Action<bool, long, long>? BeforeDataIo { get; set; }

    public void DataEvent(bool write, long offset, long length)
    {
        // Hooks count and hold requests: a cached-only attempt (which may be redone) gives up before it fires them.
        if (CachedReads.Active && (Faults is not null || BeforeDataIo is not null)) CachedReads.ThrowIfActive();
        Faults?.Event(write ? "write_aio" : "read_aio", offset, length);
        BeforeDataIo?.Invoke(write, offset, length);
    }

    /// <summary>Reads up to buffer.Length bytes; bytes past the end of the file read as zeros. Host errors leave as
    /// <see cref="BlockIOException"/> with their errno.</summary>
    public void Read(long offset, Span<byte> buffer)
    {
        if (offset < 0 || offset > long.MaxValue - buffer.Length)
            throw new BlockException($"'{Path}': read at invalid offset {offset} (corrupt metadata?)");
        if (CachedReads.Active)
        {
            ReadCachedOnly(offset, buffer);
            return;
        }
        Faults?.CheckIo(offset, buffer.Length);
        try
        {
            ReadCore(offset, buffer);
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "read");
        }
    }

    private const int RWF_NOWAIT = 0x8, EOPNOTSUPP = 95, EINVAL = 22, ENOSYS = 38, EPERM = 1;
    private volatile bool _noWaitUnsupported;

    /// <summary>Whether a <see cref="CachedReads"/> read of this file can be tried: not under O_DIRECT (every read goes
    /// to the device), nor once the kernel refused RWF_NOWAIT for it.</summary>
    public bool ServesNoWaitReads => !Direct && !_noWaitUnsupported;

    /// <summary>The whole range from the page cache in one preadv2(RWF_NOWAIT), or <see cref="CachedReads"/> gives up:
    /// on a page not in memory (EAGAIN), a short read (which may also be the end of the file), O_DIRECT, a
    /// fault-injection or test hook, or a kernel without RWF_NOWAIT for this file.</summary>
    private unsafe void ReadCachedOnly(long offset, Span<byte> buffer)
    {
        if (!ServesNoWaitReads || Faults is not null || BeforeDataIo is not null || buffer.IsEmpty) throw CachedReads.WouldWait();
        long n;
        bool added = false;
        try
        {
            // A reference on the handle: a close at this moment must not let the fd number name another file.
            _handle.DangerousAddRef(ref added);
            fixed (byte* p = buffer)
            {
                var iov = new IoVec { Base = p, Length = (nuint)buffer.Length };
                n = preadv2((int)_handle.DangerousGetHandle(), &iov, 1, offset, RWF_NOWAIT);
            }
        }
        catch (Exception e) when (e is ObjectDisposedException or EntryPointNotFoundException)
        {
            if (e is EntryPointNotFoundException) _noWaitUnsupported = true; // a libc without preadv2
            throw CachedReads.WouldWait();
        }
        finally
        {
            if (added) _handle.DangerousRelease();
        }
        if (n == buffer.Length) return;
        // A kernel or file system without RWF_NOWAIT for this file (or a filter refusing the call): not again.
        if (n < 0 && Marshal.GetLastPInvokeError() is EOPNOTSUPP or EINVAL or ENOSYS or EPERM) _noWaitUnsupported = true;
        throw CachedReads.WouldWait();
    }

    [StructLayout(LayoutKind.Sequential)]
    private unsafe struct IoVec
    {
        public byte* Base;
        public nuint Length;
    }

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial long preadv2(int fd, IoVec* iov, int iovcnt, long offset, int flags);

    private void ReadCore(long offset, Span<byte> buffer)
    {
        if (Direct && !Aligned(offset, buffer.Length, buffer))
        {
            ReadBounced(offset, buffer);
            return;
        }
        int done = 0;
        while (done < buffer.Length)
        {
            int n = RandomAccess.Read(_handle, buffer[done..], offset + done);
            if (n <= 0)
            {
                buffer[done..].Clear();
                return;
            }
            done += n;
        }
    }

    /// <summary>A test hook at the host-file layer: sees every change to the file's bytes and every fsync, in the
    /// order they were issued, so crash states can be rebuilt from them (what a power loss may leave).</summary>
    public IHostFileRecorder? Recorder { get; set; }

    /// <summary>Allocates each write's range (fallocate, mode 0, which also extends the file to the range's end) just
    /// before writing it. For a file being filled for the first time on ext4: a buffered write into allocated
    /// (unwritten) blocks skips delayed allocation's per-block reservations and extent-status bookkeeping, which took a
    /// third of the kernel time of writing a new file (perf: ext4_da_get_block_prep, ext4_da_reserve_space,
    /// __dquot_alloc_space), and on one inode those writes are serial. Never on for a read-only or O_DIRECT file
    /// (direct writes allocate as they go, without delayed allocation). A refusal turns it off; a lack of space leaves
    /// it on and lets the write report the error a write gives.</summary>
    public bool ReserveBeforeWrite
    {
        get => _reserveBeforeWrite;
        set => _reserveBeforeWrite = value && !ReadOnly && !Direct;
    }

    private volatile bool _reserveBeforeWrite;

    /// <summary>Ranges reserved so far (tests).</summary>
    internal long Reservations => Interlocked.Read(ref _reservations);

    private long _reservations;

    /// <summary>Whether <see cref="ReserveBeforeWrite"/> pays for this file: measured on ext4, so the filesystems of
    /// its magic (ext2/3/4; an ext3 file without extents refuses on the first call). On tmpfs fallocate would zero
    /// pages that the write then copies over.</summary>
    public bool ReservingPays => FileSystemType.Of(_handle) == FileSystemType.Ext;

    private void Reserve(long offset, int length)
    {
        const int EINTR = 4, ENOSPC = 28, EDQUOT = 122;
        // Mode 0 extends the file before the data lands: a crash in between leaves a longer file reading zeros there.
        if (offset + length > Length) Recorder?.SetLength(offset + length);
        if (fallocate((int)_handle.DangerousGetHandle(), 0, offset, length) == 0)
            Interlocked.Increment(ref _reservations);
        else if (Marshal.GetLastPInvokeError() is not (EINTR or ENOSPC or EDQUOT))
            _reserveBeforeWrite = false;
    }

    public void Write(long offset, ReadOnlySpan<byte> data)
    {
        CachedReads.ThrowIfActive(); // a read that would write (a cache writing back) is no cached-only read
        if (ReadOnly) throw new BlockException($"'{Path}' is opened read-only");
        Recorder?.Write(offset, data);
        if (offset < 0 || offset > (1L << 56))
            throw new BlockException($"'{Path}': write at invalid offset {offset} (corrupt metadata?)");
        Faults?.CheckIo(offset, data.Length);
        _writtenSinceFlush = true;
        if (_reserveBeforeWrite && data.Length > 0) Reserve(offset, data.Length);
        try
        {
            if (Direct && !Aligned(offset, data.Length, data)) WriteBounced(offset, data);
            else RandomAccess.Write(_handle, data, offset);
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "write");
        }
        long end = offset + data.Length;
        long cur;
        while (end > (cur = Interlocked.Read(ref _length)))
            if (Interlocked.CompareExchange(ref _length, end, cur) == cur) break;
    }

    public void SetLength(long length)
    {
        CachedReads.ThrowIfActive();
        if (ReadOnly) throw new BlockException($"'{Path}' is opened read-only");
        try
        {
            Recorder?.SetLength(length);
            RandomAccess.SetLength(_handle, length);
        }
        catch (Exception e) when (HostError.IsHostError(e))
        {
            throw HostError.ToBlockError(e, "write");
        }
        Interlocked.Exchange(ref _length, length);
    }

    /// <summary>fsync: everything written before is durable before anything written after.</summary>
    public void Flush()
    {
        CachedReads.ThrowIfActive();
        // As in QEMU, a flush with nothing written since the last one raises no flush_to_disk (and meets no rule).
        if (_writtenSinceFlush) Faults?.Event("flush_to_disk", 0, 0);
        _writtenSinceFlush = false;
        if (!FlushEnabled || ReadOnly) return;
        Recorder?.Flushed();
        if (fsync((int)_handle.DangerousGetHandle()) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            throw new BlockIOException($"fsync of '{Path}' failed: {BlockIOException.Describe(errno)}", errno) { Operation = "write" };
        }
    }

    /// <summary>Next data offset at or after <paramref name="offset"/> (SEEK_DATA), or -1 when none.</summary>
    public long SeekData(long offset) => Seek(offset, SeekDataWhence);

    /// <summary>Next hole at or after <paramref name="offset"/> (SEEK_HOLE); the file end counts as a hole.</summary>
    public long SeekHole(long offset) => Seek(offset, SeekHoleWhence);

    private long Seek(long offset, int whence)
    {
        // SEEK_DATA/SEEK_HOLE take the inode lock behind buffered writers and may read extent metadata (or ask an
        // NFS server): not for a read served from memory.
        CachedReads.ThrowIfActive();
        long r = lseek((int)_handle.DangerousGetHandle(), offset, whence);
        return r < 0 ? -1 : r;
    }

    /// <summary>Bytes the file takes on disk (st_blocks * 512), as qemu-img reports "disk size".</summary>
    public long AllocatedBytes
    {
        get
        {
            try
            {
                return UnixFileInfo.AllocatedBytes(Path);
            }
            catch
            {
                return Length;
            }
        }
    }

    /// <summary>Punches a hole (deallocates) so the range reads as zeros.</summary>
    public bool PunchHole(long offset, long length)
    {
        CachedReads.ThrowIfActive();
        if (ReadOnly) return false;
        const int FALLOC_FL_KEEP_SIZE = 1, FALLOC_FL_PUNCH_HOLE = 2;
        Recorder?.PunchHole(offset, length);
        return fallocate((int)_handle.DangerousGetHandle(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0;
    }

    private readonly object _lockClaimGate = new();

    /// <summary>The image-locking claim this open file holds (<see cref="FileLocks"/>); none until one is set.</summary>
    public LockClaim LockClaim { get; private set; } = LockClaim.None;

    /// <summary>Moves this file's image locks to <paramref name="claim"/>; throws <see cref="ImageLockedException"/>
    /// (keeping the old claim) when another open file's locks forbid it.</summary>
    public void SetLockClaim(LockClaim claim)
    {
        lock (_lockClaimGate)
        {
            if (claim == LockClaim) return;
            FileLocks.Move(_handle, Path, LockClaim, claim);
            LockClaim = claim;
        }
    }

    public void Dispose()
    {
        // Locks are given up explicitly, not by the close: a process forked meanwhile (by another thread, on its way to
        // exec) shares this open file description and would keep them until it execs.
        lock (_lockClaimGate)
        {
            if (LockClaim != LockClaim.None && !_handle.IsClosed)
            {
                try { FileLocks.Move(_handle, Path, LockClaim, LockClaim.None); } catch (BlockException) { }
                LockClaim = LockClaim.None;
            }
        }
        // O_DIRECT wrote whole blocks past a logical end that was not block-aligned: cut the file back.
        if (Direct && !ReadOnly && !_handle.IsClosed && RandomAccess.GetLength(_handle) > Length) RandomAccess.SetLength(_handle, Length);
        _handle.Dispose();
    }

    private const int SeekDataWhence = 3, SeekHoleWhence = 4;

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags, int mode);

    [LibraryImport("libc", SetLastError = true)]
    private static partial long lseek(int fd, long offset, int whence);

    [LibraryImport("libc", SetLastError = true)]
    private static partial int fallocate(int fd, int mode, long offset, long len);
}

/// <summary>st_blocks of a file, through statx(2): its <c>struct statx</c> has one documented layout on every
/// Linux architecture, unlike <c>struct stat</c>, and .NET has no managed API that gives the allocated size.</summary>
internal static partial class UnixFileInfo
{
    public static long AllocatedBytes(string path)
    {
        const int AT_FDCWD = -100;
        const uint STATX_BLOCKS = 0x400;
        if (statx(AT_FDCWD, path, 0, STATX_BLOCKS, out var st) != 0 || (st.Mask & STATX_BLOCKS) == 0) return 0;
        return (long)st.Blocks * 512;
    }

    /// <summary>The head of <c>struct statx</c> (linux/stat.h) up to stx_blocks; the kernel fills all 256 bytes.</summary>
    [StructLayout(LayoutKind.Sequential, Size = 256)]
    private struct Statx
    {
        public uint Mask;
        public uint BlkSize;
        public ulong Attributes;
        public uint Nlink;
        public uint Uid;
        public uint Gid;
        public ushort Mode;
        private ushort _spare0;
        public ulong Ino;
        public ulong Size;
        public ulong Blocks;
    }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, out Statx buf);
}

/// <summary>Sees what a <see cref="HostFile"/> changes, in issue order (a test hook: crash-state harnesses).</summary>
public interface IHostFileRecorder
{
    void Write(long offset, ReadOnlySpan<byte> data);
    void SetLength(long length);
    void PunchHole(long offset, long length);
    /// <summary>An fsync is issued: everything recorded before it is durable once it returns.</summary>
    void Flushed();
}
