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
/// (any number in flight, matched by cookie). Reads qemu-nbd, qemu-storage-daemon and strata daemon exports.
/// </summary>
public sealed class NbdClient : IAsyncDisposable
{
    private readonly Socket _socket;
    private readonly NetworkStream _stream;
    private readonly SemaphoreSlim _sendLock = new(1, 1);
    private readonly Dictionary<ulong, Pending> _pending = new();
    private readonly Dictionary<string, uint> _contexts = new(StringComparer.Ordinal);
    private Task? _readLoop;
    private long _nextCookie;
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
        public readonly Dictionary<uint, List<(uint Length, uint Flags)>> Extents = new();
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
        await socket.ConnectAsync(endPoint, ct);
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

    private async Task<Pending> SendAsync(NbdCommand command, NbdCommandFlags flags, long offset, uint length, ReadOnlyMemory<byte> payload, Memory<byte> destination)
    {
        ulong cookie = (ulong)Interlocked.Increment(ref _nextCookie);
        var p = new Pending(command, offset, destination);
        lock (_pending) _pending[cookie] = p;
        var header = new byte[NbdConst.RequestHeaderLength];
        new NbdRequest(flags, command, cookie, (ulong)offset, length).Write(header);
        await _sendLock.WaitAsync();
        try
        {
            await _stream.WriteAsync(header);
            if (!payload.IsEmpty) await _stream.WriteAsync(payload);
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
        return p.Extents.TryGetValue(id, out var list) ? list : [];
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

    private async Task ReadLoopAsync()
    {
        try
        {
            var magic = new byte[4];
            while (true)
            {
                await _stream.ReadExactlyAsync(magic);
                uint m = BinaryPrimitives.ReadUInt32BigEndian(magic);
                if (m == NbdConst.SimpleReplyMagic)
                {
                    var rest = await ReadExactAsync(12, CancellationToken.None);
                    uint error = BinaryPrimitives.ReadUInt32BigEndian(rest);
                    ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4));
                    var p = Take(cookie);
                    if (error == 0 && p.Command == NbdCommand.Read && p.Destination.Length > 0) await _stream.ReadExactlyAsync(p.Destination);
                    if (error != 0) p.Error = new NbdException($"request failed with errno {error}", error);
                    p.Done.TrySetResult();
                }
                else if (m == NbdConst.StructuredReplyMagic)
                {
                    var h = await ReadExactAsync(16, CancellationToken.None);
                    bool done = (BinaryPrimitives.ReadUInt16BigEndian(h) & 1) != 0;
                    var type = (NbdReplyType)BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(2));
                    ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(4));
                    uint length = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12));
                    Pending p;
                    lock (_pending) p = _pending[cookie];
                    switch (type)
                    {
                        case NbdReplyType.OffsetData:
                        {
                            var off = await ReadExactAsync(8, CancellationToken.None);
                            long at = (long)BinaryPrimitives.ReadUInt64BigEndian(off) - p.Offset;
                            int n = (int)length - 8;
                            if (at < 0 || at + n > p.Destination.Length) throw new NbdException("data chunk outside the request");
                            await _stream.ReadExactlyAsync(p.Destination.Slice((int)at, n));
                            break;
                        }
                        case NbdReplyType.OffsetHole:
                        {
                            var b = await ReadExactAsync(12, CancellationToken.None);
                            long at = (long)BinaryPrimitives.ReadUInt64BigEndian(b) - p.Offset;
                            int n = (int)BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(8));
                            if (at < 0 || at + n > p.Destination.Length) throw new NbdException("hole chunk outside the request");
                            p.Destination.Span.Slice((int)at, n).Clear();
                            break;
                        }
                        case NbdReplyType.BlockStatus:
                        {
                            var b = await ReadExactAsync((int)length, CancellationToken.None);
                            uint id = BinaryPrimitives.ReadUInt32BigEndian(b);
                            var list = new List<(uint, uint)>();
                            for (int i = 4; i + 8 <= b.Length; i += 8)
                                list.Add((BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(i)), BinaryPrimitives.ReadUInt32BigEndian(b.AsSpan(i + 4))));
                            p.Extents[id] = list;
                            break;
                        }
                        case NbdReplyType.Error:
                        case NbdReplyType.ErrorOffset:
                        {
                            var b = await ReadExactAsync((int)length, CancellationToken.None);
                            uint errno = BinaryPrimitives.ReadUInt32BigEndian(b);
                            int ml = BinaryPrimitives.ReadUInt16BigEndian(b.AsSpan(4));
                            p.Error = new NbdException(Encoding.UTF8.GetString(b, 6, Math.Min(ml, b.Length - 6)), errno);
                            break;
                        }
                        default:
                            await ReadExactAsync((int)length, CancellationToken.None);
                            break;
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
                foreach (var p in _pending.Values)
                {
                    p.Error ??= e as NbdException ?? new NbdException("connection lost: " + e.Message);
                    p.Done.TrySetResult();
                }
                _pending.Clear();
            }
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
