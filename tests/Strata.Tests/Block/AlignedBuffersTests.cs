using Strata.Block;

namespace Strata.Tests.Block;

public class AlignedBuffersTests
{
    /// <summary>Sizes no job uses, so tests running alongside do not disturb the counts.</summary>
    private const int OddSize = 32 << 20;

    [Fact]
    public unsafe void BuffersAreAlignedAndReused()
    {
        using (var a = AlignedBuffers.Rent(5000))
        {
            Assert.Equal(8192, a.Memory.Length);
            using var pin = a.Memory.Pin();
            Assert.Equal(0, (long)pin.Pointer % HostFile.DirectAlignment);
        }
        // The pool is bounded: however much is returned at once, it keeps at most MaxPooledBytes idle.
        var leases = Enumerable.Range(0, (int)(AlignedBuffers.MaxPooledBytes / OddSize) + 4).Select(_ => AlignedBuffers.Rent(OddSize)).ToList();
        foreach (var l in leases) l.Memory.Span[^1] = 1; // touched: real memory
        foreach (var l in leases) l.Dispose();
        Assert.True(AlignedBuffers.PooledBytes <= AlignedBuffers.MaxPooledBytes, $"{AlignedBuffers.PooledBytes} bytes pooled");
        Assert.True(AlignedBuffers.IdleBuffers(OddSize) <= AlignedBuffers.MaxPooledBytes / OddSize);
        Assert.True(AlignedBuffers.IdleBuffers(OddSize) > 0);
        // What was idle goes back to the system on a trim.
        AlignedBuffers.Trim(TimeSpan.Zero);
        Assert.Equal(0, AlignedBuffers.IdleBuffers(OddSize));
        // A buffer larger than the pooling limit is never kept.
        using (var big = AlignedBuffers.Rent(AlignedBuffers.MaxPooledBufferSize + 1))
            Assert.Equal(AlignedBuffers.MaxPooledBufferSize + HostFile.DirectAlignment, big.Memory.Length);
        Assert.Equal(0, AlignedBuffers.IdleBuffers(AlignedBuffers.MaxPooledBufferSize + HostFile.DirectAlignment));
    }

    [Fact]
    public void ATrimKeepsRecentlyUsedBuffers()
    {
        const int size = 16 << 20;
        AlignedBuffers.Rent(size).Dispose();
        AlignedBuffers.Trim(TimeSpan.FromMinutes(5));
        Assert.True(AlignedBuffers.IdleBuffers(size) >= 1, "a buffer used a moment ago was freed");
        AlignedBuffers.Trim(TimeSpan.Zero);
        Assert.Equal(0, AlignedBuffers.IdleBuffers(size));
    }

    [Fact]
    public void ALeaseIsReturnedOnce()
    {
        var lease = AlignedBuffers.Rent(4096);
        lease.Dispose();
        lease.Dispose();
        Assert.Throws<ObjectDisposedException>(() => lease.Memory);
    }
}
