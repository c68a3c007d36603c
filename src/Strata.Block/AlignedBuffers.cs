using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace Strata.Block;

/// <summary>
/// Copy buffers aligned for O_DIRECT (4 KiB), pooled by size: a job's reads and writes through them reach an
/// O_DIRECT file without a bounce copy (managed arrays are not aligned).
/// </summary>
public static class AlignedBuffers
{
    private static readonly ConcurrentDictionary<int, ConcurrentBag<Buffer>> Pools = new();

    public static IMemoryOwner<byte> Rent(int minimumLength)
    {
        int size = Math.Max(HostFile.DirectAlignment, (int)System.Numerics.BitOperations.RoundUpToPowerOf2((uint)minimumLength));
        var bag = Pools.GetOrAdd(size, _ => new ConcurrentBag<Buffer>());
        var buffer = bag.TryTake(out var b) ? b : new Buffer(size);
        return new Lease(buffer, bag);
    }

    private sealed unsafe class Buffer : MemoryManager<byte>
    {
        private readonly byte* _pointer;
        private readonly int _length;

        public Buffer(int length)
        {
            _length = length;
            _pointer = (byte*)NativeMemory.AlignedAlloc((nuint)length, HostFile.DirectAlignment);
        }

        public override Span<byte> GetSpan() => new(_pointer, _length);
        public override MemoryHandle Pin(int elementIndex = 0) => new(_pointer + elementIndex);
        public override void Unpin() { }
        // Pooled for the life of the process: never freed.
        protected override void Dispose(bool disposing) { }
    }

    private sealed class Lease(Buffer buffer, ConcurrentBag<Buffer> home) : IMemoryOwner<byte>
    {
        private Buffer? _buffer = buffer;

        public Memory<byte> Memory => (_buffer ?? throw new ObjectDisposedException(nameof(Lease))).Memory;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _buffer, null) is { } b) home.Add(b);
        }
    }
}
