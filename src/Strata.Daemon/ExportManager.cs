using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Formats.Json;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// The NBD server and its exports: which node each export serves, its use of that node and its lock claim, the
/// bitmaps it keeps busy, and the exports held while their node switches over to a mirror's target. The export
/// table has its own lock; changes that must fall between two QMP commands (a switch-over running in a job) also
/// take the dispatcher's.
/// </summary>
public sealed class ExportManager
{
    private readonly BlockGraph _graph;
    private readonly QmpDispatcher _dispatcher;
    private readonly DaemonEvents _events;
    private readonly object _gate = new();
    private readonly Dictionary<string, (NbdExport Export, BlockNode Node)> _exports = new(StringComparer.Ordinal);

    /// <summary>Exports held while their node switches over to a mirror's target, by node: an export added to the
    /// node meanwhile is held from the start and moves too.</summary>
    private readonly Dictionary<BlockNode, List<NbdExport>> _switchingOver = new();

    private NbdServer? _server;

    public ExportManager(BlockGraph graph, QmpDispatcher dispatcher, DaemonEvents events)
    {
        _graph = graph;
        _dispatcher = dispatcher;
        _events = events;
    }

    public NbdServer? Server => _server;

    /// <summary>Every export with its node, as they are now.</summary>
    public IReadOnlyList<(NbdExport Export, BlockNode Node)> All
    {
        get { lock (_gate) return _exports.Values.ToList(); }
    }

    public bool Serves(BlockNode node)
    {
        lock (_gate) return _exports.Values.Any(e => e.Node == node);
    }

    public bool IsSwitchingOver(BlockNode node)
    {
        lock (_gate) return _switchingOver.ContainsKey(node);
    }

    /// <summary>Binds and listens. <paramref name="accept"/> false leaves clients waiting in the backlog until
    /// <see cref="AcceptClients"/>: the command line adds its exports first, so a client that connects as soon as
    /// the socket exists never finds its export missing.</summary>
    public void StartServer(SocketAddressArg address, int maxConnections, bool accept)
    {
        if (_server is not null) throw QmpException.Generic("NBD server already running");
        try
        {
            _server = address.Path is { } path ? NbdServer.ListenUnix(path, maxConnections) : NbdServer.ListenTcp(address.ListenHost(), address.Port, maxConnections);
        }
        catch (System.Net.Sockets.SocketException e)
        {
            throw QmpException.Generic(address.BindError(e));
        }
        if (accept) _server.Start();
    }

    public void AcceptClients() => _server?.Start();

    /// <summary>nbd-server-stop: every export goes (hard), then the server.</summary>
    public void StopServer()
    {
        if (_server is null) throw QmpException.Generic("NBD server not running");
        foreach (var (export, _) in All) Delete(export.Id, hard: true);
        _server.DisposeAsync().AsTask().Wait();
        _server = null;
    }

    /// <summary>Adds a checked export: its bitmaps become busy, the node gets the export as a user (with its lock
    /// claim). Whatever fails is undone.</summary>
    public void Add(NbdExport export, BlockNode node)
    {
        var server = _server ?? throw QmpException.Generic("NBD server not running");
        lock (_gate)
            if (_exports.ContainsKey(export.Id)) throw QmpException.Generic($"Block export id '{export.Id}' is already in use");
        var busy = new List<DirtyBitmap>();
        try
        {
            foreach (var b in export.Bitmaps)
            {
                node.Image.Bitmaps.SetBusyAnywhere(b, true);
                busy.Add(b);
            }
        }
        catch (BitmapException)
        {
            foreach (var b in busy) b.Busy = false;
            throw;
        }
        List<NbdExport>? switching;
        lock (_gate)
        {
            // A node switching over to a mirror's target: the new export is held with the others (before any client
            // can reach it) and moves with them.
            _switchingOver.TryGetValue(node, out switching);
            if (switching is not null) _ = export.DrainAsync();
        }
        server.AddExport(export);
        try
        {
            _graph.AddUser(node, NodeUser.Export, LockClaim.Export(export.Writable));
        }
        catch (BlockException)
        {
            server.RemoveExport(export);
            foreach (var b in busy) b.Busy = false;
            throw;
        }
        lock (_gate)
        {
            _exports[export.Id] = (export, node);
            switching?.Add(export);
        }
    }

