namespace Strata.Block;

/// <summary>
/// The requests in flight on one node and its drain gate, QEMU's in_flight counter and quiesce_counter in small.
/// A request from outside the graph (an NBD client, a job's copy loop, a tool) waits at the gate while the node is
/// drained; a request made while the same thread is already inside a request (a filter passing down, a backing
/// read, copy-before-write) is part of a request in flight and passes, or a drain would wait for itself.
/// </summary>
public sealed class NodeRequests
{
    private readonly object _lock = new();
    private int _inFlight;
    private int _quiesced;
    private TaskCompletionSource _released = CompletedRelease();

    /// <summary>How deep the current thread is inside requests (of any node), plus internal scopes.</summary>
    [ThreadStatic] private static int t_depth;

    /// <summary>The threads that drained this node: their own requests pass the gate they closed (a transaction
    /// flushes, a snapshot reopens). Kept per node, not per thread, so a section ended elsewhere leaves nothing behind.</summary>
    private readonly List<int> _drainers = [];

    public int InFlight => Volatile.Read(ref _inFlight);
    public bool IsDrained => Volatile.Read(ref _quiesced) > 0;

    /// <summary>True while the current thread is inside a request or an internal scope.</summary>
    public static bool InsideRequest => t_depth > 0;

    /// <summary>Counts a request in flight; from outside the graph it first waits for the gate to open.</summary>
    public Ticket Enter()
    {
        // Counted first, checked second (and the drainer does the opposite): either the request sees the gate
        // closed, or the drainer sees the request in flight. Never neither.
        Interlocked.Increment(ref _inFlight);
        if (t_depth == 0)
            while (Volatile.Read(ref _quiesced) > 0)
            {
                int me = Environment.CurrentManagedThreadId;
                lock (_lock)
                    if (_drainers.Contains(me)) break;
                Exit();
                lock (_lock)
                    while (_quiesced > 0 && !_drainers.Contains(me)) Monitor.Wait(_lock);
                Interlocked.Increment(ref _inFlight);
            }
        t_depth++;
        return new Ticket(this);
    }

    /// <summary>
    /// Admits a request from a user outside the graph that will run its I/O later, elsewhere (an NBD export, QEMU's
    /// BlockBackend): counted in flight from now until <see cref="LeaveAdmitted"/>, so a drain waits for it; false
    /// (nothing counted) while the node is drained — wait for <see cref="WhileDrainedAsync"/> and try again. The I/O
    /// of an admitted request runs in an <see cref="Internal"/> scope: it must not wait at the gate it already passed.
    /// </summary>
    public bool TryAdmit()
    {
        Interlocked.Increment(ref _inFlight);
        if (Volatile.Read(ref _quiesced) == 0) return true;
        Exit();
        return false;
    }

    public void LeaveAdmitted() => Exit();

    private void Exit()
    {
        if (Interlocked.Decrement(ref _inFlight) == 0 && Volatile.Read(ref _quiesced) > 0)
            lock (_lock) Monitor.PulseAll(_lock);
    }

    public readonly struct Ticket(NodeRequests owner) : IDisposable
    {
        public void Dispose()
        {
            t_depth--;
            owner.Exit();
        }
    }

    /// <summary>
    /// Marks the current thread as working inside the graph until disposed (on the same thread): its requests pass
    /// drained gates. Jobs use it around a copy they took after <see cref="WhileDrainedAsync"/>, since a drain may
    /// wait for a guest write that waits for that copy.
    /// </summary>
    public static InternalScope Internal()
    {
        t_depth++;
        return new InternalScope();
    }

    public readonly struct InternalScope : IDisposable
    {
        public void Dispose() => t_depth--;
    }

    /// <summary>Completes once the node is not drained (at once when it is not): a job's pause point.</summary>
    public Task WhileDrainedAsync()
    {
        if (Volatile.Read(ref _quiesced) == 0) return Task.CompletedTask;
        lock (_lock) return _released.Task;
    }

    internal void Quiesce(int drainer)
    {
        lock (_lock)
        {
            if (_quiesced++ == 0) _released = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _drainers.Add(drainer);
        }
        Interlocked.MemoryBarrier();
    }

