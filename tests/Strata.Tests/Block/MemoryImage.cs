using Strata.Block;
using Strata.Block.Bitmaps;

namespace Strata.Tests.Block;

/// <summary>A disk in a byte array behind the real request path (checks, in flight, copy-before-write, dirty
/// marking): what the in-process job and copy-before-write tests write to and read from. Writes can be made to fail.</summary>
internal sealed class MemoryImage : BlockImage
{
    private readonly byte[] _data;
    private readonly object _lock = new();

    public MemoryImage(long size, string name = "memory")
    {
        _data = new byte[size];
        FileName = name;
        Bitmaps = new BitmapSet(size, 65536);
    }

    /// <summary>When set, every driver write fails with this errno (as a host error would, through the request path).</summary>
    public int? FailWritesWith { get; set; }

    /// <summary>When set, driver writes that start at this offset fail with EIO.</summary>
    public long? FailWritesAt { get; set; }

    public int DriverWrites;

    /// <summary>Runs at the start of every data write (not zero writes), with its offset: a test holds or counts copies there.</summary>
    public Action<long>? BeforeDriverWrite { get; set; }

    /// <summary>Holds the <paramref name="nth"/> data write at a gate: it sets <c>Reached</c>, then waits for <c>Open</c>.</summary>
    public (ManualResetEventSlim Reached, ManualResetEventSlim Open) HoldWrite(int nth)
    {
        var reached = new ManualResetEventSlim();
        var open = new ManualResetEventSlim();
        int writes = 0;
        BeforeDriverWrite = _ =>
        {
            if (Interlocked.Increment(ref writes) != nth) return;
            reached.Set();
            open.Wait();
        };
        return (reached, open);
    }

    public override string FormatName => "memory";
    public override long Size => _data.Length;
    public override bool ReadOnly => false;
    public override string FileName { get; }

    /// <summary>The bytes as they are, read around the request path.</summary>
    public byte[] Bytes(long offset, int length)
    {
        lock (_lock) return _data.AsSpan((int)offset, length).ToArray();
    }

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        lock (_lock) _data.AsSpan((int)offset, buffer.Length).CopyTo(buffer);
    }

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
        BeforeDriverWrite?.Invoke(offset);
        Interlocked.Increment(ref DriverWrites);
        if (FailWritesWith is { } errno) throw new BlockIOException(BlockIOException.Describe(errno), errno);
        if (FailWritesAt == offset) throw new BlockIOException(BlockIOException.Describe(5), 5);
        lock (_lock) data.CopyTo(_data.AsSpan((int)offset));
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap)
    {
        Interlocked.Increment(ref DriverWrites);
        if (FailWritesWith is { } errno) throw new BlockIOException(BlockIOException.Describe(errno), errno);
        if (FailWritesAt == offset) throw new BlockIOException(BlockIOException.Describe(5), 5);
        lock (_lock) _data.AsSpan((int)offset, (int)length).Clear();
    }

    protected override void DriverDiscard(long offset, long length) => DriverWriteZeroes(offset, length, true);
    protected override void DriverFlush() { }
    public override LayerExtent GetLayerStatus(long offset, long maxLength) => new(offset, maxLength, LayerState.Data, -1);
    public override void Resize(long newSize) => throw new BlockException("memory images keep their size");

    public static byte[] Filled(byte value, int length) => Enumerable.Repeat(value, length).ToArray();
}

/// <summary>Records a job manager's typed events in order, and waits for one to come.</summary>
internal sealed class JobEventRecorder
{
    private readonly List<Strata.Block.Jobs.JobEvent> _events = [];

    public void Report(Strata.Block.Jobs.JobEvent e)
    {
        lock (_events)
        {
            _events.Add(e);
            Monitor.PulseAll(_events);
        }
    }

    public List<Strata.Block.Jobs.JobEvent> Snapshot()
    {
        lock (_events) return [.. _events];
    }

    /// <summary>Waits up to 10 s for an event that matches; fails the test otherwise.</summary>
    public T WaitFor<T>(Func<T, bool>? match = null) where T : Strata.Block.Jobs.JobEvent
    {
        var deadline = DateTime.UtcNow.AddSeconds(10);
        lock (_events)
            while (true)
            {
                if (_events.OfType<T>().FirstOrDefault(e => match is null || match(e)) is { } hit) return hit;
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) throw new TimeoutException($"no {typeof(T).Name}; got: {string.Join(", ", _events)}");
                Monitor.Wait(_events, left);
            }
    }

    /// <summary>Waits for <paramref name="job"/> to reach <paramref name="status"/>.</summary>
    public void WaitForStatus(string job, Strata.Block.Jobs.JobStatus status) =>
        WaitFor<Strata.Block.Jobs.JobStatusChanged>(e => e.Job.Id == job && e.Status == status);

    /// <summary>One job's events as short words: statuses by name, other events by kind ("completed: error").</summary>
    public List<string> Story(string job) => Snapshot().Where(e => e.Job.Id == job).Select(e => e switch
    {
        Strata.Block.Jobs.JobStatusChanged s => Strata.Block.Jobs.JobTables.Name(s.Status),
        Strata.Block.Jobs.JobCompleted { Error: null } => "COMPLETED",
        Strata.Block.Jobs.JobCompleted c => $"COMPLETED({c.Error})",
        Strata.Block.Jobs.JobCancelled => "CANCELLED",
        Strata.Block.Jobs.JobPending => "PENDING",
        Strata.Block.Jobs.JobReady => "READY",
        Strata.Block.Jobs.JobIoError io => $"IO-ERROR({io.Operation},{io.Action})",
        _ => e.GetType().Name,
    }).ToList();
}
