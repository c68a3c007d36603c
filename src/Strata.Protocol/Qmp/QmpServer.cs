using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;

namespace Strata.Protocol.Qmp;

/// <summary>Accepts QMP clients on a unix or TCP socket; each connection gets its own <see cref="QmpSession"/>.</summary>
public sealed class QmpServer : IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly IQmpBackend _backend;
    private readonly CancellationTokenSource _cts = new();
    private readonly List<Task> _sessions = new();
    private readonly string? _unixPath;
    private Task? _acceptLoop;

    private QmpServer(Socket listener, IQmpBackend backend, string? unixPath)
    {
        _listener = listener;
        _backend = backend;
        _unixPath = unixPath;
    }

    public EndPoint LocalEndPoint => _listener.LocalEndPoint!;

    public static QmpServer ListenUnix(string path, IQmpBackend backend) => new(Listeners.Unix(path, 16), backend, path);

    public static QmpServer ListenTcp(string host, int port, IQmpBackend backend) => new(Listeners.Tcp(host, port, 16), backend, null);

    public void Start() => _acceptLoop = AcceptLoopAsync();

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
            lock (_sessions)
            {
                _sessions.RemoveAll(t => t.IsCompleted);
                _sessions.Add(ServeAsync(client));
            }
        }
    }

    private async Task ServeAsync(Socket client)
    {
        using (client)
        await using (var stream = new NetworkStream(client, ownsSocket: false))
        {
            var reader = PipeReader.Create(stream);
            var writer = PipeWriter.Create(stream);
            var session = new QmpSession(_backend, writer);
            try
            {
                await session.RunAsync(reader, _cts.Token);
            }
            catch (Exception)
            {
                // A broken session never takes the daemon down.
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        _cts.Cancel();
        _listener.Dispose();
        if (_acceptLoop is not null) await _acceptLoop;
        Task[] sessions;
        lock (_sessions) sessions = _sessions.ToArray();
        try { await Task.WhenAll(sessions).WaitAsync(TimeSpan.FromSeconds(5)); } catch (Exception) { }
        if (_unixPath is not null) try { File.Delete(_unixPath); } catch (IOException) { }
    }
}
