using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using System.Threading.Channels;
using Strata.Block;
using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>Looks exports up by name for a session (the server's registry).</summary>
public interface INbdExportRegistry
{
    NbdExport? Find(string name);
    IReadOnlyList<NbdExport> All { get; }
    bool MultiConn { get; }
}

/// <summary>
/// One NBD connection over a pipe pair (it never touches a socket): fixed-newstyle handshake and option
/// haggling, then transmission with many requests in flight, replies in completion order, simple or
/// structured, with base:allocation, qemu:allocation-depth and qemu:dirty-bitmap contexts.
/// Protocol violations close this connection; every request gets a reply, failed ones the protocol's errno.
/// </summary>
public sealed class NbdServerSession
{
    /// <summary>Requests admitted and not yet answered (QEMU's MAX_NBD_REQUESTS).</summary>
    private const int MaxInFlight = 16;

    /// <summary>Data buffers (write payloads, read results) of a connection's admitted requests: with 16 requests of
    /// up to 32 MiB a connection could otherwise hold 512 MiB.</summary>
    private const long MaxDataInFlight = 64L << 20;

    private readonly INbdExportRegistry _registry;
    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly BlockIoThreads _ioThreads;
    private readonly SemaphoreSlim _inFlight = new(MaxInFlight, MaxInFlight);
    private readonly ByteBudget _dataBudget = new(MaxDataInFlight);
    private readonly Stack<Request> _idleRequests = new();
    private readonly Channel<Request> _replies = Channel.CreateUnbounded<Request>(new UnboundedChannelOptions { SingleReader = true });
    private CancellationTokenSource? _stopReading;
    private volatile bool _clientGone;
    private bool _structured;
    private bool _noZeroes;
    private string? _contextExport;
    private List<(uint Id, string Name)> _contexts = new();
    private NbdExport? _export;

    /// <param name="ioThreads">Where the image calls run (default: <see cref="BlockIoThreads.Shared"/>).</param>
    public NbdServerSession(INbdExportRegistry registry, PipeReader input, PipeWriter output, BlockIoThreads? ioThreads = null)
    {
        _registry = registry;
        _input = input;
        _output = output;
        _ioThreads = ioThreads ?? BlockIoThreads.Shared;
    }

    public async Task RunAsync(CancellationToken ct)
    {
        try
        {
            if (!await HandshakeAsync(ct)) return;
            Interlocked.Increment(ref _export!.Connections);
            // A hard deletion of this export ends this connection (and no other).
            using var connection = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var registered = _export.RegisterConnection(() => { try { connection.Cancel(); } catch (ObjectDisposedException) { } });
            try
            {
                await TransmitAsync(connection.Token);
            }
            finally
            {
                Interlocked.Decrement(ref _export.Connections);
            }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException or EndOfStreamException)
        {
        }
        finally
        {
            await _input.CompleteAsync();
            await _output.CompleteAsync();
        }
    }

    // ------------------------------------------------------------------ byte helpers

    private async ValueTask<byte[]> ReadExactAsync(int count, CancellationToken ct)
    {
        var result = new byte[count];
        await ReadExactAsync(result, ct);
        return result;
    }

    private async ValueTask ReadExactAsync(Memory<byte> destination, CancellationToken ct)
    {
        int done = 0;
        while (done < destination.Length)
        {
            var r = await _input.ReadAsync(ct);
            var buffer = r.Buffer;
            int take = (int)Math.Min(buffer.Length, destination.Length - done);
            buffer.Slice(0, take).CopyTo(destination.Span[done..]);
            done += take;
            _input.AdvanceTo(buffer.GetPosition(take));
            if (done < destination.Length && r.IsCompleted) throw new EndOfStreamException();
        }
    }

    private async ValueTask SkipAsync(long count, CancellationToken ct)
    {
        while (count > 0)
        {
            var r = await _input.ReadAsync(ct);
            long take = Math.Min(r.Buffer.Length, count);
            _input.AdvanceTo(r.Buffer.GetPosition(take));
            count -= take;
            if (count > 0 && r.IsCompleted) throw new EndOfStreamException();
        }
    }

    /// <summary>Handshake replies, one at a time (transmission replies go through the reply writer).</summary>
    private async ValueTask SendAsync(ReadOnlyMemory<byte> message, CancellationToken ct)
    {
        _output.Write(message.Span);
        var flush = await _output.FlushAsync(ct);
        if (flush.IsCompleted) throw new IOException("client went away");
    }

    // ------------------------------------------------------------------ handshake

    private async Task<bool> HandshakeAsync(CancellationToken ct)
    {
        var hello = new byte[18];
        BinaryPrimitives.WriteUInt64BigEndian(hello, NbdConst.NbdMagic);
        BinaryPrimitives.WriteUInt64BigEndian(hello.AsSpan(8), NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt16BigEndian(hello.AsSpan(16), NbdConst.FlagFixedNewstyle | NbdConst.FlagNoZeroes);
        await SendAsync(hello, ct);
        uint clientFlags = BinaryPrimitives.ReadUInt32BigEndian(await ReadExactAsync(4, ct));
        if ((clientFlags & ~(NbdConst.ClientFlagFixedNewstyle | NbdConst.ClientFlagNoZeroes)) != 0) return false;
        _noZeroes = (clientFlags & NbdConst.ClientFlagNoZeroes) != 0;
        while (true)
        {
            var head = await ReadExactAsync(16, ct);
            if (BinaryPrimitives.ReadUInt64BigEndian(head) != NbdConst.IHaveOpt) return false;
            uint option = BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(8));
            uint length = BinaryPrimitives.ReadUInt32BigEndian(head.AsSpan(12));
            if (length > NbdConst.MaxOptionLength)
            {
                // Oversize option data: refuse it, and drop a client that insists on sending megabytes.
                if (length > 16 * NbdConst.MaxOptionLength) return false;
                await SkipAsync(length, ct);
                await ErrorReplyAsync(option, NbdReply.ErrTooBig, "option too large", ct);
                continue;
            }
            var data = await ReadExactAsync((int)length, ct);
            switch ((NbdOption)option)
            {
                case NbdOption.ExportName:
                {
                    var export = _registry.Find(Encoding.UTF8.GetString(data));
                    if (export is null || export.ShuttingDown) return false; // no error reply exists for this option
                    _export = export;
                    var reply = new byte[_noZeroes ? 10 : 134];
                    BinaryPrimitives.WriteUInt64BigEndian(reply, (ulong)export.Image.Size);
                    BinaryPrimitives.WriteUInt16BigEndian(reply.AsSpan(8), (ushort)TransmissionFlags(export));
                    await SendAsync(reply, ct);
                    return true;
                }
                case NbdOption.Abort:
                    await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct);
                    return false;
                case NbdOption.List:
                    if (length != 0)
                    {
                        await ErrorReplyAsync(option, NbdReply.ErrInvalid, "LIST takes no data", ct);
                        break;
                    }
                    foreach (var e in _registry.All)
                    {
                        var name = Encoding.UTF8.GetBytes(e.Name);
                        var desc = Encoding.UTF8.GetBytes(e.Description ?? "");
                        var payload = new byte[4 + name.Length + desc.Length];
                        BinaryPrimitives.WriteUInt32BigEndian(payload, (uint)name.Length);
                        name.CopyTo(payload, 4);
                        desc.CopyTo(payload, 4 + name.Length);
                        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Server, payload), ct);
                    }
                    await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct);
                    break;
                case NbdOption.Info:
                case NbdOption.Go:
                    if (await InfoOrGoAsync(option, data, ct) && (NbdOption)option == NbdOption.Go) return true;
                    break;
                case NbdOption.StructuredReply:
                    if (length != 0) await ErrorReplyAsync(option, NbdReply.ErrInvalid, "STRUCTURED_REPLY takes no data", ct);
                    else if (_structured) await ErrorReplyAsync(option, NbdReply.ErrInvalid, "structured reply already negotiated", ct);
                    else
                    {
                        _structured = true;
                        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct);
                    }
                    break;
                case NbdOption.ListMetaContext:
                case NbdOption.SetMetaContext:
                    await MetaContextAsync(option, data, ct);
                    break;
                default:
                    await ErrorReplyAsync(option, NbdReply.ErrUnsup, $"Unsupported option {option}", ct);
                    break;
            }
        }
    }

    private ValueTask ErrorReplyAsync(uint option, NbdReply error, string message, CancellationToken ct) =>
        SendAsync(NbdMessages.OptionReply(option, error, Encoding.UTF8.GetBytes(message)), ct);

    private NbdTransmissionFlags TransmissionFlags(NbdExport e)
    {
        var f = NbdTransmissionFlags.HasFlags | NbdTransmissionFlags.SendFlush | NbdTransmissionFlags.SendFua | NbdTransmissionFlags.SendCache;
        if (e.Writable) f |= NbdTransmissionFlags.SendTrim | NbdTransmissionFlags.SendWriteZeroes | NbdTransmissionFlags.SendFastZero;
        else f |= NbdTransmissionFlags.ReadOnly;
        if (_structured) f |= NbdTransmissionFlags.SendDf;
        if (_registry.MultiConn) f |= NbdTransmissionFlags.CanMultiConn;
        return f;
    }

    private async Task<bool> InfoOrGoAsync(uint option, byte[] data, CancellationToken ct)
    {
        if (data.Length < 6)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, "option data too short", ct);
            return false;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 6)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, "export name length exceeds the option data", ct);
            return false;
        }
        string name = Encoding.UTF8.GetString(data, 4, (int)nameLength);
        int count = BinaryPrimitives.ReadUInt16BigEndian(data.AsSpan(4 + (int)nameLength));
        if (data.Length != 6 + nameLength + 2 * count)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, "information request count does not match the option length", ct);
            return false;
        }
        var export = _registry.Find(name);
        if (export is null || export.ShuttingDown)
        {
            await ErrorReplyAsync(option, NbdReply.ErrUnknown, $"Export '{name}' not present", ct);
            return false;
        }
        var nameBytes = Encoding.UTF8.GetBytes(export.Name);
        var info = new byte[2 + nameBytes.Length];
        BinaryPrimitives.WriteUInt16BigEndian(info, (ushort)NbdInfo.Name);
        nameBytes.CopyTo(info, 2);
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, info), ct);
        if (export.Description is { } description)
        {
            var d = Encoding.UTF8.GetBytes(description);
            var di = new byte[2 + d.Length];
            BinaryPrimitives.WriteUInt16BigEndian(di, (ushort)NbdInfo.Description);
            d.CopyTo(di, 2);
            await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, di), ct);
        }
        var bs = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(bs, (ushort)NbdInfo.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(2), 1);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(6), 4096);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(10), NbdConst.MaxPayload);
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, bs), ct);
        var ex = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(ex, (ushort)NbdInfo.Export);
        BinaryPrimitives.WriteUInt64BigEndian(ex.AsSpan(2), (ulong)export.Image.Size);
        BinaryPrimitives.WriteUInt16BigEndian(ex.AsSpan(10), (ushort)TransmissionFlags(export));
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, ex), ct);
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct);
        if ((NbdOption)option == NbdOption.Go)
        {
            _export = export;
            if (_contextExport != export.Name) _contexts = new(); // contexts apply to the export they were set for
        }
        return true;
    }

    private async Task MetaContextAsync(uint option, byte[] data, CancellationToken ct)
    {
        bool listing = (NbdOption)option == NbdOption.ListMetaContext;
        if (!listing && !_structured)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, "request option before structured reply", ct);
            return;
        }
        // u32 name length, name, u32 query count, queries (u32 length + text each).
        var queries = new List<string>();
        string exportName;
        try
        {
            int pos = 0;
            uint nameLength = ReadU32(data, ref pos);
            exportName = Encoding.UTF8.GetString(Take(data, ref pos, nameLength));
            uint count = ReadU32(data, ref pos);
            for (uint i = 0; i < count; i++)
            {
                uint ql = ReadU32(data, ref pos);
                if (ql > 4096) throw new FormatException("query too long");
                queries.Add(Encoding.UTF8.GetString(Take(data, ref pos, ql)));
            }
            if (pos != data.Length) throw new FormatException("trailing bytes");
        }
        catch (FormatException e)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, $"malformed meta context request: {e.Message}", ct);
            return;
        }
        var export = _registry.Find(exportName);
        if (export is null)
        {
            await ErrorReplyAsync(option, NbdReply.ErrUnknown, $"Export '{exportName}' not present", ct);
            return;
        }
        var selected = new List<(uint Id, string Name)>();
        if (queries.Count == 0 && listing) selected.AddRange(export.Contexts());
        foreach (var q in queries)
            foreach (var c in export.Match(q, listing))
                if (!selected.Contains(c)) selected.Add(c);
        selected.Sort((a, b) => a.Id.CompareTo(b.Id));
        foreach (var (id, name) in selected)
        {
            var n = Encoding.UTF8.GetBytes(name);
            var payload = new byte[4 + n.Length];
            BinaryPrimitives.WriteUInt32BigEndian(payload, listing ? 0 : id);
            n.CopyTo(payload, 4);
            await SendAsync(NbdMessages.OptionReply(option, NbdReply.MetaContext, payload), ct);
        }
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct);
        if (!listing)
        {
            _contexts = selected;
            _contextExport = export.Name;
        }
    }

    private static uint ReadU32(byte[] data, ref int pos)
    {
        if (pos + 4 > data.Length) throw new FormatException("truncated");
        uint v = BinaryPrimitives.ReadUInt32BigEndian(data.AsSpan(pos));
        pos += 4;
        return v;
    }

    private static ReadOnlySpan<byte> Take(byte[] data, ref int pos, uint length)
    {
        if (length > data.Length - pos) throw new FormatException("length exceeds the option data");
        var s = data.AsSpan(pos, (int)length);
        pos += (int)length;
        return s;
    }

    // ------------------------------------------------------------------ transmission
    //
    // Three parties per connection. The request reader (this session's task, on the thread pool) parses a header,
    // waits for an in-flight slot and the data budget, and only then takes in a write's payload; it answers what
    // needs no image I/O itself and hands the rest to the block I/O threads. A block I/O thread does the synchronous
    // image calls and queues the answered request. The reply writer (on the thread pool) writes every queued reply
    // into the pipe and flushes once per batch. So blocking I/O never holds a pool thread, a slow image never delays
    // another connection's handshake, and only a failed flush — never an I/O error — means the client is gone.

    /// <summary>One request from admission to reply; the session keeps at most <see cref="MaxInFlight"/> and
    /// reuses them, so a request allocates nothing but its data buffer (pooled).</summary>
    private sealed class Request(NbdServerSession session) : IBlockIoWork
    {
        public NbdRequest Header;
        public NbdExport Export = null!;
        /// <summary>The write payload, or the bytes read (ArrayPool; longer than the request).</summary>
        public byte[]? Data;
        /// <summary>Bytes of the data budget this request holds.</summary>
        public long Reserved;
        /// <summary>Non-zero: the request failed with this NBD errno.</summary>
        public uint Errno;
        public string? Message;
        /// <summary>A structured read's extents, holes and data in order; empty: one data chunk for the whole range.</summary>
        public readonly List<(long Offset, long Length, bool Zero)> Chunks = new();
        /// <summary>Block status: the extents of each negotiated context, in context order.</summary>
        public readonly List<List<(uint Length, uint Flags)>> Status = new();

        public void Execute() => session.Perform(this);
    }

    private async Task TransmitAsync(CancellationToken ct)
    {
        var export = _export!;
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        _stopReading = stop;
        var writer = WriteRepliesAsync(ct);
        try
        {
            await ReadRequestsAsync(export, stop.Token);
        }
        finally
        {
            // DISC, end of input or a client gone: every admitted request still runs and gets its reply (written only
            // while the client is there), then the writer flushes the last batch.
            for (int i = 0; i < MaxInFlight; i++) await _inFlight.WaitAsync(CancellationToken.None);
            _replies.Writer.TryComplete();
            await writer;
        }
    }

    private async Task ReadRequestsAsync(NbdExport export, CancellationToken ct)
    {
        var header = new byte[NbdConst.RequestHeaderLength];
        while (true)
        {
            await ReadExactAsync(header, ct);
            if (!NbdRequest.TryParse(header, out var req)) return; // bad magic: the stream is lost
            if (req.Command == NbdCommand.Disc) return;
            // A slot first: nothing of a request, not even its payload, is taken in while MaxInFlight are unanswered.
            await _inFlight.WaitAsync(ct);
            var r = TakeRequest(export, req);
            try
            {
                if (req.Command == NbdCommand.Write && req.Length > NbdConst.MaxPayload)
                {
                    // Too big to accept; past the limit we cannot even trust the stream, so stop here.
                    Answer(r, NbdErrno.EOVERFLOW, "write payload too large");
                    return;
                }
                if (Refusal(export, req) is { } refusal)
                {
                    if (req.Command == NbdCommand.Write) await SkipAsync(req.Length, ct);
                    Answer(r, NbdErrno.EINVAL, refusal);
                    continue;
                }
                if (req.Command is NbdCommand.Read or NbdCommand.Write && req.Length > 0)
                {
                    await _dataBudget.AcquireAsync(req.Length, ct);
                    r.Reserved = req.Length;
                    r.Data = ArrayPool<byte>.Shared.Rent((int)req.Length);
                    if (req.Command == NbdCommand.Write) await ReadExactAsync(r.Data.AsMemory(0, (int)req.Length), ct);
                }
                if (req.Command == NbdCommand.Cache)
                {
                    Answer(r, 0, null); // a hint with nothing to do for a local image
                    continue;
                }
                await export.EnterAsync();
                _ioThreads.Queue(r);
            }
            catch
            {
                Release(r); // not handed on: give back its slot and buffers
                throw;
            }
        }
    }

    private Request TakeRequest(NbdExport export, NbdRequest header)
    {
        Request? r;
        lock (_idleRequests) _idleRequests.TryPop(out r);
        r ??= new Request(this);
        r.Header = header;
        r.Export = export;
        return r;
    }

    /// <summary>A request answered without image I/O goes straight to the reply writer.</summary>
    private void Answer(Request r, uint errno, string? message)
    {
        r.Errno = errno;
        r.Message = message;
        _replies.Writer.TryWrite(r);
    }

    /// <summary>Why a request is refused before any I/O (EINVAL), or null.</summary>
    private string? Refusal(NbdExport export, NbdRequest req)
    {
        var known = req.Command switch
        {
            NbdCommand.Read => NbdCommandFlags.Fua | NbdCommandFlags.Df,
            NbdCommand.Write => NbdCommandFlags.Fua,
            NbdCommand.WriteZeroes => NbdCommandFlags.Fua | NbdCommandFlags.NoHole | NbdCommandFlags.FastZero,
            NbdCommand.Trim => NbdCommandFlags.Fua,
            NbdCommand.BlockStatus => NbdCommandFlags.ReqOne,
            NbdCommand.Flush or NbdCommand.Cache => NbdCommandFlags.None,
            _ => (NbdCommandFlags)0xffff,
        };
        if (known == (NbdCommandFlags)0xffff) return $"unsupported command {(ushort)req.Command}";
        if ((req.Flags & ~known) != 0) return $"unsupported flags 0x{(ushort)req.Flags:x} for this command";
        long size = export.Image.Size;
        if (req.Command != NbdCommand.Flush && (req.Offset > (ulong)size || req.Length > (ulong)size - req.Offset))
            return $"operation past EOF; From: {req.Offset}, Len: {req.Length}, Size: {size}";
        if (!export.Writable && req.Command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim) return "Export is read-only";
        if (req.Command == NbdCommand.Read && req.Length > NbdConst.MaxPayload) return "read request too large";
        if (req.Command == NbdCommand.BlockStatus)
        {
            if (!_structured || _contexts.Count == 0) return "No meta contexts negotiated";
            if (req.Length == 0) return "zero-length block status request";
        }
        return null;
    }

    /// <summary>The image calls of one request, on a block I/O thread. Whatever they throw becomes the request's
    /// errno: the client always gets an answer and the session goes on.</summary>
    private void Perform(Request r)
    {
        var export = r.Export;
        var req = r.Header;
        // Admitted to the node when it entered the export: its calls are inside the graph and pass a drain's gate.
        using var admitted = NodeRequests.Internal();
        try
        {
            var image = export.Image;
            long offset = (long)req.Offset;
            // 32 bits unsigned on the wire: zeroing, trimming and block status may ask for up to 4 GiB - 1.
            long length = req.Length;
            bool fua = (req.Flags & NbdCommandFlags.Fua) != 0;
            switch (req.Command)
            {
                case NbdCommand.Read:
                    ReadData(image, r, offset, (int)length);
                    break;
                case NbdCommand.Write:
                    image.Write(offset, r.Data.AsSpan(0, (int)length));
                    if (fua) image.Flush();
                    break;
                case NbdCommand.WriteZeroes:
                    image.WriteZeroes(offset, length, mayUnmap: export.DiscardUnmap && (req.Flags & NbdCommandFlags.NoHole) == 0);
                    if (fua) image.Flush();
                    break;
                case NbdCommand.Trim:
                    if (export.DiscardUnmap) image.Discard(offset, length);
                    if (fua) image.Flush();
                    break;
                case NbdCommand.Flush:
                    image.Flush();
                    break;
                case NbdCommand.BlockStatus:
                    CollectStatus(export, r, offset, length);
                    break;
            }
        }
        catch (Exception e)
        {
            uint? errno = ErrnoOf(e);
            if (errno is null && e is ObjectDisposedException && export.ShuttingDown) errno = NbdErrno.ESHUTDOWN;
            if (errno is null)
                Console.Error.WriteLine($"strata: NBD {req.Command} of {req.Length} bytes at {req.Offset} on export '{export.Name}' failed unexpectedly: {e}");
            r.Errno = errno ?? NbdErrno.EIO;
            r.Message = e.Message;
        }
        finally
        {
            export.Leave();
        }
        _replies.Writer.TryWrite(r);
    }

    /// <summary>The NBD errno for a failed image call, or null for a failure nobody expects (a bug: answered EIO
    /// and logged). Host errors arrive as IOException: on Linux .NET keeps the errno of those it has no better
    /// type for in HResult (ENOSPC is 28, EIO 5); EACCES, EPERM and EBADF become UnauthorizedAccessException.</summary>
    public static uint? ErrnoOf(Exception e) => e switch
    {
        BlockIOException io => NbdErrno.FromSystem(io.Errno),
        NbdException { Errno: not 0 } remote => NbdErrno.FromSystem((int)remote.Errno), // a remote server's: the same numbers
        BlockException => NbdErrno.EIO,
        IOException io when io.HResult is > 0 and < 4096 => NbdErrno.FromSystem(io.HResult),
        IOException => NbdErrno.EIO,
        UnauthorizedAccessException => NbdErrno.EPERM,
        OutOfMemoryException => NbdErrno.ENOMEM,
        _ => null,
    };

    /// <summary>A read's bytes. Structured and not DF: holes are not read, only described (OFFSET_HOLE chunks).</summary>
    private void ReadData(BlockImage image, Request r, long offset, int length)
    {
        if (length == 0) return;
        var data = r.Data.AsSpan(0, length);
        if (!_structured || (r.Header.Flags & NbdCommandFlags.Df) != 0)
        {
            image.Read(offset, data);
            return;
        }
        long end = offset + length;
        long pos = offset;
        var chunks = r.Chunks;
        while (pos < end)
        {
            var e = ChainStatus.Get(image, pos, end - pos);
            if (e.Length <= 0) break;
            if (chunks.Count > 0 && chunks[^1].Zero == e.Zero) chunks[^1] = (chunks[^1].Offset, chunks[^1].Length + e.Length, e.Zero);
            else chunks.Add((pos, e.Length, e.Zero));
            pos += e.Length;
        }
        if (pos < end) chunks.Add((pos, end - pos, false)); // status ran short: read the rest as data
        foreach (var (at, n, zero) in chunks)
            if (!zero) image.Read(at, data.Slice((int)(at - offset), (int)n));
    }

    private void CollectStatus(NbdExport export, Request r, long offset, long length)
    {
        bool one = (r.Header.Flags & NbdCommandFlags.ReqOne) != 0;
        while (r.Status.Count < _contexts.Count) r.Status.Add(new List<(uint, uint)>());
        for (int i = 0; i < _contexts.Count; i++) Extents(export, _contexts[i].Name, offset, length, one, r.Status[i]);
    }

    /// <summary>Writes every answered request's reply into the pipe, flushing once per batch (and every
    /// <see cref="FlushThreshold"/> bytes within one), then frees the request.</summary>
    private async Task WriteRepliesAsync(CancellationToken ct)
    {
        var replies = _replies.Reader;
        while (await replies.WaitToReadAsync(CancellationToken.None))
        {
            long unflushed = 0;
            while (replies.TryRead(out var r))
            {
                if (!_clientGone)
                {
                    try
                    {
                        unflushed += WriteReply(r);
                    }
                    catch (Exception)
                    {
                        ClientGone(); // the pipe is closed
                    }
                }
                Release(r);
                if (unflushed >= FlushThreshold)
                {
                    await FlushRepliesAsync(ct);
                    unflushed = 0;
                }
            }
            if (unflushed > 0) await FlushRepliesAsync(ct);
        }
    }

    private const long FlushThreshold = 4 << 20;

    private async ValueTask FlushRepliesAsync(CancellationToken ct)
    {
        if (_clientGone) return;
        try
        {
            var flush = await _output.FlushAsync(ct);
            if (flush.IsCompleted || flush.IsCanceled) ClientGone();
        }
        catch (Exception)
        {
            ClientGone();
        }
    }

    /// <summary>A reply could not be sent: the only sign that the client is gone. Stop taking requests; those in
    /// flight finish without a reply.</summary>
    private void ClientGone()
    {
        _clientGone = true;
        try { _stopReading?.Cancel(); } catch (ObjectDisposedException) { }
    }

    /// <summary>Gives back what a request holds: its data buffer, its share of the budget, its slot.</summary>
    private void Release(Request r)
    {
        if (r.Data is not null) ArrayPool<byte>.Shared.Return(r.Data);
        r.Data = null;
        if (r.Reserved > 0) _dataBudget.Release(r.Reserved);
        r.Reserved = 0;
        r.Errno = 0;
        r.Message = null;
        r.Export = null!;
        // Keep small lists for the next request, not the rare huge ones.
        if (r.Chunks.Capacity > 1024) r.Chunks.Capacity = 0;
        r.Chunks.Clear();
        foreach (var s in r.Status)
        {
            s.Clear();
            if (s.Capacity > 4096) s.Capacity = 0;
        }
        lock (_idleRequests) _idleRequests.Push(r);
        _inFlight.Release();
    }

    /// <summary>Writes one reply into the pipe (not flushed); returns how many bytes.</summary>
    private long WriteReply(Request r)
    {
        var req = r.Header;
        if (r.Errno != 0) return WriteError(req.Cookie, r.Errno, r.Message ?? "");
        if (req.Command == NbdCommand.BlockStatus) return WriteStatus(r);
        if (req.Command != NbdCommand.Read || req.Length == 0) return WriteDone(req.Cookie);
        var data = r.Data.AsSpan(0, (int)req.Length);
        if (!_structured)
        {
            var h = _output.GetSpan(16);
            NbdMessages.SimpleReplyHeader(h, 0, req.Cookie);
            _output.Advance(16);
            _output.Write(data);
            return 16 + data.Length;
        }
        if (r.Chunks.Count == 0)
        {
            WriteDataChunk(req.Cookie, true, (long)req.Offset, data);
            return NbdMessages.StructuredHeaderLength + 8 + data.Length;
        }
        long written = 0;
        for (int i = 0; i < r.Chunks.Count; i++)
        {
            var (at, n, zero) = r.Chunks[i];
            bool done = i == r.Chunks.Count - 1;
            if (zero)
            {
                var b = _output.GetSpan(NbdMessages.StructuredHeaderLength + 12);
                NbdMessages.StructuredHeader(b, done, NbdReplyType.OffsetHole, req.Cookie, 12);
                BinaryPrimitives.WriteUInt64BigEndian(b[20..], (ulong)at);
                BinaryPrimitives.WriteUInt32BigEndian(b[28..], (uint)n);
                _output.Advance(NbdMessages.StructuredHeaderLength + 12);
                written += NbdMessages.StructuredHeaderLength + 12;
            }
            else
            {
                WriteDataChunk(req.Cookie, done, at, data.Slice((int)(at - (long)req.Offset), (int)n));
                written += NbdMessages.StructuredHeaderLength + 8 + n;
            }
        }
        return written;
    }

    private void WriteDataChunk(ulong cookie, bool done, long offset, ReadOnlySpan<byte> data)
    {
        var h = _output.GetSpan(NbdMessages.StructuredHeaderLength + 8);
        NbdMessages.StructuredHeader(h, done, NbdReplyType.OffsetData, cookie, (uint)(8 + data.Length));
        BinaryPrimitives.WriteUInt64BigEndian(h[20..], (ulong)offset);
        _output.Advance(NbdMessages.StructuredHeaderLength + 8);
        _output.Write(data);
    }

    private long WriteDone(ulong cookie)
    {
        if (_structured)
        {
            var h = _output.GetSpan(NbdMessages.StructuredHeaderLength);
            NbdMessages.StructuredHeader(h, true, NbdReplyType.None, cookie, 0);
            _output.Advance(NbdMessages.StructuredHeaderLength);
            return NbdMessages.StructuredHeaderLength;
        }
        var s = _output.GetSpan(16);
        NbdMessages.SimpleReplyHeader(s, 0, cookie);
        _output.Advance(16);
        return 16;
    }

    private const int MaxErrorMessage = 4096;

    private long WriteError(ulong cookie, uint errno, string message)
    {
        if (!_structured)
        {
            var s = _output.GetSpan(16);
            NbdMessages.SimpleReplyHeader(s, errno, cookie);
            _output.Advance(16);
            return 16;
        }
        var text = message.AsSpan(0, Math.Min(message.Length, MaxErrorMessage));
        var b = _output.GetSpan(NbdMessages.StructuredHeaderLength + 6 + Encoding.UTF8.GetMaxByteCount(text.Length));
        int n = Encoding.UTF8.GetBytes(text, b[(NbdMessages.StructuredHeaderLength + 6)..]);
        NbdMessages.StructuredHeader(b, true, NbdReplyType.Error, cookie, (uint)(6 + n));
        BinaryPrimitives.WriteUInt32BigEndian(b[20..], errno);
        BinaryPrimitives.WriteUInt16BigEndian(b[24..], (ushort)n);
        _output.Advance(NbdMessages.StructuredHeaderLength + 6 + n);
        return NbdMessages.StructuredHeaderLength + 6 + n;
    }

    private long WriteStatus(Request r)
    {
        long written = 0;
        for (int i = 0; i < _contexts.Count; i++)
        {
            var extents = r.Status[i];
            int length = NbdMessages.StructuredHeaderLength + 4 + 8 * extents.Count;
            var b = _output.GetSpan(length);
            NbdMessages.StructuredHeader(b, i == _contexts.Count - 1, NbdReplyType.BlockStatus, r.Header.Cookie, (uint)(4 + 8 * extents.Count));
            BinaryPrimitives.WriteUInt32BigEndian(b[20..], _contexts[i].Id);
            for (int k = 0; k < extents.Count; k++)
            {
                BinaryPrimitives.WriteUInt32BigEndian(b[(24 + 8 * k)..], extents[k].Length);
                BinaryPrimitives.WriteUInt32BigEndian(b[(28 + 8 * k)..], extents[k].Flags);
            }
            _output.Advance(length);
            written += length;
        }
        return written;
    }

    private const int MaxExtents = 1 << 16;

    private static void Extents(NbdExport export, string context, long offset, long length, bool one, List<(uint Length, uint Flags)> list)
    {
        list.Clear();
        long end = offset + length;
        if (context.StartsWith(NbdExport.DirtyBitmapPrefix, StringComparison.Ordinal))
        {
            Strata.Block.Bitmaps.DirtyBitmap? bitmap = null;
            foreach (var b in export.Bitmaps)
                if (context.AsSpan(NbdExport.DirtyBitmapPrefix.Length).SequenceEqual(b.Name)) bitmap = b;
            long pos = offset;
            foreach (var (o, l) in bitmap!.DirtyExtents(offset, length))
            {
                if (o > pos) AddExtent(list, o - pos, 0);
                AddExtent(list, l, 1);
                pos = o + l;
                if (one || list.Count >= MaxExtents) break;
            }
            if (pos < end && !(one && list.Count > 0) && list.Count < MaxExtents) AddExtent(list, end - pos, 0);
        }
        else
        {
            long pos = offset;
            while (pos < end && list.Count < MaxExtents)
            {
                var e = ChainStatus.Get(export.Image, pos, end - pos);
                uint flags = context == NbdExport.AllocationDepthContext
                    ? (e.Present ? (uint)(e.Depth + 1) : 0)
                    : (e.Data ? 0u : 1u) | (e.Zero ? 2u : 0u);
                AddExtent(list, e.Length, flags);
                pos += e.Length;
                if (one) break;
            }
        }
        if (one && list.Count > 0) list.RemoveRange(1, list.Count - 1);
    }

    private static void AddExtent(List<(uint Length, uint Flags)> list, long length, uint flags)
    {
        if (list.Count > 0 && list[^1].Flags == flags) list[^1] = ((uint)(list[^1].Length + length), flags);
        else list.Add(((uint)length, flags));
    }

    /// <summary>Bytes of data buffers held by a connection's admitted requests. One waiter only: the request
    /// reader, which admits requests one at a time.</summary>
    private sealed class ByteBudget(long limit)
    {
        private readonly object _lock = new();
        private readonly SemaphoreSlim _released = new(0);
        private long _used;
        private bool _waiting;

        /// <summary>Waits until <paramref name="bytes"/> fit; a request larger than the whole budget waits until
        /// nothing else holds any.</summary>
        public async ValueTask AcquireAsync(long bytes, CancellationToken ct)
        {
            while (true)
            {
                lock (_lock)
                {
                    if (_used == 0 || _used + bytes <= limit)
                    {
                        _used += bytes;
                        _waiting = false;
                        return;
                    }
                    _waiting = true;
                }
                await _released.WaitAsync(ct);
            }
        }

        public void Release(long bytes)
        {
            bool wake;
            lock (_lock)
            {
                _used -= bytes;
                wake = _waiting;
                _waiting = false;
            }
            if (wake) _released.Release();
        }
    }
}
