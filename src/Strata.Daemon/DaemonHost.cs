using System.Runtime.InteropServices;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// A running strata daemon: the node graph from --blockdev, a QMP server per --monitor, the pidfile. It runs
/// until a client sends quit or the process gets SIGTERM/SIGINT, then closes every node (persistent bitmaps are
/// stored) and removes the pidfile.
/// </summary>
public sealed class DaemonHost : IAsyncDisposable
{
    private readonly DaemonOptions _options;
    private readonly List<IAsyncDisposable> _monitors = new();
    private readonly TaskCompletionSource _stop = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private bool _pidFileWritten;

    public BlockGraph Graph { get; } = new();
    public DaemonBackend Backend { get; }

    /// <param name="log">Where the stack of an unexpected QMP command failure goes (the daemon's stderr).</param>
    public DaemonHost(DaemonOptions options, TextWriter? log = null)
    {
        _options = options;
        Graph.CrashSafeBitmapsByDefault = options.CrashSafeBitmaps;
        Backend = new DaemonBackend(Graph) { Log = log ?? TextWriter.Null };
    }

    /// <summary>Opens the nodes and starts listening. Every failure is a <see cref="DaemonUsageException"/> whose
    /// message carries the option text, as qemu-storage-daemon's do: the daemon says one line and exits 1.</summary>
    public void Start()
    {
        foreach (var text in _options.Objects)
        {
            Option($"--object {text}", () =>
            {
                // throttle-group objects are used by throttle nodes; other object types (iothread, …) are accepted and ignored.
                var o = DaemonCommandLine.ParseValue(text, "qom-type", $"--object {text}");
                if (o["qom-type"]?.ToString() != "throttle-group") return;
                string id = o["id"]?.ToString() ?? throw QmpException.Generic("Parameter 'id' is missing");
                long bps = 0;
                foreach (var key in new[] { "x-bps-total", "limits.bps-total" })
                    if (o[key] is JsonValue v && long.TryParse(v.ToString(), out long n)) bps = n;
                if (o["limits"] is JsonObject limits && limits["bps-total"] is JsonValue lv && long.TryParse(lv.ToString(), out long ln)) bps = ln;
                Graph.ThrottleGroups[id] = new Strata.Block.Filters.ThrottleGroup(id, bps);
            });
        }
        foreach (var (text, value) in _options.Blockdevs)
        {
            Option($"--blockdev {text}", () =>
            {
                var spec = DaemonBackend.ParseBlockdev(value);
                if (spec.NodeName is null) throw new BlockException("A top-level node must have a node-name");
                Graph.Add(spec);
            });
        }
        foreach (var text in _options.NbdServers)
        {
            Option($"--nbd-server {text}", () =>
            {
                var v = DaemonCommandLine.ParseValue(text, "addr", $"--nbd-server {text}");
                ArgSchema.Validate(v, NbdServerOptions);
                Backend.StartNbdServer(v["addr"]!.AsObject(), legacy: false, ArgSchema.OptLong(v, "max-connections"), v.ContainsKey("tls-creds"), accept: false);
            });
        }
        foreach (var text in _options.Exports)
            Option($"--export {text}", () => Backend.AddExport(DaemonCommandLine.ParseValue(text, "type", $"--export {text}")));
        Backend.AcceptNbdClients();
        // The pidfile exists before any client can connect (a client that sees the socket may read it at once).
        if (_options.PidFile is { } pid)
        {
            try
            {
                File.WriteAllText(pid, Environment.ProcessId + "\n");
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new DaemonUsageException($"cannot create PID file: Could not create '{pid}': {FileError(e)}");
            }
            _pidFileWritten = true;
        }
        foreach (var (text, id) in _options.Monitors)
        {
            var c = _options.Chardevs[id];
            // qemu-storage-daemon binds when it creates the chardev, so its errors name the --chardev option.
            Option($"--chardev {c.Text}", () =>
            {
                var address = new SocketAddressArg(c.Path, c.Host, c.Port);
                try
                {
                    if (c.Stdio)
                        _monitors.Add(QmpStreamMonitor.Stdio(Backend));
                    else if (c.Client)
                        _monitors.Add(QmpStreamMonitor.Connect(c.Path is not null ? new System.Net.Sockets.UnixDomainSocketEndPoint(c.Path)
                            : new System.Net.IPEndPoint(System.Net.IPAddress.TryParse(c.Host, out var ip) ? ip : System.Net.Dns.GetHostAddresses(c.Host!)[0], c.Port), Backend));
                    else
                    {
                        var server = c.Path is not null ? QmpServer.ListenUnix(c.Path, Backend) : QmpServer.ListenTcp(address.ListenHost(), c.Port, Backend);
                        server.Start();
                        _monitors.Add(server);
                    }
                }
                catch (System.Net.Sockets.SocketException e) when (c.Client)
                {
                    string where = c.Path ?? $"{c.Host}:{c.Port}";
                    string cause = e.SocketErrorCode switch
                    {
                        System.Net.Sockets.SocketError.AddressNotAvailable or System.Net.Sockets.SocketError.NotConnected when c.Path is not null => "No such file or directory",
                        System.Net.Sockets.SocketError.ConnectionRefused => "Connection refused",
                        _ => e.Message,
                    };
                    if (c.Path is not null && !File.Exists(c.Path)) cause = "No such file or directory";
                    throw QmpException.Generic($"Failed to connect to '{where}': {cause}");
                }
                catch (System.Net.Sockets.SocketException e)
                {
                    throw QmpException.Generic(address.BindError(e));
                }
            });
        }
    }

    private static readonly ArgSpec[] NbdServerOptions =
    [
        new("addr", ArgType.Object), new("tls-creds", ArgType.Str, true), new("tls-authz", ArgType.Str, true), new("max-connections", ArgType.UInt32, true),
    ];

    /// <summary>Runs one option's setup; any failure, expected or not, becomes one line naming the option.</summary>
    private static void Option(string context, Action setup)
    {
        try
        {
            setup();
        }
        catch (DaemonUsageException)
        {
            throw;
        }
        catch (Exception e)
        {
            // A lock conflict keeps QEMU's hint line: on the command line it is for people.
            string text = context[(context.IndexOf(' ') + 1)..];
            throw new DaemonUsageException($"{context}: {DaemonCommandLine.OptionError(text, e.Message)}");
        }
    }

    /// <summary>The system's words for a file error (.NET's messages name the path in their own way).</summary>
    private static string FileError(Exception e) => e switch
    {
        DirectoryNotFoundException or FileNotFoundException => "No such file or directory",
        UnauthorizedAccessException => "Permission denied",
        _ => e.Message,
    };

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
        foreach (var m in _monitors) await m.DisposeAsync();
        await Backend.ShutdownAsync();
        Graph.Dispose();
        if (_pidFileWritten && _options.PidFile is { } pid) try { File.Delete(pid); } catch (IOException) { }
    }
}
