using System.Net;

namespace Strata.Protocol.Qmp;

/// <summary>Accepts QMP clients on a unix or TCP socket; each connection gets its own <see cref="QmpSession"/>.</summary>
public sealed class QmpServer : IAsyncDisposable
{
    private readonly ConnectionListener _listener;

    private QmpServer(Func<Func<System.IO.Pipelines.PipeReader, System.IO.Pipelines.PipeWriter, CancellationToken, Task>, ConnectionListener> listen, IQmpBackend backend) =>
        _listener = listen((reader, writer, ct) => new QmpSession(backend, writer).RunAsync(reader, ct));

    public EndPoint LocalEndPoint => _listener.LocalEndPoint;

    public static QmpServer ListenUnix(string path, IQmpBackend backend) => new(s => ConnectionListener.Unix(path, 16, 0, s), backend);

    public static QmpServer ListenTcp(string host, int port, IQmpBackend backend) => new(s => ConnectionListener.Tcp(host, port, 16, 0, s), backend);

    public void Start() => _listener.Start();

    public ValueTask DisposeAsync() => _listener.DisposeAsync();
}
