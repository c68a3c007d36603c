using System.IO.Pipelines;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Threading.Channels;

namespace Strata.Protocol.Qmp;

/// <summary>
/// An async QMP client: connects, negotiates, runs commands (one reply per id) and exposes events as an async
/// stream. Works against strata daemon, qemu-storage-daemon and QEMU alike. A line from the server longer than a
/// QMP server accepts as input ends the connection with <see cref="QmpLineTooLongException"/>, which every
/// command waiting for a reply then throws.
/// </summary>
public sealed class QmpClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly QmpLineReader _reader;
    private readonly SemaphoreSlim _commandLock = new(1, 1);
    private readonly Channel<JsonObject> _events = Channel.CreateUnbounded<JsonObject>();
    private readonly Dictionary<long, TaskCompletionSource<JsonObject>> _pending = new();
    private readonly Task _readLoop;
    private long _nextId;
    /// <summary>The qmp_capabilities sent on connecting, whose reply no command waits for before it is sent.</summary>
    private Task _negotiation = Task.CompletedTask;

    /// <summary>Completes once the server has greeted and accepted the negotiation; fails with why not: a
    /// <see cref="QmpGreetingException"/> for a server that is not QMP, the server's error for a refused negotiation.
    /// Commands need not wait for it (each checks it), but a caller about to do something it cannot take back can.</summary>
    public Task Negotiated => _negotiation;
    /// <summary>The QEMU version the server's greeting gives (strata daemon gives the one whose QMP it answers); null
    /// before the greeting has been read, or when it names none. Set before any reply is delivered, so it is known
    /// once <see cref="Negotiated"/> or any command has completed.</summary>
    public Version? ServerVersion => _serverVersion;
    private volatile Version? _serverVersion;
    /// <summary>Why the connection ended, once it has (under the lock of <see cref="_pending"/>).</summary>
    private Exception? _closed;

    private QmpClient(Socket socket, QmpLineReader reader, NetworkStream stream)
    {
        _socket = socket;
        _stream = stream;
        _reader = reader;
        _readLoop = Task.Run(ReadLoopAsync);
    }

    public static async Task<QmpClient> ConnectUnixAsync(string path, CancellationToken ct = default) =>
        await ConnectAsync(new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified), new UnixDomainSocketEndPoint(path), ct);

    public static async Task<QmpClient> ConnectTcpAsync(string host, int port, CancellationToken ct = default) =>
        await ConnectAsync(new Socket(SocketType.Stream, ProtocolType.Tcp), new System.Net.DnsEndPoint(host, port), ct);

    private static async Task<QmpClient> ConnectAsync(Socket socket, System.Net.EndPoint endPoint, CancellationToken ct)
    {
        try
        {
            await socket.ConnectAsync(endPoint, ct);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
        var stream = new NetworkStream(socket, ownsSocket: false);
        var client = new QmpClient(socket, new QmpLineReader(PipeReader.Create(stream, new StreamPipeReaderOptions(leaveOpen: true))), stream);
        // Sent at once, neither the greeting nor the reply waited for: a QMP server reads what arrived after sending its
        // greeting and answers commands in the order they came, so the caller's first commands go out right behind and
        // the connection costs no round trip of its own. The read loop takes the greeting; a command whose reply comes
        // back checks the negotiation first (answered before it), so a server that is not QMP, or refuses the
        // negotiation, fails that command with the reason.
        client._negotiation = client.ExecuteAsync("qmp_capabilities");
        // Seen by the commands behind it; with none, its failure is nobody's news.
        _ = client._negotiation.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        return client;
    }

    /// <summary>Events in arrival order.</summary>
    public IAsyncEnumerable<JsonObject> Events(CancellationToken ct = default) => _events.Reader.ReadAllAsync(ct);

    /// <summary>Runs a command and returns its "return" value; an error reply throws <see cref="QmpException"/>.</summary>
    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments = null, CancellationToken ct = default)
    {
        long id = Interlocked.Increment(ref _nextId);
        var tcs = new TaskCompletionSource<JsonObject>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_pending)
        {
            if (_closed is not null) throw Failure(_closed);
            _pending[id] = tcs;
        }
        var message = new JsonObject { ["execute"] = command, ["id"] = id };
        if (arguments is not null) message["arguments"] = arguments;
        var bytes = Encoding.UTF8.GetBytes(message.ToJsonString() + "\n");
        await _commandLock.WaitAsync(ct);
        try
        {
            await _stream.WriteAsync(bytes, ct);
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException)
        {
            // Not sent: no reply to wait for. The read loop ends on the same broken connection, and its reason is the one
            // to give (a server that did not greet like QMP, rather than a broken pipe).
            lock (_pending) _pending.Remove(id);
            try { await _readLoop.WaitAsync(TimeSpan.FromSeconds(5), CancellationToken.None); } catch (Exception) { }
            lock (_pending)
                if (_closed is not null) throw Failure(_closed);
            throw;
        }
        catch (OperationCanceledException)
        {
            lock (_pending) _pending.Remove(id);
            throw;
        }
        finally
        {
            _commandLock.Release();
        }
        var reply = await tcs.Task.WaitAsync(ct);
        if (command != "qmp_capabilities" && !_negotiation.IsCompletedSuccessfully) await _negotiation;
        if (reply["error"] is JsonObject error)
            throw new QmpException(error["class"]?.GetValue<string>() ?? "GenericError", error["desc"]?.GetValue<string>() ?? "");
        return reply["return"];
    }

    private async Task ReadLoopAsync()
    {
        Exception reason = new IOException("QMP connection closed");
        try
        {
            if (await _reader.ReadLineAsync() is not { } greeting)
            {
                reason = new QmpGreetingException("the server closed the connection before its QMP greeting");
                return;
            }
            JsonNode? hello;
            try
            {
                hello = JsonNode.Parse(greeting);
            }
            catch (JsonException)
            {
                hello = null;
            }
            if (hello is not JsonObject || !hello.AsObject().ContainsKey("QMP"))
            {
                reason = new QmpGreetingException("the server's first line is not a QMP greeting");
                try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
                return;
            }
            _serverVersion = GreetingVersion(hello);
            while (await _reader.ReadLineAsync() is { } line)
            {
                if (line.Length == 0) continue;
                if (JsonNode.Parse(line) is not JsonObject msg) continue;
                if (msg.ContainsKey("event"))
                {
                    _events.Writer.TryWrite(msg);
                    continue;
                }
                if (msg["id"] is JsonValue idValue && idValue.TryGetValue<long>(out long id))
                {
                    TaskCompletionSource<JsonObject>? tcs;
                    lock (_pending) _pending.Remove(id, out tcs);
                    tcs?.TrySetResult(msg);
                }
            }
        }
        catch (QmpLineTooLongException e)
        {
            reason = e;
            // Nothing after it can be trusted to be a message boundary.
            try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
        }
        catch (JsonException e)
        {
            reason = new IOException("QMP server sent something that is not JSON: " + e.Message, e);
            try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
        }
        catch (Exception e) when (e is IOException or SocketException or ObjectDisposedException or OperationCanceledException)
        {
            // The connection went away (or was disposed): "closed" says it.
        }
        catch (Exception e)
        {
            reason = new IOException("QMP client failed reading a reply: " + e.Message, e);
        }
        finally
        {
            _events.Writer.TryComplete();
            lock (_pending)
            {
                _closed = reason;
                foreach (var t in _pending.Values) t.TrySetException(Failure(reason));
                _pending.Clear();
            }
        }
    }

    /// <summary>QMP.version.qemu {major, minor, micro} of a greeting, when all three are whole numbers.</summary>
    internal static Version? GreetingVersion(JsonNode greeting) =>
        (greeting as JsonObject)?["QMP"] is JsonObject qmp && qmp["version"] is JsonObject version && version["qemu"] is JsonObject v
        && v["major"] is JsonValue major && major.TryGetValue<int>(out int ma) && ma >= 0
        && v["minor"] is JsonValue minor && minor.TryGetValue<int>(out int mi) && mi >= 0
        && v["micro"] is JsonValue micro && micro.TryGetValue<int>(out int mc) && mc >= 0
            ? new Version(ma, mi, mc)
            : null;

    /// <summary>What a command gets once the connection has ended for <paramref name="reason"/>.</summary>
    private static Exception Failure(Exception reason) => reason switch
    {
        QmpLineTooLongException => reason,
        QmpGreetingException => new QmpGreetingException(reason.Message),
        _ => new IOException(reason.Message, reason),
    };

    public async ValueTask DisposeAsync()
    {
        // The server may already be gone (after quit): closing is best effort.
        try { _socket.Shutdown(SocketShutdown.Both); } catch (SocketException) { }
        _socket.Dispose();
        try { await _readLoop; } catch (Exception) { }
        await _stream.DisposeAsync();
    }
}

/// <summary>The server at a QMP address did not greet like a QMP server (or hung up first): not a monitor, or not
/// this tool's to talk to.</summary>
public sealed class QmpGreetingException(string message) : IOException(message);