    /// <summary>block-export-del: a safe delete refuses an export with clients; a hard one disconnects them.</summary>
    public void Delete(string id, bool hard)
    {
        (NbdExport Export, BlockNode Node) entry;
        if (!hard)
        {
            NbdExport? closing;
            lock (_gate) closing = _exports.TryGetValue(id, out entry) ? entry.Export : null;
            closing?.WaitForLeavingConnections(TimeSpan.FromSeconds(2), unread: TimeSpan.FromSeconds(1));
        }
        lock (_gate)
        {
            if (!_exports.TryGetValue(id, out entry)) throw QmpException.Generic($"Export '{id}' is not found");
            if (!hard && entry.Export.Connections > 0) throw QmpException.Generic($"export '{id}' still in use");
            entry.Export.ShuttingDown = true;
            _exports.Remove(id);
        }
        _server!.RemoveExport(entry.Export);
        if (hard) entry.Export.DisconnectClients();
        foreach (var b in entry.Export.Bitmaps) b.Busy = false;
        _graph.RemoveUser(entry.Node, NodeUser.Export, LockClaim.Export(entry.Export.Writable));
        _events.Emit("BLOCK_EXPORT_DELETED", new QDict().Add("id", id));
    }

    /// <summary>Closes the server at shutdown or quit: every export lets go of its node and bitmaps.</summary>
    public async ValueTask CloseAsync()
    {
        if (_server is null) return;
        List<(NbdExport Export, BlockNode Node)> all;
        lock (_gate)
        {
            all = _exports.Values.ToList();
            _exports.Clear();
        }
        foreach (var (export, node) in all)
        {
            foreach (var b in export.Bitmaps) b.Busy = false;
            _graph.RemoveUser(node, NodeUser.Export, LockClaim.Export(export.Writable));
        }
        await _server.DisposeAsync();
        _server = null;
    }

    /// <summary>Holds the node's exports, lets in-flight requests finish, points them at <paramref name="to"/> and
    /// lets them go: no client sees an error. Runs inside a QMP command.</summary>
    public async Task MoveAsync(BlockNode from, BlockNode to)
    {
        List<NbdExport> moving;
        lock (_gate) moving = _exports.Values.Where(e => e.Node == from).Select(e => e.Export).ToList();
        try
        {
            await Task.WhenAll(moving.Select(e => e.DrainAsync()));
            Retarget(from, to);
        }
        finally
        {
            foreach (var e in moving) e.Resume();
        }
    }

    /// <summary>
    /// A mirror's switch-over, as QEMU's drain and replace-node: every export on the source holds new requests and
    /// lets those in flight finish; the mirror copies what is left; the exports then point at the target node and
    /// go on. A client never sees an error or a lost write. It runs in the job, but like QEMU's main loop it
    /// changes the export table only between two QMP commands.
    /// </summary>
    public async Task SwitchOverAsync(BlockNode source, BlockNode target, Func<Task> finalSync)
    {
        List<NbdExport> held;
        List<Task> drained;
        using (await _dispatcher.BetweenCommandsAsync())
        lock (_gate)
        {
            held = _exports.Values.Where(e => e.Node == source).Select(e => e.Export).ToList();
            drained = held.Select(e => e.DrainAsync()).ToList();
            _switchingOver[source] = held;
        }
        bool copied = false;
        try
        {
            // Outside the lock: requests in flight and the last copy may take a while, and a job paused meanwhile
            // (job-pause, on-target-error=stop) must still hear job-resume and job-cancel.
            await Task.WhenAll(drained);
            // And the nodes themselves, as QEMU drains source and target for the switch: whatever else writes to
            // them (a job, a filter above) holds too. The mirror's own last copy runs inside the graph and passes.
            using (DrainedSection.Begin([source.Image, target.Image], drainerPasses: false))
                await finalSync();
            copied = true;
        }
        finally
        {
            try
            {
                using (await _dispatcher.BetweenCommandsAsync())
                {
                    lock (_gate) _switchingOver.Remove(source);
                    if (copied) Retarget(source, target);
                }
            }
            finally
            {
                foreach (var e in held) e.Resume();
            }
        }
    }

    /// <summary>Points every export of <paramref name="from"/> at <paramref name="to"/>, with its use of the node
    /// and its lock claim.</summary>
    private void Retarget(BlockNode from, BlockNode to)
    {
        lock (_gate)
        {
            foreach (var (id, (export, _)) in _exports.Where(e => e.Value.Node == from).ToList())
            {
                export.Retarget(to.Image);
                _graph.RemoveUser(from, NodeUser.Export, LockClaim.Export(export.Writable));
                _graph.AddUser(to, NodeUser.Export, LockClaim.Export(export.Writable));
                _exports[id] = (export, to);
            }
        }
    }
}
