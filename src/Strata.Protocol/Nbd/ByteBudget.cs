namespace Strata.Protocol.Nbd;

/// <summary>Bytes of data buffers held by a connection's admitted requests. One waiter only: the request
/// reader, which admits requests one at a time.</summary>
internal sealed class ByteBudget(long limit)
{
    private readonly object _lock = new();
    private readonly SemaphoreSlim _released = new(0);
    private long _used;
    private bool _waiting;

    /// <summary>Waits until <paramref name="bytes"/> fit; a request larger than the whole budget waits until
    /// nothing else holds any.</summary>
    public async ValueTask AcquireAsync(long bytes, CancellationToken ct)
    {
        while (true)
        {
            lock (_lock)
            {
                if (_used == 0 || _used + bytes <= limit)
                {
                    _used += bytes;
                    _waiting = false;
                    return;
                }
                _waiting = true;
            }
            await _released.WaitAsync(ct);
        }
    }

    public void Release(long bytes)
    {
        bool wake;
        lock (_lock)
        {
            _used -= bytes;
            wake = _waiting;
            _waiting = false;
        }
        if (wake) _released.Release();
    }
}
