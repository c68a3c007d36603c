using System.IO.Pipelines;
using System.Net;
using System.Net.Sockets;

namespace Strata.Protocol;

/// <summary>
/// A listening socket (unix path or TCP address) that accepts connections and runs one protocol session per
/// connection over a pipe pair. It is the only place that touches sockets for the daemon's QMP and NBD servers:
/// a broken connection ends only itself, and the accept loop never faults.
/// </summary>
internal sealed class ConnectionListener : IAsyncDisposable
{
    private readonly Socket _listener;
    private readonly string? _unixPath;
    private readonly int _maxConnections;
    private readonly Func<PipeReader, PipeWriter, IGatheredWriter, CancellationToken, Task> _session;
    private readonly StreamPipeReaderOptions? _readerOptions;
    private readonly StreamPipeWriterOptions? _writerOptions;
    private readonly int _sendBufferBytes;
    private readonly int _connectionThreads;
    private int _threadsInUse;
    private readonly CancellationTokenSource _cts = new();
    private readonly List<(Task Task, Socket Socket)> _connections = new();
    private Task? _accept;

    private ConnectionListener(Socket listener, string? unixPath, int maxConnections, Func<PipeReader, PipeWriter, IGatheredWriter, CancellationToken, Task> session,
        StreamPipeReaderOptions? readerOptions, StreamPipeWriterOptions? writerOptions, int sendBufferBytes, int connectionThreads)
    {
        _connectionThreads = connectionThreads;
        _sendBufferBytes = sendBufferBytes;
        _listener = listener;
        _unixPath = unixPath;
        _maxConnections = maxConnections;
        _session = session;
        _readerOptions = readerOptions;
        _writerOptions = writerOptions;
    }

    /// <param name="maxConnections">0: unlimited; otherwise connections over the limit are closed at once.</param>
    public static ConnectionListener Unix(string path, int backlog, int maxConnections, Func<PipeReader, PipeWriter, CancellationToken, Task> session) =>
        Unix(path, backlog, maxConnections, (reader, writer, _, ct) => session(reader, writer, ct));

    /// <param name="session">Also gets the connection's gathered writer (see <see cref="IGatheredWriter"/>).</param>
    /// <param name="sendBufferBytes">Non-zero: the connections' socket send buffer (SO_SNDBUF; the kernel caps it
    /// at net.core.wmem_max).</param>
    /// <param name="connectionThreads">How many connections at a time run their session on a thread of their own that
    /// also receives their input (see <see cref="ReceiveThreadStream"/>); the others, and all when 0, run as tasks on
    /// the thread pool. A bound, so that many idle clients cannot take a thread each.</param>
    public static ConnectionListener Unix(string path, int backlog, int maxConnections, Func<PipeReader, PipeWriter, IGatheredWriter, CancellationToken, Task> session,
        StreamPipeReaderOptions? readerOptions = null, StreamPipeWriterOptions? writerOptions = null, int sendBufferBytes = 0, int connectionThreads = 0)
    {
        if (File.Exists(path)) File.Delete(path);
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Bind(new UnixDomainSocketEndPoint(path));
        s.Listen(backlog);
        return new ConnectionListener(s, path, maxConnections, session, readerOptions, writerOptions, sendBufferBytes, connectionThreads);
    }

    public static ConnectionListener Tcp(string host, int port, int backlog, int maxConnections, Func<PipeReader, PipeWriter, CancellationToken, Task> session) =>
        Tcp(host, port, backlog, maxConnections, (reader, writer, _, ct) => session(reader, writer, ct));

    public static ConnectionListener Tcp(string host, int port, int backlog, int maxConnections, Func<PipeReader, PipeWriter, IGatheredWriter, CancellationToken, Task> session,
        StreamPipeReaderOptions? readerOptions = null, StreamPipeWriterOptions? writerOptions = null, int sendBufferBytes = 0, int connectionThreads = 0)
    {
        var address = host is "" or "localhost" ? IPAddress.Loopback : IPAddress.Parse(host);
        var s = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        s.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        s.Bind(new IPEndPoint(address, port));
        s.Listen(backlog);
        return new ConnectionListener(s, null, maxConnections, session, readerOptions, writerOptions, sendBufferBytes, connectionThreads);
    }