    /// <summary>Waits until nothing is in flight; false when <paramref name="deadline"/> passed first.</summary>
    internal bool WaitIdle(DateTime deadline)
    {
        lock (_lock)
            while (Volatile.Read(ref _inFlight) > 0)
            {
                var left = deadline - DateTime.UtcNow;
                if (left <= TimeSpan.Zero) return false;
                Monitor.Wait(_lock, left > TimeSpan.FromHours(1) ? TimeSpan.FromHours(1) : left);
            }
        return true;
    }

    internal void Release(int drainer)
    {
        TaskCompletionSource? released = null;
        lock (_lock)
        {
            _drainers.Remove(drainer);
            if (--_quiesced == 0)
            {
                released = _released;
                Monitor.PulseAll(_lock);
            }
        }
        released?.TrySetResult();
    }

    private static TaskCompletionSource CompletedRelease()
    {
        var done = new TaskCompletionSource();
        done.SetResult();
        return done;
    }

}

/// <summary>
/// A drained section (QEMU's bdrv_drained_begin/end): the nodes given, every node above them (parents, recursively)
/// and every node below them hold new requests from outside the graph, and nothing is in flight on any of them
/// until it is disposed. The thread that drains may still issue requests itself (a transaction flushes, a
/// snapshot reopens), so it is the only one that does.
/// </summary>
public sealed class DrainedSection : IDisposable
{
    private readonly BlockImage[] _nodes;
    private readonly int _drainer;
    private bool _ended;

    private DrainedSection(BlockImage[] nodes, int drainer)
    {
        _nodes = nodes;
        _drainer = drainer;
    }

    public IReadOnlyList<BlockImage> Nodes => _nodes;

    /// <summary>Drains <paramref name="roots"/> and what is above and below them; with a <paramref name="timeout"/>, a
    /// request still in flight when it passes is left to finish on its own (for closing, not for a point in time).</summary>
    /// <param name="drainerPasses">Whether the calling thread's own requests pass the closed gates: true for a
    /// section that begins and ends on one thread (a QMP command); false for one held across awaits, whose thread
    /// goes on to do other work meanwhile.</param>
    public static DrainedSection Begin(IEnumerable<BlockImage> roots, TimeSpan? timeout = null, bool drainerPasses = true)
    {
        if (NodeRequests.InsideRequest)
            throw new InvalidOperationException("A drain cannot begin inside a request: it would wait for itself");
        var nodes = new List<BlockImage>();
        var seen = new HashSet<BlockImage>(ReferenceEqualityComparer.Instance);
        void Up(BlockImage n)
        {
            if (!seen.Add(n)) return;
            nodes.Add(n);
            foreach (var p in n.Parents) Up(p);
        }
        void Down(BlockImage n)
        {
            foreach (var c in n.Children)
            {
                if (seen.Add(c)) nodes.Add(c);
                Down(c);
            }
        }
        var rootList = roots.ToList();
        foreach (var r in rootList) Up(r);
        foreach (var r in rootList) Down(r);
        int drainer = drainerPasses ? Environment.CurrentManagedThreadId : -1;
        foreach (var n in nodes) n.Requests.Quiesce(drainer);
        var deadline = timeout is { } t ? DateTime.UtcNow + t : DateTime.MaxValue;
        foreach (var n in nodes) n.Requests.WaitIdle(deadline);
        return new DrainedSection([.. nodes], drainer);
    }

    public void Dispose()
    {
        if (_ended) return;
        _ended = true;
        foreach (var n in _nodes) n.Requests.Release(_drainer);
    }
}

/// <summary>Turns what the host throws (IOException with its errno, permission errors) into block errors.</summary>
public static class HostError
{
    public static bool IsHostError(Exception e) => e is IOException or UnauthorizedAccessException;

    /// <summary>The errno behind a host exception: .NET on Unix puts it in HResult for errors it has no type for.</summary>
    public static int ErrnoOf(Exception e) => e switch
    {
        UnauthorizedAccessException => 1, // .NET's name for EACCES and EPERM alike: "not permitted" (NBD has no EACCES)
        IOException io when io.HResult is > 0 and < 4096 => io.HResult,
        _ => 5,
    };

    public static BlockIOException ToBlockError(Exception e, string operation)
    {
        // QEMU reports an I/O error as strerror alone (a job's error, an NBD error message): .NET's message adds the path.
        int errno = ErrnoOf(e);
        return new BlockIOException(BlockIOException.Describe(errno), errno) { Operation = operation };
    }
}
