using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;

namespace Strata.Protocol.Nbd;

/// <summary>The NBD server of a daemon: one listening socket, the export registry, one session per connection.</summary>
public sealed class NbdServer : INbdExportRegistry, IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly string? _unixPath;
    private readonly int _maxConnections;
    private readonly object _lock = new();
    private readonly Dictionary<string, NbdExport> _byName = new(StringComparer.Ordinal);
    private readonly CancellationTokenSource _cts = new();
    private readonly List<(Task Task, Socket Socket)> _connections = new();
    private Task? _accept;

    private NbdServer(Socket listener, string? unixPath, int maxConnections)
    {
        _listener = listener;
        _unixPath = unixPath;
        _maxConnections = maxConnections;
    }

    public static NbdServer ListenUnix(string path, int maxConnections = 100) => new(Listeners.Unix(path, 512), path, maxConnections);

    public static NbdServer ListenTcp(string host, int port, int maxConnections = 100) => new(Listeners.Tcp(host, port, 512), null, maxConnections);

    public EndPoint LocalEndPoint => _listener.LocalEndPoint!;

    /// <summary>max-connections 1 turns multi-conn off, as in QEMU.</summary>
    public bool MultiConn => _maxConnections != 1;

    public NbdExport? Find(string name)
    {
        lock (_lock) return _byName.GetValueOrDefault(name);
    }

    public IReadOnlyList<NbdExport> All
    {
        get { lock (_lock) return _byName.Values.ToList(); }
    }

    public void AddExport(NbdExport export)
    {
        lock (_lock)
        {
            if (_byName.ContainsKey(export.Name)) throw new InvalidOperationException($"Block export name '{export.Name}' is already in use");
            _byName[export.Name] = export;
        }
    }

    public void RemoveExport(NbdExport export)
    {
        lock (_lock) _byName.Remove(export.Name);
    }

    public void Start() => _accept = AcceptLoopAsync();

    private async Task AcceptLoopAsync()
    {
        while (!_cts.IsCancellationRequested)
        {
            Socket client;
            try
            {
                client = await _listener.AcceptAsync(_cts.Token);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                return;
            }
            // Nothing in here may throw: a faulted accept loop would leave clients connected to nobody.
            lock (_connections)
            {
                _connections.RemoveAll(c => c.Task.IsCompleted);
                if (_maxConnections > 0 && _connections.Count >= _maxConnections)
                {
                    client.Dispose(); // over the limit: refuse, as QEMU does
                    continue;
                }
                if (client.AddressFamily != AddressFamily.Unix) client.NoDelay = true;
                _connections.Add((ServeAsync(client), client));
            }
        }
    }

    private async Task ServeAsync(Socket client)
    {
        await Task.Yield();
        using (client)
        await using (var stream = new NetworkStream(client, ownsSocket: false))
        {
            var reader = PipeReader.Create(stream, new StreamPipeReaderOptions(bufferSize: 1 << 20, minimumReadSize: 64 << 10));
            var writer = PipeWriter.Create(stream, new StreamPipeWriterOptions(minimumBufferSize: 1 << 20));
            try
            {
                await new NbdServerSession(this, reader, writer).RunAsync(_cts.Token);
            }
            catch (Exception)
            {
                // One broken connection never takes the server down.
            }
        }
    }

    /// <summary>Drops every connection of an export (block-export-del mode=hard, or server stop).</summary>
    public void Disconnect() 
    {
        lock (_connections)
            foreach (var c in _connections) try { c.Socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
    }

    public async ValueTask DisposeAsync()
    {
        _cts.Cancel();
        _listener.Dispose();
        if (_accept is not null) await _accept;
        Disconnect();
        Task[] tasks;
        lock (_connections) tasks = _connections.Select(c => c.Task).ToArray();
        try { await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(5)); } catch (Exception) { }
        if (_unixPath is not null) try { File.Delete(_unixPath); } catch (IOException) { }
    }
}
