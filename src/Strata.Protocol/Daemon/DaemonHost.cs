using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Protocol.Qmp;

namespace Strata.Protocol.Daemon;

/// <summary>
/// A running strata daemon: the node graph from --blockdev, a QMP server per --monitor, the pidfile. It runs
/// until a client sends quit or the process gets SIGTERM/SIGINT, then closes every node (persistent bitmaps are
/// stored) and removes the pidfile.
/// </summary>
public sealed class DaemonHost : IAsyncDisposable
{
    private readonly DaemonOptions _options;
    private readonly List<QmpServer> _servers = new();
    private readonly TaskCompletionSource _stop = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _pidFileWritten;

    public BlockGraph Graph { get; } = new();
    public DaemonBackend Backend { get; }

    public DaemonHost(DaemonOptions options)
    {
        _options = options;
        Backend = new DaemonBackend(Graph);
    }

    /// <summary>Opens the nodes and starts listening. Errors carry the option text, as qemu-storage-daemon's do.</summary>
    public void Start()
    {
        foreach (var text in _options.Objects)
        {
            // throttle-group objects are used by throttle nodes; other object types (iothread, …) are accepted and ignored.
            var o = DaemonCommandLine.ParseValue(text, "qom-type", $"--object {text}");
            if (o["qom-type"]?.ToString() != "throttle-group") continue;
            string id = o["id"]?.ToString() ?? throw new DaemonUsageException($"--object {text}: Parameter 'id' is missing");
            long bps = 0;
            foreach (var key in new[] { "x-bps-total", "limits.bps-total" })
                if (o[key] is JsonValue v && long.TryParse(v.ToString(), out long n)) bps = n;
            if (o["limits"] is JsonObject limits && limits["bps-total"] is JsonValue lv && long.TryParse(lv.ToString(), out long ln)) bps = ln;
            Graph.ThrottleGroups[id] = new Strata.Block.Filters.ThrottleGroup(id, bps);
        }
        foreach (var (text, value) in _options.Blockdevs)
        {
            try
            {
                var spec = DaemonBackend.ParseBlockdev(value);
                if (spec.NodeName is null) throw new BlockException("A top-level node must have a node-name");
                Graph.Add(spec);
            }
            catch (Exception e) when (e is QmpException or BlockException)
            {
                throw new DaemonUsageException($"--blockdev {text}: {DaemonCommandLine.OptionError(text, e.Message)}");
            }
        }
        foreach (var text in _options.NbdServers)
        {
            try
            {
                var v = DaemonCommandLine.ParseValue(text, "addr", $"--nbd-server {text}");
                if (v["addr"] is not JsonObject addr) throw QmpException.Generic("Parameter 'addr' is missing");
                Backend.StartNbdServer(addr, legacy: false, v["max-connections"] is JsonValue m ? m.GetValue<long>() : null, v.ContainsKey("tls-creds"), accept: false);
            }
            catch (QmpException e)
            {
                throw new DaemonUsageException($"--nbd-server {text}: {DaemonCommandLine.OptionError(text, e.Message)}");
            }
        }
        foreach (var text in _options.Exports)
        {
            try
            {
                Backend.AddExport(DaemonCommandLine.ParseValue(text, "type", $"--export {text}"));
            }
            catch (Exception e) when (e is QmpException or BlockException)
            {
                throw new DaemonUsageException($"--export {text}: {DaemonCommandLine.OptionError(text, e.Message)}");
            }
        }
        Backend.AcceptNbdClients();
        // The pidfile exists before any client can connect (a client that sees the socket may read it at once).
        if (_options.PidFile is { } pid)
        {
            File.WriteAllText(pid, Environment.ProcessId + "\n");
            _pidFileWritten = true;
        }
        foreach (var (text, id) in _options.Monitors)
        {
            var c = _options.Chardevs[id];
            try
            {
                var server = c.Path is not null ? QmpServer.ListenUnix(c.Path, Backend) : QmpServer.ListenTcp(c.Host!, c.Port, Backend);
                server.Start();
                _servers.Add(server);
            }
            catch (System.Net.Sockets.SocketException e)
            {
                throw new DaemonUsageException($"--monitor {text}: Failed to bind socket: {e.Message}");
            }
        }
    }

    /// <summary>Runs until quit or a termination signal.</summary>
    public async Task RunAsync()
    {
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Stop);
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, Stop);
        using var hup = PosixSignalRegistration.Create(PosixSignal.SIGHUP, Stop);
        await Task.WhenAny(_stop.Task, Backend.QuitRequested);
    }

    private void Stop(PosixSignalContext context)
    {
        context.Cancel = true;
        _stop.TrySetResult();
    }

    public async ValueTask DisposeAsync()
    {
        foreach (var s in _servers) await s.DisposeAsync();
        await Backend.StopAsync();
        Graph.Dispose();
        if (_pidFileWritten && _options.PidFile is { } pid) try { File.Delete(pid); } catch (IOException) { }
    }
}
