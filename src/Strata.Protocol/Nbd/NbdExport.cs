using Strata.Block;
using Strata.Block.Bitmaps;

namespace Strata.Protocol.Nbd;

/// <summary>A meta context an export offers, by the id the server gives it and its name.</summary>
public readonly record struct NbdMetaContext(uint Id, string Name);

/// <summary>One NBD export: a block image, how it may be used, and the bitmaps it offers as meta contexts.</summary>
public sealed class NbdExport
{
    public NbdExport(string id, string name, string? description, BlockImage image, bool writable, IReadOnlyList<DirtyBitmap> bitmaps, bool allocationDepth)
    {
        Id = id;
        Name = name;
        Description = description;
        Image = image;
        Writable = writable;
        Bitmaps = bitmaps;
        AllocationDepth = allocationDepth;
    }

    public string Id { get; }
    public string Name { get; }
    public string? Description { get; }
    /// <summary>The image requests go to; a mirror's switch-over points it at the target (between
    /// <see cref="DrainAsync"/> and <see cref="Resume"/>).</summary>
    public BlockImage Image { get; private set; }
    public bool Writable { get; }
    public IReadOnlyList<DirtyBitmap> Bitmaps { get; }
    public bool AllocationDepth { get; }
    /// <summary>The node's discard=unmap: without it TRIM does nothing and zero writes keep their allocation.</summary>
    public bool DiscardUnmap { get; init; }

    /// <summary>Connections currently open on this export.</summary>
    public int Connections;

    /// <summary>Of <see cref="Connections"/>, those whose client has left (NBD_CMD_DISC, end of input) and that only
    /// finish what was in flight.</summary>
    public int LeavingConnections;

    /// <summary>While every open connection is one whose client has left, waits (at most <paramref name="limit"/>)
    /// for them to close: a client that disconnects and at once deletes the export over QMP must not find it still
    /// "in use" only because the server has not finished tearing the connection down. Connections whose client has
    /// not left get <paramref name="unread"/>: the client's NBD_CMD_DISC or its hang-up may still lie unread in the
    /// socket when the QMP command arrives (QEMU reads both in one loop and sees them in order; here they race).</summary>
    public void WaitForLeavingConnections(TimeSpan limit, TimeSpan unread)
    {
        long start = Environment.TickCount64;
        long until = start + (long)limit.TotalMilliseconds, unreadUntil = start + (long)unread.TotalMilliseconds;
        while (Volatile.Read(ref Connections) is > 0 and var open)
        {
            long now = Environment.TickCount64;
            bool allLeaving = open <= Volatile.Read(ref LeavingConnections);
            if (now >= until || (!allLeaving && now >= unreadUntil)) return;
            Thread.Sleep(1);
        }
    }

    /// <summary>Set when the export is being removed: new connections are refused.</summary>
    public volatile bool ShuttingDown;

    private readonly object _gate = new();
    private int _active;
    private TaskCompletionSource _open = Completed();
    private TaskCompletionSource? _drained;

    private static TaskCompletionSource Completed()
    {
        var t = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        t.SetResult();
        return t;
    }

    /// <summary>A request starts: waits while the export is drained. Call <see cref="Leave"/> once its I/O is done
    /// (its reply need not be sent: a drain waits for the image, not for a client that reads slowly).
    /// Completes synchronously, allocating nothing, unless a drain holds requests back.</summary>
    public ValueTask EnterAsync()
    {
        lock (_gate)
            if (_open.Task.IsCompleted && TryAdmitLocked())
                return ValueTask.CompletedTask;
        return EnterWhenOpenAsync();
    }

    /// <summary>Past the export's own gate, the request is admitted to its node as well (QEMU's BlockBackend): a
    /// drain of the node waits for it, and while the node is drained it waits here, uncounted — so neither the
    /// export's hold nor a node's drain ever waits for a request stuck at the other's gate, and a request let in
    /// after a switch-over reads the export's new image. Caller holds the gate.</summary>
    private bool TryAdmitLocked()
    {
        if (!Image.Requests.TryAdmit()) return false;
        _active++;
        return true;
    }

    private async ValueTask EnterWhenOpenAsync()
    {
        while (true)
        {
            Task wait;
            lock (_gate)
            {
                if (_open.Task.IsCompleted)
                {
                    if (TryAdmitLocked()) return;
                    wait = Image.Requests.WhileDrainedAsync();
                }
                else
                {
                    wait = _open.Task;
                }
            }
            await wait;
        }
    }

    /// <summary>A request entered with <see cref="EnterAsync"/> has finished its I/O: it leaves the export and its
    /// node (the image it was admitted to: an export is retargeted only while no request is in it).</summary>
    public void Leave()
    {
        lock (_gate)
        {
            Image.Requests.LeaveAdmitted();
            if (--_active == 0) _drained?.TrySetResult();
        }
    }

    /// <summary>Holds new requests back and waits for those in flight (QEMU's drain).</summary>
    public Task DrainAsync()
    {
        lock (_gate)
        {
            if (_open.Task.IsCompleted) _open = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _drained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            if (_active == 0) _drained.TrySetResult();
            return _drained.Task;
        }
    }

    /// <summary>Points the export at another image (a mirror's target). Only while drained.</summary>
    public void Retarget(BlockImage image) => Image = image;

    private readonly List<Action> _disconnects = [];

    /// <summary>A connection serving this export says how to end it (until the returned registration is disposed).</summary>
    public IDisposable RegisterConnection(Action disconnect)
    {
        lock (_disconnects) _disconnects.Add(disconnect);
        return new Registration(() => { lock (_disconnects) _disconnects.Remove(disconnect); });
    }

    private sealed class Registration(Action remove) : IDisposable
    {
        public void Dispose() => remove();
    }

    /// <summary>block-export-del mode=hard: ends this export's connections, and only theirs (others on the same
    /// server, or still negotiating, go on).</summary>
    public void DisconnectClients()
    {
        Action[] all;
        lock (_disconnects) all = [.. _disconnects];
        foreach (var d in all) d();
    }

    /// <summary>Lets held requests go.</summary>
    public void Resume()
    {
        lock (_gate) _open.TrySetResult();
    }

    public const string BaseAllocation = "base:allocation";
    public const string AllocationDepthContext = "qemu:allocation-depth";
    public const string DirtyBitmapPrefix = "qemu:dirty-bitmap:";

    /// <summary>Every meta context with QEMU's fixed ids: base:allocation 0, allocation-depth 1, bitmaps from 2.</summary>
    public IEnumerable<NbdMetaContext> Contexts()
    {
        yield return new(0, BaseAllocation);
        if (AllocationDepth) yield return new(1, AllocationDepthContext);
        for (int i = 0; i < Bitmaps.Count; i++) yield return new((uint)(2 + i), DirtyBitmapPrefix + Bitmaps[i].Name);
    }

    /// <summary>Contexts a query names: exact names, or (when listing) the namespace wildcards "base:", "qemu:",
    /// "qemu:dirty-bitmap:".</summary>
    public IEnumerable<NbdMetaContext> Match(string query, bool listing)
    {
        foreach (var c in Contexts())
        {
            if (c.Name == query) yield return c;
            else if (listing && query.EndsWith(':') && c.Name.StartsWith(query, StringComparison.Ordinal)) yield return c;
        }
    }
}
