using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>An NBD error from the server: the protocol errno and its message.</summary>
public sealed class NbdException(string message, uint errno = 0) : IOException(message)
{
    public uint Errno { get; } = errno;
}

/// <summary>
/// An NBD client: fixed-newstyle handshake with structured replies and meta contexts, then pipelined requests
/// (any number in flight, matched by cookie), asynchronous or — for block drivers on threads of their own —
/// synchronous. Reads qemu-nbd, qemu-storage-daemon and strata daemon exports.
/// </summary>
public sealed class NbdClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly Dictionary<ulong, Pending> _pending = new();
    private readonly Dictionary<string, uint> _contexts = new(StringComparer.Ordinal);
    private Task? _readLoop;
    private ulong _nextCookie;
    /// <summary>Set (under the pending lock) once the connection can no longer carry requests.</summary>
    private NbdException? _broken;
    private bool _structured;

    public long Size { get; private set; }
    public NbdTransmissionFlags Flags { get; private set; }
    public IReadOnlyDictionary<string, uint> Contexts => _contexts;
    public bool ReadOnly => (Flags & NbdTransmissionFlags.ReadOnly) != 0;

    private sealed class Pending(NbdCommand command, long offset, Memory<byte> destination)
    {
        public readonly NbdCommand Command = command;
        public readonly long Offset = offset;
        public readonly Memory<byte> Destination = destination;
        public readonly TaskCompletionSource Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public Dictionary<uint, List<(uint Length, uint Flags)>>? Extents;
        public NbdException? Error;
    }

    private NbdClient(Socket socket)
    {
        _socket = socket;
        _stream = new NetworkStream(socket, ownsSocket: true);
    }

    public static Task<NbdClient> ConnectUnixAsync(string path, string export, IEnumerable<string>? contexts = null, CancellationToken ct = default) =>
        ConnectAsync(new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified), new UnixDomainSocketEndPoint(path), export, contexts, ct);

    public static Task<NbdClient> ConnectTcpAsync(string host, int port, string export, IEnumerable<string>? contexts = null, CancellationToken ct = default) =>
        ConnectAsync(new Socket(SocketType.Stream, ProtocolType.Tcp) { NoDelay = true }, new System.Net.DnsEndPoint(host, port), export, contexts, ct);

    private static async Task<NbdClient> ConnectAsync(Socket socket, System.Net.EndPoint endPoint, string export, IEnumerable<string>? contexts, CancellationToken ct)
    {
        try
        {
            await socket.ConnectAsync(endPoint, ct);
        }
        catch
        {
            socket.Dispose();   // not left to the finalizer: a caller that tries again would hold one per attempt
            throw;
        }
        var client = new NbdClient(socket);
        try
        {
            await client.HandshakeAsync(export, contexts?.ToList() ?? [], ct);
        }
        catch
        {
            await client.DisposeAsync();
            throw;
        }
        client._readLoop = Task.Run(client.ReadLoopAsync);
        return client;
    }

    private async Task<byte[]> ReadExactAsync(int count, CancellationToken ct)
    {
        var b = new byte[count];
        await _stream.ReadExactlyAsync(b, ct);
        return b;
    }

    private async Task HandshakeAsync(string export, List<string> contexts, CancellationToken ct)
    {
        var hello = await ReadExactAsync(18, ct);
        if (BinaryPrimitives.ReadUInt64BigEndian(hello) != NbdConst.NbdMagic || BinaryPrimitives.ReadUInt64BigEndian(hello.AsSpan(8)) != NbdConst.IHaveOpt)
            throw new NbdException("not a fixed-newstyle NBD server");
        ushort serverFlags = BinaryPrimitives.ReadUInt16BigEndian(hello.AsSpan(16));
        if ((serverFlags & NbdConst.FlagFixedNewstyle) == 0) throw new NbdException("server does not support fixed newstyle");
        uint clientFlags = NbdConst.ClientFlagFixedNewstyle | ((serverFlags & NbdConst.FlagNoZeroes) != 0 ? NbdConst.ClientFlagNoZeroes : 0);
        var cf = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(cf, clientFlags);
        await _stream.WriteAsync(cf, ct);

        await SendOptionAsync(NbdOption.StructuredReply, [], ct);
        var (type, _) = await ReadOptionReplyAsync(NbdOption.StructuredReply, ct);
        _structured = type == NbdReply.Ack;
        if (contexts.Count > 0)
        {
            if (!_structured) throw new NbdException("server refused structured replies, which meta contexts need");
            var name = Encoding.UTF8.GetBytes(export);
            var queries = contexts.Select(Encoding.UTF8.GetBytes).ToList();
            var data = new byte[8 + name.Length + queries.Sum(q => 4 + q.Length)];
            int pos = 0;
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(pos), (uint)name.Length); pos += 4;
            name.CopyTo(data, pos); pos += name.Length;
            BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(pos), (uint)queries.Count); pos += 4;
            foreach (var q in queries)
            {
                BinaryPrimitives.WriteUInt32BigEndian(data.AsSpan(pos), (uint)q.Length); pos += 4;
                q.CopyTo(data, pos); pos += q.Length;
            }
            await SendOptionAsync(NbdOption.SetMetaContext, data, ct);
            while (true)
            {
                var (t, payload) = await ReadOptionReplyAsync(NbdOption.SetMetaContext, ct);
                if (t == NbdReply.Ack) break;
                if (t == NbdReply.MetaContext)
                    _contexts[Encoding.UTF8.GetString(payload, 4, payload.Length - 4)] = BinaryPrimitives.ReadUInt32BigEndian(payload);
                else ThrowOptionError(t, payload, "SET_META_CONTEXT");
            }
        }
        var exportName = Encoding.UTF8.GetBytes(export);
        var go = new byte[6 + exportName.Length];
        BinaryPrimitives.WriteUInt32BigEndian(go, (uint)exportName.Length);
        exportName.CopyTo(go, 4);
        await SendOptionAsync(NbdOption.Go, go, ct);
        while (true)
        {
            var (t, payload) = await ReadOptionReplyAsync(NbdOption.Go, ct);
            if (t == NbdReply.Ack) break;
            if (t == NbdReply.Info)
            {
                if (payload.Length >= 12 && BinaryPrimitives.ReadUInt16BigEndian(payload) == (ushort)NbdInfo.Export)
                {
                    Size = (long)BinaryPrimitives.ReadUInt64BigEndian(payload.AsSpan(2));
                    Flags = (NbdTransmissionFlags)BinaryPrimitives.ReadUInt16BigEndian(payload.AsSpan(10));
                }
                continue;
            }
            ThrowOptionError(t, payload, "GO");
        }
    }

    private static void ThrowOptionError(NbdReply type, byte[] payload, string option) =>
        throw new NbdException($"{option} failed: {type}{(payload.Length > 0 ? ": " + Encoding.UTF8.GetString(payload) : "")}");

    private async Task SendOptionAsync(NbdOption option, byte[] data, CancellationToken ct)
    {
        var head = new byte[16 + data.Length];
        BinaryPrimitives.WriteUInt64BigEndian(head, NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(head.AsSpan(8), (uint)option);
        BinaryPrimitives.WriteUInt32BigEndian(head.AsSpan(12), (uint)data.Length);
        data.CopyTo(head, 16);
        await _stream.WriteAsync(head, ct);
    }

    private async Task<(NbdReply Type, byte[] Payload)> ReadOptionReplyAsync(NbdOption option, CancellationToken ct)
    {
        var h = await ReadExactAsync(20, ct);
        if (BinaryPrimitives.ReadUInt64BigEndian(h) != NbdConst.OptReplyMagic) throw new NbdException("bad option reply magic");
        if (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8)) != (uint)option) throw new NbdException("option reply for another option");
        var type = (NbdReply)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12));
        uint length = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16));
        if (length > NbdConst.MaxOptionLength) throw new NbdException("option reply too large");
        return (type, await ReadExactAsync((int)length, ct));
    }

    // ------------------------------------------------------------------ transmission
    //
    // Any number of requests in flight, matched by cookie. Only the reply reader completes a request (with its
    // reply, or with the connection's failure when it stops), so a request's destination is never written after
    // its caller has been released. Once the connection has failed, every new request fails at once.

    /// <summary>Zero and trim requests split larger ranges into requests of this size (the length is 32 bits).</summary>
    private const long MaxRangeRequest = 1L << 30;

    /// <summary>Largest block status and error chunks accepted from a server: a misbehaving server cannot make the
    /// reply reader allocate gigabytes.</summary>
    private const int MaxStatusChunk = NbdConst.MaxPayload;
    private const int MaxErrorChunk = 64 << 10;

    private Pending Register(NbdCommand command, long offset, Memory<byte> destination, out ulong cookie)
    {
        var p = new Pending(command, offset, destination);
        lock (_pending)
        {
            if (_broken is not null) throw new NbdException(_broken.Message);
            cookie = ++_nextCookie;
            _pending[cookie] = p;
        }
        return p;
    }

    /// <summary>A request could not be sent whole: the stream is out of step, so the connection is finished. The
    /// reply reader, woken by the shutdown, fails whatever is in flight.</summary>
    private void Break(Exception e)
    {
        lock (_pending) _broken ??= new NbdException("connection lost: " + e.Message);
        try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
    }

    private static bool IsConnectionError(Exception e) => e is IOException or SocketException or ObjectDisposedException;

    private async Task<Pending> SendAsync(NbdCommand command, NbdCommandFlags flags, long offset, uint length, ReadOnlyMemory<byte> payload, Memory<byte> destination)
    {
        var p = Register(command, offset, destination, out ulong cookie);
        var header = new byte[NbdConst.RequestHeaderLength];
        new NbdRequest(flags, command, cookie, (ulong)offset, length).Write(header);
        await _sendLock.WaitAsync();
        try
        {
            await _stream.WriteAsync(header);
            if (!payload.IsEmpty) await _stream.WriteAsync(payload);
        }
        catch (Exception e) when (IsConnectionError(e))
        {
            Break(e);
        }
        finally
        {
            _sendLock.Release();
        }
        await p.Done.Task;
        if (p.Error is not null) throw p.Error;
        return p;
    }

    public async Task ReadAsync(long offset, Memory<byte> destination, bool df = false) =>
        await SendAsync(NbdCommand.Read, df ? NbdCommandFlags.Df : 0, offset, (uint)destination.Length, default, destination);

    public async Task WriteAsync(long offset, ReadOnlyMemory<byte> data, bool fua = false) =>
        await SendAsync(NbdCommand.Write, fua ? NbdCommandFlags.Fua : 0, offset, (uint)data.Length, data, default);

    public async Task WriteZeroesAsync(long offset, uint length, bool noHole = false) =>
        await SendAsync(NbdCommand.WriteZeroes, noHole ? NbdCommandFlags.NoHole : 0, offset, length, default, default);

    public async Task TrimAsync(long offset, uint length) => await SendAsync(NbdCommand.Trim, 0, offset, length, default, default);

    public async Task FlushAsync() => await SendAsync(NbdCommand.Flush, 0, 0, 0, default, default);

    /// <summary>Block status of one negotiated context: extents (length, flags) from <paramref name="offset"/>.</summary>
    public async Task<IReadOnlyList<(uint Length, uint Flags)>> BlockStatusAsync(string context, long offset, uint length, bool reqOne = false)
    {
        if (!_contexts.TryGetValue(context, out uint id)) throw new NbdException($"meta context '{context}' was not negotiated");
        var p = await SendAsync(NbdCommand.BlockStatus, reqOne ? NbdCommandFlags.ReqOne : 0, offset, length, default, default);
        return p.Extents?.GetValueOrDefault(id) ?? [];
    }

    // ------------------------------------------------------------------ synchronous requests
    //
    // For callers with a thread of their own to block (a block driver on the block I/O threads): the request is
    // written from the calling thread and the reply reader wakes it directly — no thread-pool thread is needed to
    // hand the result over, and spans are used in place (no copy, no temporary array). Ranges of any length are
    // split into requests the protocol allows, all in flight at once.

    /// <summary>Reads <paramref name="destination"/>.Length bytes at <paramref name="offset"/> (any length).</summary>
    public unsafe void Read(long offset, Span<byte> destination, bool df = false)
    {
        fixed (byte* pointer = destination)
        {
            // The reply reader fills the span through this; it is done with it before the wait below returns.
            var memory = new PointerMemory(pointer, destination.Length).Memory;
            var requests = new List<Pending>();
            Exception? failure = null;
            for (int pos = 0; pos < destination.Length || pos == 0; pos += NbdConst.MaxPayload)
            {
                int n = Math.Min(NbdConst.MaxPayload, destination.Length - pos);
                if (!TrySend(NbdCommand.Read, df ? NbdCommandFlags.Df : 0, offset + pos, (uint)n, default, memory.Slice(pos, n), requests, ref failure)) break;
                if (destination.Length == 0) break;
            }
            WaitAll(requests, failure);
        }
    }

    /// <summary>Writes <paramref name="data"/> at <paramref name="offset"/> (any length).</summary>
    public void Write(long offset, ReadOnlySpan<byte> data, bool fua = false)
    {
        var requests = new List<Pending>();
        Exception? failure = null;
        for (int pos = 0; pos < data.Length || pos == 0; pos += NbdConst.MaxPayload)
        {
            int n = Math.Min(NbdConst.MaxPayload, data.Length - pos);
            if (!TrySend(NbdCommand.Write, fua ? NbdCommandFlags.Fua : 0, offset + pos, (uint)n, data.Slice(pos, n), default, requests, ref failure)) break;
            if (data.Length == 0) break;
        }
        WaitAll(requests, failure);
    }

    /// <summary>Zeroes a range of any length.</summary>
    public void WriteZeroes(long offset, long length, bool noHole = false) =>
        RangeRequests(NbdCommand.WriteZeroes, noHole ? NbdCommandFlags.NoHole : 0, offset, length);

    /// <summary>Trims a range of any length.</summary>
    public void Trim(long offset, long length) => RangeRequests(NbdCommand.Trim, 0, offset, length);

    public void Flush() => RangeRequests(NbdCommand.Flush, 0, 0, 0);

    /// <summary>Block status of one negotiated context (one request: up to 4 GiB - 1).</summary>
    public IReadOnlyList<(uint Length, uint Flags)> BlockStatus(string context, long offset, uint length, bool reqOne = false)
    {
        if (!_contexts.TryGetValue(context, out uint id)) throw new NbdException($"meta context '{context}' was not negotiated");
        var requests = new List<Pending>(1);
        Exception? failure = null;
        TrySend(NbdCommand.BlockStatus, reqOne ? NbdCommandFlags.ReqOne : 0, offset, length, default, default, requests, ref failure);
        WaitAll(requests, failure);
        return requests[0].Extents?.GetValueOrDefault(id) ?? [];
    }

    private void RangeRequests(NbdCommand command, NbdCommandFlags flags, long offset, long length)
    {
        var requests = new List<Pending>();
        Exception? failure = null;
        for (long pos = 0; pos < length || pos == 0; pos += MaxRangeRequest)
        {
            uint n = (uint)Math.Min(MaxRangeRequest, length - pos);
            if (!TrySend(command, flags, offset + pos, n, default, default, requests, ref failure)) break;
            if (length == 0) break;
        }
        WaitAll(requests, failure);
    }

    /// <summary>Registers and writes one request from the calling thread; false (and <paramref name="failure"/>) when
    /// the connection is broken, after which no more are sent.</summary>
    private bool TrySend(NbdCommand command, NbdCommandFlags flags, long offset, uint length, ReadOnlySpan<byte> payload, Memory<byte> destination,
        List<Pending> requests, ref Exception? failure)
    {
        Pending p;
        ulong cookie;
        try
        {
            p = Register(command, offset, destination, out cookie);
        }
        catch (NbdException e)
        {
            failure = e;
            return false;
        }
        requests.Add(p);
        Span<byte> header = stackalloc byte[NbdConst.RequestHeaderLength];
        new NbdRequest(flags, command, cookie, (ulong)offset, length).Write(header);
        _sendLock.Wait();
        try
        {
            SendAll(header);
            if (!payload.IsEmpty) SendAll(payload);
            return true;
        }
        catch (Exception e) when (IsConnectionError(e))
        {
            Break(e);
            return false;
        }
        finally
        {
            _sendLock.Release();
        }
    }

    private void SendAll(ReadOnlySpan<byte> bytes)
    {
        while (!bytes.IsEmpty) bytes = bytes[_socket.Send(bytes)..];
    }

    /// <summary>Waits for every request sent (whatever happened to the others: the caller's buffers must be free
    /// when this returns), then throws the first failure.</summary>
    private static void WaitAll(List<Pending> requests, Exception? failure)
    {
        foreach (var p in requests) p.Done.Task.GetAwaiter().GetResult();
        foreach (var p in requests)
            if (p.Error is not null) throw p.Error;
        if (failure is not null) throw failure;
    }

    /// <summary>Memory over a pinned span, for the reply reader (valid only while the span is fixed).</summary>
    private sealed unsafe class PointerMemory(byte* pointer, int length) : System.Buffers.MemoryManager<byte>
    {
        public override Span<byte> GetSpan() => new(pointer, length);
        public override System.Buffers.MemoryHandle Pin(int elementIndex = 0) => new(pointer + elementIndex);
        public override void Unpin() { }
        protected override void Dispose(bool disposing) { }
    }

    /// <summary>Every extent of a context over the whole export, with the given flag set ("dirty" ranges).</summary>
    public async Task<List<(long Offset, long Length)>> ExtentsWithFlagAsync(string context, uint flag, uint chunk = 1u << 30)
    {
        var result = new List<(long, long)>();
        long pos = 0;
        while (pos < Size)
        {
            uint len = (uint)Math.Min(chunk, Size - pos);
            var extents = await BlockStatusAsync(context, pos, len);
            if (extents.Count == 0) throw new NbdException("empty block status reply");
            foreach (var (l, f) in extents)
            {
                long el = Math.Min(l, Size - pos);
                if ((f & flag) != 0)
                {
                    if (result.Count > 0 && result[^1].Item1 + result[^1].Item2 == pos) result[^1] = (result[^1].Item1, result[^1].Item2 + el);
                    else result.Add((pos, el));
                }
                pos += el;
                if (pos >= Size) break;
            }
        }
        return result;
    }

    /// <summary>The reply reader: one per connection, the only one to complete requests.</summary>
    private async Task ReadLoopAsync()
    {
        try
        {
            // Reused for every reply: fixed-size headers and the small chunk bodies.
            var head = new byte[20];
            var input = new ReplyInput(_stream);
            var scratch = new byte[64 << 10];
            while (true)
            {
                await input.ReadExactlyAsync(head.AsMemory(0, 4));
                uint m = BinaryPrimitives.ReadUInt32BigEndian(head);
                if (m == NbdConst.SimpleReplyMagic)
                {
                    await input.ReadExactlyAsync(head.AsMemory(4, 12));
                    uint error = BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(4));
                    ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(head.AsSpan(8));
                    var p = Take(cookie);
                    if (error == 0 && p.Command == NbdCommand.Read && p.Destination.Length > 0) await input.ReadExactlyAsync(p.Destination);
                    if (error != 0) p.Error = new NbdException($"request failed with errno {error}", error);
                    p.Done.TrySetResult();
                }
                else if (m == NbdConst.StructuredReplyMagic)
                {
                    await input.ReadExactlyAsync(head.AsMemory(4, 16));
                    bool done = (BinaryPrimitives.ReadUInt16BigEndian(head.AsSpan(4)) & 1) != 0;
                    var type = (NbdReplyType)BinaryPrimitives.ReadUInt16BigEndian(head.AsSpan(6));
                    ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(head.AsSpan(8));
                    uint length = BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(16));
                    Pending? p;
                    lock (_pending) _pending.TryGetValue(cookie, out p);
                    if (p is null) throw new NbdException($"reply for unknown cookie {cookie}");
                    switch (type)
                    {
                        case NbdReplyType.None:
                            if (length != 0) throw new NbdException("NONE chunk with a payload");
                            break;
                        case NbdReplyType.OffsetData:
                        {
                            if (length < 8) throw new NbdException("data chunk too short");
                            await input.ReadExactlyAsync(scratch.AsMemory(0, 8));
                            long at = (long)BinaryPrimitives.ReadUInt64BigEndian(scratch) - p.Offset;
                            long n = length - 8L;
                            if (at < 0 || at + n > p.Destination.Length) throw new NbdException("data chunk outside the request");
                            await input.ReadExactlyAsync(p.Destination.Slice((int)at, (int)n));
                            break;
                        }
                        case NbdReplyType.OffsetHole:
                        {
                            if (length != 12) throw new NbdException("hole chunk of the wrong size");
                            await input.ReadExactlyAsync(scratch.AsMemory(0, 12));
                            long at = (long)BinaryPrimitives.ReadUInt64BigEndian(scratch) - p.Offset;
                            long n = BinaryPrimitives.ReadUInt32BigEndian(scratch.AsSpan(8));
                            if (at < 0 || at + n > p.Destination.Length) throw new NbdException("hole chunk outside the request");
                            p.Destination.Span.Slice((int)at, (int)n).Clear();
                            break;
                        }
                        case NbdReplyType.BlockStatus:
                        {
                            if (length < 4 || length > MaxStatusChunk || (length - 4) % 8 != 0) throw new NbdException("malformed block status chunk");
                            var b = length <= scratch.Length ? scratch : new byte[length];
                            await input.ReadExactlyAsync(b.AsMemory(0, (int)length));
                            uint id = BinaryPrimitives.ReadUInt32BigEndian(b);
                            var list = new List<(uint, uint)>((int)(length - 4) / 8);
                            for (int i = 4; i + 8 <= length; i += 8)
                                list.Add((BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(i)), BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(i + 4))));
                            (p.Extents ??= new())[id] = list;
                            break;
                        }
                        default:
                        {
                            if (((ushort)type & 0x8000) == 0)
                            {
                                // An unknown chunk that is not an error: skip it, in pieces.
                                if (length > NbdConst.MaxPayload) throw new NbdException($"chunk of type {(ushort)type} too large");
                                for (long left = length; left > 0; left -= Math.Min(left, scratch.Length))
                                    await input.ReadExactlyAsync(scratch.AsMemory(0, (int)Math.Min(left, scratch.Length)));
                                break;
                            }
                            // Error, error with offset, and error types this client does not know: errno, message, rest.
                            if (length < 6 || length > MaxErrorChunk) throw new NbdException("malformed error chunk");
                            await input.ReadExactlyAsync(scratch.AsMemory(0, (int)length));
                            uint errno = BinaryPrimitives.ReadUInt32BigEndian(scratch);
                            int ml = Math.Min(BinaryPrimitives.ReadUInt16BigEndian(scratch.AsSpan(4)), (int)length - 6);
                            p.Error = new NbdException(Encoding.UTF8.GetString(scratch, 6, ml), errno);
                            break;
                        }
                    }
                    if (done)
                    {
                        Take(cookie);
                        p.Done.TrySetResult();
                    }
                }
                else
                {
                    throw new NbdException($"bad reply magic 0x{m:x8}");
                }
            }
        }
        catch (Exception e)
        {
            lock (_pending)
            {
                _broken ??= e as NbdException ?? new NbdException("connection lost: " + e.Message);
                foreach (var p in _pending.Values)
                {
                    p.Error ??= _broken;
                    p.Done.TrySetResult();
                }
                _pending.Clear();
            }
        }
    }

    /// <summary>
    /// The reply stream with a small read-ahead: the headers and short chunk bodies of several replies come in one
    /// receive instead of one system call each (a read reply is at least three: magic, header, offset). Read data
    /// longer than the read-ahead goes from the socket straight into the caller's buffer.
    /// </summary>
    private sealed class ReplyInput(Stream stream)
    {
        private readonly byte[] _buffer = new byte[64 << 10];
        private int _start, _end;

        public async ValueTask ReadExactlyAsync(Memory<byte> destination)
        {
            int buffered = Math.Min(_end - _start, destination.Length);
            _buffer.AsSpan(_start, buffered).CopyTo(destination.Span);
            _start += buffered;
            destination = destination[buffered..];
            if (destination.IsEmpty) return;
            _start = _end = 0;
            if (destination.Length >= _buffer.Length / 2)
            {
                await stream.ReadExactlyAsync(destination);
                return;
            }
            while (_end < destination.Length)
            {
                int n = await stream.ReadAsync(_buffer.AsMemory(_end));
                if (n == 0) throw new EndOfStreamException();
                _end += n;
            }
            _buffer.AsSpan(0, destination.Length).CopyTo(destination.Span);
            _start = destination.Length;
        }
    }

    private Pending Take(ulong cookie)
    {
        lock (_pending)
        {
            if (!_pending.Remove(cookie, out var p)) throw new NbdException($"reply for unknown cookie {cookie}");
            return p;
        }
    }

    public async ValueTask DisposeAsync()
    {
        try
        {
            if (_readLoop is not null)
            {
                var h = new byte[NbdConst.RequestHeaderLength];
                new NbdRequest(0, NbdCommand.Disc, 0, 0, 0).Write(h);
                await _sendLock.WaitAsync();
                try { await _stream.WriteAsync(h); } finally { _sendLock.Release(); }
            }
        }
        catch (Exception)
        {
        }
        if (_readLoop is not null)
        {
            // Wait (briefly) for the server to close its end after NBD_CMD_DISC: once it has, it no longer counts this
            // connection, so a management tool that deletes the export right after (block-export-del, safe mode)
            // is not told it is still in use.
            try { _socket.Shutdown(SocketShutdown.Send); } catch (Exception) { }
            try { await _readLoop.WaitAsync(TimeSpan.FromSeconds(2)); } catch (Exception) { }
        }
        try { _socket.Shutdown(SocketShutdown.Both); } catch (Exception) { }
        await _stream.DisposeAsync();
        if (_readLoop is not null) try { await _readLoop; } catch (Exception) { }
    }
}