    public EndPoint LocalEndPoint => _listener.LocalEndPoint!;

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
                if (_sendBufferBytes > 0) try { client.SendBufferSize = _sendBufferBytes; } catch (SocketException) { }
                _connections.Add((ServeOnThreadAsync(client) ?? ServeAsync(client), client));
            }
        }
    }

    private async Task ServeAsync(Socket client)
    {
        await Task.Yield();
        using (client)
        await using (var stream = new NetworkStream(client, ownsSocket: false))
        {
            try
            {
                await _session(PipeReader.Create(stream, _readerOptions), PipeWriter.Create(stream, _writerOptions), new SocketGatheredWriter(client), _cts.Token);
            }
            catch (Exception)
            {
                // One broken connection never takes the server down.
            }
        }
    }

    /// <summary>Serves the client on a thread of its own; null when it is to go to the pool (no thread left under the
    /// bound, or none to be had from the system).</summary>
    private Task? ServeOnThreadAsync(Socket client)
    {
        if (Interlocked.Increment(ref _threadsInUse) > _connectionThreads)
        {
            Interlocked.Decrement(ref _threadsInUse);
            return null;
        }
        var ended = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try
        {
            new Thread(() =>
            {
                try
                {
                    ServeOnThisThread(client);
                }
                finally
                {
                    Interlocked.Decrement(ref _threadsInUse);
                    ended.SetResult();
                }
            }) { IsBackground = true, Name = "connection" }.UnsafeStart();
        }
        catch (Exception)
        {
            // No thread to be had (a process or cgroup limit): the pool serves this client.
            Interlocked.Decrement(ref _threadsInUse);
            return null;
        }
        return ended.Task;
    }

    private void ServeOnThisThread(Socket client)
    {
        try
        {
            using (client)
            using (var output = new NetworkStream(client, ownsSocket: false))
            using (var input = new ReceiveThreadStream(client))
            {
                var session = input.Run(() => _session(PipeReader.Create(input, _readerOptions), PipeWriter.Create(output, _writerOptions), new SocketGatheredWriter(client), _cts.Token));
                _ = session.Exception; // observed: one broken connection is no one else's business
            }
        }
        catch (Exception)
        {
            // One broken connection never takes the server down.
        }
    }

    /// <summary>Drops every open connection.</summary>
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
        Task[] tasks;
        lock (_connections) tasks = _connections.Select(c => c.Task).ToArray();
        try { await Task.WhenAll(tasks).WaitAsync(TimeSpan.FromSeconds(5)); } catch (Exception) { }
        if (_unixPath is not null) try { File.Delete(_unixPath); } catch (IOException) { }
    }
}

/// <summary>
/// A gathered write straight to a connection: several buffers in one system call (sendmsg with an iovec), without
/// copying them into the output pipe first. For large payloads that already lie in buffers of their own (NBD read
/// data). The caller keeps the buffers alive until the write returns, and uses it only while the connection's
/// output pipe holds nothing unflushed, so that the bytes stay in order.
/// </summary>
public interface IGatheredWriter
{
    /// <summary>Sends what the connection takes now, without waiting; returns how many bytes (0 to all).</summary>
    long TrySend(IList<ArraySegment<byte>> buffers);

    /// <summary>Sends all of it, waiting as long as it takes.</summary>
    ValueTask WriteAsync(IList<ArraySegment<byte>> buffers);
}

internal sealed class SocketGatheredWriter(Socket socket) : IGatheredWriter
{
    public long TrySend(IList<ArraySegment<byte>> buffers)
    {
        // A socket in non-blocking mode makes a synchronous send one sendmsg that takes what fits and returns; the
        // runtime's asynchronous reads and writes work the same in either mode. (Set here, not at accept: the
        // connection's NetworkStream is made only over a blocking socket.)
        if (socket.Blocking) socket.Blocking = false;
        int sent = socket.Send(buffers, SocketFlags.None, out var error);
        if (error is SocketError.Success or SocketError.WouldBlock) return sent;
        throw new IOException($"send failed: {error}", new SocketException((int)error));
    }

    public async ValueTask WriteAsync(IList<ArraySegment<byte>> buffers)
    {
        var pending = buffers;
        while (true)
        {
            long total = 0;
            foreach (var b in pending) total += b.Count;
            int sent = await socket.SendAsync(pending, SocketFlags.None);
            if (sent >= total) return;
            if (sent <= 0) throw new IOException("the connection closed during a send");
            // A short send (the runtime normally sends all of a stream socket's buffers): what is left goes next.
            var rest = new List<ArraySegment<byte>>(pending.Count);
            long skip = sent;
            foreach (var b in pending)
            {
                if (skip >= b.Count)
                {
                    skip -= b.Count;
                    continue;
                }
                rest.Add(b.Slice((int)skip));
                skip = 0;
            }
            pending = rest;
        }
    }
}
