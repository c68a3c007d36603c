using System.Buffers;
using System.Runtime.InteropServices;

namespace Strata.Block;

/// <summary>
/// Copy buffers aligned for O_DIRECT (4 KiB), pooled by size: a job's reads and writes through them reach an
/// O_DIRECT file without a bounce copy (managed arrays are not aligned).
/// The pool is bounded: it keeps at most <see cref="MaxPooledBytes"/> of idle buffers (a returned buffer that does
/// not fit is freed), never pools buffers above <see cref="MaxPooledBufferSize"/>, and gives back to the system
/// what has been idle for <see cref="IdleLifetime"/> — a burst of large copies does not pin its memory for the life
/// of the daemon.
/// </summary>
public static class AlignedBuffers
{
    /// <summary>Rents above this size are allocated for the caller and freed when returned.</summary>
    public const int MaxPooledBufferSize = 64 << 20;

    /// <summary>Idle buffers kept, all sizes together.</summary>
    public const long MaxPooledBytes = 256L << 20;

    /// <summary>A buffer idle for this long is freed by the next trim (which runs every few seconds while
    /// anything is pooled).</summary>
    public static readonly TimeSpan IdleLifetime = TimeSpan.FromSeconds(30);

    private static readonly TimeSpan TrimPeriod = TimeSpan.FromSeconds(10);
    private static readonly object Lock = new();
    // Per size (a power of two): idle buffers, oldest first, so a rent takes the warmest and a trim the coldest.
    private static readonly Dictionary<int, List<Buffer>> Pools = new();
    private static readonly Timer TrimTimer = new(_ => Trim(IdleLifetime), null, Timeout.Infinite, Timeout.Infinite);
    private static long _pooledBytes;
    private static long _rentedBytes;
    private static bool _trimScheduled;

    /// <summary>Bytes of idle buffers held by the pool.</summary>
    public static long PooledBytes
    {
        get { lock (Lock) return _pooledBytes; }
    }

    /// <summary>Bytes of buffers rented and not yet returned.</summary>
    public static long RentedBytes => Interlocked.Read(ref _rentedBytes);

    /// <summary>Idle buffers of one pooled size (tests).</summary>
    internal static int IdleBuffers(int size)
    {
        lock (Lock) return Pools.TryGetValue(size, out var idle) ? idle.Count : 0;
    }

    public static IMemoryOwner<byte> Rent(int minimumLength)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(minimumLength);
        int size = SizeFor(minimumLength);
        Buffer? buffer = null;
        lock (Lock)
        {
            if (Pools.TryGetValue(size, out var idle) && idle.Count > 0)
            {
                buffer = idle[^1];
                idle.RemoveAt(idle.Count - 1);
                _pooledBytes -= size;
            }
        }
        buffer ??= new Buffer(size);
        Interlocked.Add(ref _rentedBytes, size);
        return new Lease(buffer);
    }

    /// <summary>Powers of two up to the pooling limit (few sizes, so buffers are reused); larger rents are rounded
    /// up to the alignment only, as they are never pooled.</summary>
    private static int SizeFor(int minimumLength)
    {
        if (minimumLength <= HostFile.DirectAlignment) return HostFile.DirectAlignment;
        if (minimumLength <= MaxPooledBufferSize) return (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)minimumLength);
        long aligned = (minimumLength + (long)HostFile.DirectAlignment - 1) / HostFile.DirectAlignment * HostFile.DirectAlignment;
        return aligned <= int.MaxValue ? (int)aligned : throw new ArgumentOutOfRangeException(nameof(minimumLength));
    }

    private static void Return(Buffer buffer)
    {
        Interlocked.Add(ref _rentedBytes, -buffer.Length);
        lock (Lock)
        {
            if (buffer.Length <= MaxPooledBufferSize && _pooledBytes + buffer.Length <= MaxPooledBytes)
            {
                if (!Pools.TryGetValue(buffer.Length, out var idle)) Pools[buffer.Length] = idle = new List<Buffer>();
                buffer.IdleSince = Environment.TickCount64;
                idle.Add(buffer);
                _pooledBytes += buffer.Length;
                if (!_trimScheduled)
                {
                    _trimScheduled = true;
                    TrimTimer.Change(TrimPeriod, TrimPeriod);
                }
                return;
            }
        }
        buffer.Free(); // over the bounds: back to the system now
    }

    /// <summary>Frees idle buffers that have not been used for <paramref name="idleFor"/> (zero: every idle buffer).</summary>
    public static void Trim(TimeSpan idleFor)
    {
        var freed = new List<Buffer>();
        long cutoff = Environment.TickCount64 - (long)idleFor.TotalMilliseconds;
        lock (Lock)
        {
            foreach (var idle in Pools.Values)
            {
                int old = 0;
                while (old < idle.Count && idle[old].IdleSince <= cutoff) old++;
                if (old == 0) continue;
                freed.AddRange(idle.GetRange(0, old));
                idle.RemoveRange(0, old);
            }
            foreach (var b in freed) _pooledBytes -= b.Length;
            if (_pooledBytes == 0 && _trimScheduled)
            {
                _trimScheduled = false;
                TrimTimer.Change(Timeout.Infinite, Timeout.Infinite);
            }
        }
        foreach (var b in freed) b.Free();
    }

    private sealed unsafe class Buffer : MemoryManager<byte>
    {
        private byte* _pointer;

        public Buffer(int length)
        {
            Length = length;
            _pointer = (byte*)NativeMemory.AlignedAlloc((nuint)length, HostFile.DirectAlignment);
        }

        public int Length { get; }
        public long IdleSince;

        public override Span<byte> GetSpan() => new(_pointer, Length);
        public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);
        public override void Unpin() { }

        // Freed only when the pool lets it go (no finalizer: a Span over it may outlive every reference to it), so a
        // lease that is never disposed leaks its buffer: dispose of the lease, never of this manager.
        protected override void Dispose(bool disposing) { }

        public void Free()
        {
            byte* p = _pointer;
            _pointer = null;
            if (p != null) NativeMemory.AlignedFree(p);
        }
    }

    private sealed class Lease(Buffer buffer) : IMemoryOwner<byte>
    {
        private Buffer? _buffer = buffer;

        public Memory<byte> Memory => (_buffer ?? throw new ObjectDisposedException(nameof(Lease))).Memory;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _buffer, null) is { } b) Return(b);
        }
    }
}
