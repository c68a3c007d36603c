using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Daemon.Commands;
using Strata.Daemon.Transactions;
using Strata.Formats.Json;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// strata daemon's QMP side, as qemu-storage-daemon 7.2 answers it: the node graph, the jobs, the exports and the
/// event bus, with the commands grouped by QAPI module (Commands/, Transactions/) in one dispatcher.
/// </summary>
public sealed class DaemonBackend : IQmpBackend
{
    private readonly QmpDispatcher _dispatcher = new();
    private readonly DaemonEvents _events = new();
    private readonly BlockExportCommands _exportCommands;
    private readonly TaskCompletionSource _quit = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public BlockGraph Graph { get; }
    public JobManager Jobs { get; }
    public ExportManager Exports { get; }

    public DaemonBackend(BlockGraph graph)
    {
        Graph = graph;
        Jobs = new JobManager(JobEventsToQmp.To(Emit));
        Exports = new ExportManager(graph, _dispatcher, _events);
        Graph.Drivers.Register(new NbdBlockDriver());
        _dispatcher.AfterCommand = PersistBitmapChanges;

        RegisterControl(_dispatcher);
        new JobCommands(Jobs).Register(_dispatcher);
        new BlockNodeCommands(Graph, Jobs, Exports).Register(_dispatcher);
        var bitmaps = new BitmapCommands(Graph);
        bitmaps.Register(_dispatcher);
        var backups = new BackupCommands(Graph, Jobs);
        backups.Register(_dispatcher);
        new MirrorCommands(Graph, Jobs, Exports).Register(_dispatcher);
        var snapshots = new SnapshotCommands(Graph, Exports);
        snapshots.Register(_dispatcher);
        new TransactionCommand(_dispatcher, Graph, bitmaps, backups, snapshots).Register(_dispatcher);
        _exportCommands = new BlockExportCommands(Graph, Exports);
        _exportCommands.Register(_dispatcher);
        new BitmapMigrationCommands(Graph, CommandFailed).Register(_dispatcher);
    }

    /// <summary>Completes when a client asked to quit (after its reply went out).</summary>
    public Task QuitRequested => _quit.Task;

    public QDict Version { get; } = new QDict()
        .Add("qemu", new QDict().Add("major", 7).Add("minor", 2).Add("micro", 0))
        .Add("package", $"strata {typeof(DaemonBackend).Assembly.GetName().Version?.ToString(3) ?? "0.1.0"}");

    public ValueTask<object?> ExecuteAsync(string command, JsonObject arguments, CancellationToken cancellationToken) =>
        _dispatcher.ExecuteAsync(command, arguments, cancellationToken);

    /// <summary>Where the stack of an unexpected command failure goes (the daemon's stderr).</summary>
    public TextWriter Log { get; init; } = TextWriter.Null;

    /// <summary>A bitmap added, removed or changed by the command is on disk before the reply (crash-safe nodes). A
    /// failure here does not undo the command: the bitmaps stay tracked, the next checkpoint retries.</summary>
    private void PersistBitmapChanges()
    {
        try
        {
            Graph.PersistBitmapChanges();
        }
        catch (BlockException e)
        {
            lock (Log) Log.WriteLine($"strata daemon: could not store bitmap changes: {e.Message}");
        }
    }

    public void CommandFailed(string command, Exception error)
    {
        lock (Log) Log.WriteLine($"strata daemon: unexpected error in '{command}' (answered GenericError, still serving): {error}");
    }

    public void ReplySent(string command)
    {
        if (command == "quit") _quit.TrySetResult();
    }

    public IDisposable SubscribeEvents(Func<QDict, ValueTask> onEvent) => _events.Subscribe(onEvent);

    /// <summary>Sends an event to every negotiated session.</summary>
    public void Emit(string name, QDict? data) => _events.Emit(name, data);

    /// <summary>Validates a blockdev definition (--blockdev, blockdev-add) and turns it into a node spec.</summary>
    public static BlockNodeSpec ParseBlockdev(JsonObject a, string prefix = "") => BlockdevOptions.Parse(a, prefix);

    /// <summary>--nbd-server: binds at once; <paramref name="accept"/> false holds clients until the command line's
    /// exports are added (<see cref="AcceptNbdClients"/>).</summary>
    public void StartNbdServer(JsonObject addr, bool legacy, long? maxConnections, bool tls = false, bool accept = true) =>
        _exportCommands.StartNbdServer(addr, legacy, maxConnections, tls, accept);

    public void AcceptNbdClients() => Exports.AcceptClients();

    /// <summary>--export, with block-export-add's checks.</summary>
    public void AddExport(JsonObject a) => _exportCommands.AddExport(a);

    public NbdServer? NbdServer => Exports.Server;

    /// <summary>Daemon shutdown (SIGTERM): closes the NBD server between two QMP commands, as quit does; a command
    /// that does not finish within a few seconds is not waited for.</summary>
    public async ValueTask ShutdownAsync()
    {
        using (await _dispatcher.BetweenCommandsAsync(TimeSpan.FromSeconds(10)))
            await Exports.CloseAsync();
    }

    /// <summary>QAPI's control module: capabilities, version, the command list and schema, quit.</summary>
    private void RegisterControl(QmpDispatcher q)
    {
        q.Add("qmp_capabilities", [new("enable", ArgType.Any, true)], "any", _ => new QDict());
        q.Add("query-version", [], "VersionInfo", _ => Version);
        q.Add("query-commands", [], "[CommandInfo]", _ => q.Names.Select(n => (object?)new QDict().Add("name", n)).ToList());
        q.Add("query-qmp-schema", [], "[SchemaInfo]", _ => q.Schema());
        q.Add("quit", [], "any", _ =>
        {
            // The daemon stops once the reply is out (ReplySent). With no job still writing, the images are closed
            // first: a client that runs qemu-img as soon as it has the reply finds them unlocked and complete.
            if (Jobs.All.All(j => j.Status is JobStatus.Concluded or JobStatus.Null))
            {
                Exports.CloseAsync().AsTask().GetAwaiter().GetResult();
                Graph.Dispose();
            }
            return new QDict();
        });
    }
}
