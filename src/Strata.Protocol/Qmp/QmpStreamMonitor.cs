using System.IO.Pipelines;
using System.Net.Sockets;

namespace Strata.Protocol.Qmp;

/// <summary>
/// One QMP conversation over a byte stream that is already open: the daemon's own stdin/stdout
/// (<c>--chardev stdio</c>), or a socket the daemon connected to itself (<c>--chardev socket,server=off</c>,
/// where a management tool listens and the daemon calls in). There is no accept loop: when the peer goes, the
/// monitor is gone, as QEMU's chardev without reconnect.
/// </summary>
public sealed class QmpStreamMonitor : IAsyncDisposable
{
    private readonly CancellationTokenSource _cts = new();
    private readonly Task _session;
    private readonly IDisposable? _connection;

    private QmpStreamMonitor(Stream input, Stream output, IQmpBackend backend, IDisposable? connection)
    {
        _connection = connection;
        var session = new QmpSession(backend, PipeWriter.Create(output));
        _session = Task.Run(() => session.RunAsync(PipeReader.Create(input), _cts.Token));
    }

    public static QmpStreamMonitor Stdio(IQmpBackend backend) =>
        new(Console.OpenStandardInput(), Console.OpenStandardOutput(), backend, null);

    /// <summary>Connects to <paramref name="endPoint"/> (a unix path or a TCP address) and serves QMP on it.</summary>
    public static QmpStreamMonitor Connect(System.Net.EndPoint endPoint, IQmpBackend backend)
    {
        var socket = endPoint is System.Net.Sockets.UnixDomainSocketEndPoint
            ? new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified)
            : new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            socket.Connect(endPoint);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
        var stream = new NetworkStream(socket, ownsSocket: true);
        return new QmpStreamMonitor(stream, stream, backend, stream);
    }

    public async ValueTask DisposeAsync()
    {
        _cts.Cancel();
        _connection?.Dispose();
        // A read of the process's stdin cannot be cancelled; the session ends with the process.
        try { await _session.WaitAsync(TimeSpan.FromSeconds(1)); } catch (Exception) { }
    }
}
