using System.Buffers;
using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
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
/// Protocol violations close this connection; request errors get the protocol's errno.
/// </summary>
public sealed class NbdServerSession
{
    private const int MaxInFlight = 16;
    private readonly INbdExportRegistry _registry;
    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly SemaphoreSlim _inFlight = new(MaxInFlight, MaxInFlight);
    private bool _structured;
    private bool _noZeroes;
    private string? _contextExport;
    private List<(uint Id, string Name)> _contexts = new();
    private NbdExport? _export;

    public NbdServerSession(INbdExportRegistry registry, PipeReader input, PipeWriter output)
    {
        _registry = registry;
        _input = input;
        _output = output;
    }

    public async Task RunAsync(CancellationToken ct)
    {
        try
        {
            if (!await HandshakeAsync(ct)) return;
            Interlocked.Increment(ref _export!.Connections);
            try
            {
                await TransmitAsync(ct);
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

    private async ValueTask SendAsync(ReadOnlyMemory<byte> a, ReadOnlyMemory<byte> b = default, CancellationToken ct = default)
    {
        await _writeLock.WaitAsync(ct);
        try
        {
            _output.Write(a.Span);
            if (!b.IsEmpty) _output.Write(b.Span);
            var flush = await _output.FlushAsync(ct);
            if (flush.IsCompleted) throw new IOException("client went away");
        }
        finally
        {
            _writeLock.Release();
        }
    }

    // ------------------------------------------------------------------ handshake

    private async Task<bool> HandshakeAsync(CancellationToken ct)
    {
        var hello = new byte[18];
        BinaryPrimitives.WriteUInt64BigEndian(hello, NbdConst.NbdMagic);
        BinaryPrimitives.WriteUInt64BigEndian(hello.AsSpan(8), NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt16BigEndian(hello.AsSpan(16), NbdConst.FlagFixedNewstyle | NbdConst.FlagNoZeroes);
        await SendAsync(hello, ct: ct);
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
                    await SendAsync(reply, ct: ct);
                    return true;
                }
                case NbdOption.Abort:
                    await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct: ct);
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
                        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Server, payload), ct: ct);
                    }
                    await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct: ct);
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
                        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct: ct);
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
        SendAsync(NbdMessages.OptionReply(option, error, Encoding.UTF8.GetBytes(message)), ct: ct);

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
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, info), ct: ct);
        if (export.Description is { } description)
        {
            var d = Encoding.UTF8.GetBytes(description);
            var di = new byte[2 + d.Length];
            BinaryPrimitives.WriteUInt16BigEndian(di, (ushort)NbdInfo.Description);
            d.CopyTo(di, 2);
            await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, di), ct: ct);
        }
        var bs = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(bs, (ushort)NbdInfo.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(2), 1);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(6), 4096);
        BinaryPrimitives.WriteUInt32BigEndian(bs.AsSpan(10), NbdConst.MaxPayload);
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, bs), ct: ct);
        var ex = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(ex, (ushort)NbdInfo.Export);
        BinaryPrimitives.WriteUInt64BigEndian(ex.AsSpan(2), (ulong)export.Image.Size);
        BinaryPrimitives.WriteUInt16BigEndian(ex.AsSpan(10), (ushort)TransmissionFlags(export));
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Info, ex), ct: ct);
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct: ct);
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
            await SendAsync(NbdMessages.OptionReply(option, NbdReply.MetaContext, payload), ct: ct);
        }
        await SendAsync(NbdMessages.OptionReply(option, NbdReply.Ack, []), ct: ct);
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

    private async Task TransmitAsync(CancellationToken ct)
    {
        var export = _export!;
        var pending = new List<Task>();
        var header = new byte[NbdConst.RequestHeaderLength];
        try
        {
            while (true)
            {
                await ReadExactAsync(header, ct);
                if (!NbdRequest.TryParse(header, out var req)) return; // bad magic: the stream is lost
                if (req.Command == NbdCommand.Disc) return;
                byte[]? payload = null;
                if (req.Command == NbdCommand.Write)
                {
                    if (req.Length > NbdConst.MaxPayload)
                    {
                        // Too big to accept; past the limit we cannot even trust the stream, so stop here.
                        await ReplyErrorAsync(req, NbdErrno.EOVERFLOW, "write payload too large");
                        return;
                    }
                    payload = ArrayPool<byte>.Shared.Rent((int)req.Length);
                    await ReadExactAsync(payload.AsMemory(0, (int)req.Length), ct);
                }
                await _inFlight.WaitAsync(ct);
                var task = Task.Run(async () =>
                {
                    try
                    {
                        await HandleAsync(export, req, payload);
                    }
                    finally
                    {
                        if (payload is not null) ArrayPool<byte>.Shared.Return(payload);
                        _inFlight.Release();
                    }
                }, CancellationToken.None);
                pending.RemoveAll(t => t.IsCompleted);
                pending.Add(task);
            }
        }
        finally
        {
            // DISC or end of input: finish what is in flight (their replies may fail if the client left).
            try { await Task.WhenAll(pending); } catch (Exception) { }
        }
    }

    private async Task HandleAsync(NbdExport export, NbdRequest req, byte[]? payload)
    {
        using var entered = await export.EnterAsync();
        var image = export.Image;
        try
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
            if (known == (NbdCommandFlags)0xffff)
            {
                await ReplyErrorAsync(req, NbdErrno.EINVAL, $"unsupported command {(ushort)req.Command}");
                return;
            }
            if ((req.Flags & ~known) != 0)
            {
                await ReplyErrorAsync(req, NbdErrno.EINVAL, $"unsupported flags 0x{(ushort)req.Flags:x} for this command");
                return;
            }
            if (req.Command != NbdCommand.Flush && (req.Offset > (ulong)image.Size || req.Length > (ulong)image.Size - req.Offset))
            {
                await ReplyErrorAsync(req, NbdErrno.EINVAL, $"operation past EOF; From: {req.Offset}, Len: {req.Length}, Size: {image.Size}");
                return;
            }
            if (!export.Writable && req.Command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim)
            {
                await ReplyErrorAsync(req, NbdErrno.EINVAL, "Export is read-only");
                return;
            }
            long offset = (long)req.Offset;
            // 32 bits unsigned on the wire: zeroing, trimming and block status may ask for up to 4 GiB - 1.
            long length = req.Length;
            switch (req.Command)
            {
                case NbdCommand.Read:
                    if (req.Length > NbdConst.MaxPayload)
                    {
                        await ReplyErrorAsync(req, NbdErrno.EINVAL, "read request too large");
                        return;
                    }
                    await ReadAsync(image, req, offset, (int)length);
                    return;
                case NbdCommand.Write:
                    image.Write(offset, payload.AsSpan(0, (int)length));
                    if ((req.Flags & NbdCommandFlags.Fua) != 0) image.Flush();
                    break;
                case NbdCommand.WriteZeroes:
                    image.WriteZeroes(offset, length, mayUnmap: export.DiscardUnmap && (req.Flags & NbdCommandFlags.NoHole) == 0);
                    if ((req.Flags & NbdCommandFlags.Fua) != 0) image.Flush();
                    break;
                case NbdCommand.Trim:
                    if (export.DiscardUnmap) image.Discard(offset, length);
                    if ((req.Flags & NbdCommandFlags.Fua) != 0) image.Flush();
                    break;
                case NbdCommand.Flush:
                    image.Flush();
                    break;
                case NbdCommand.Cache:
                    break;
                case NbdCommand.BlockStatus:
                    await BlockStatusAsync(export, req, offset, length);
                    return;
            }
            await ReplyOkAsync(req);
        }
        catch (BlockException e)
        {
            await ReplyErrorAsync(req, e is BlockIOException io ? NbdErrno.FromSystem(io.Errno) : NbdErrno.EIO, e.Message);
        }
        catch (IOException)
        {
            // The client is gone; nothing to answer.
        }
    }

    private async ValueTask ReplyOkAsync(NbdRequest req)
    {
        if (_structured)
        {
            var h = new byte[NbdMessages.StructuredHeaderLength];
            NbdMessages.StructuredHeader(h, true, NbdReplyType.None, req.Cookie, 0);
            await SendAsync(h);
        }
        else
        {
            var h = new byte[16];
            NbdMessages.SimpleReplyHeader(h, 0, req.Cookie);
            await SendAsync(h);
        }
    }

    private async ValueTask ReplyErrorAsync(NbdRequest req, uint errno, string message)
    {
        if (_structured)
        {
            var msg = Encoding.UTF8.GetBytes(message.Length > 4096 ? message[..4096] : message);
            var b = new byte[NbdMessages.StructuredHeaderLength + 6 + msg.Length];
            NbdMessages.StructuredHeader(b, true, NbdReplyType.Error, req.Cookie, (uint)(6 + msg.Length));
            BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(20), errno);
            BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(24), (ushort)msg.Length);
            msg.CopyTo(b, 26);
            await SendAsync(b);
        }
        else
        {
            var h = new byte[16];
            NbdMessages.SimpleReplyHeader(h, errno, req.Cookie);
            await SendAsync(h);
        }
    }

    private async Task ReadAsync(BlockImage image, NbdRequest req, long offset, int length)
    {
        if (!_structured)
        {
            var data = ArrayPool<byte>.Shared.Rent(length);
            try
            {
                image.Read(offset, data.AsSpan(0, length));
                var h = new byte[16];
                NbdMessages.SimpleReplyHeader(h, 0, req.Cookie);
                await SendAsync(h, data.AsMemory(0, length));
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(data);
            }
            return;
        }
        if (length == 0)
        {
            await ReplyOkAsync(req);
            return;
        }
        // Structured: holes as OFFSET_HOLE chunks, data as OFFSET_DATA; DF asks for a single data chunk.
        var chunks = (req.Flags & NbdCommandFlags.Df) != 0
            ? [new ChainExtent(offset, length, 0, true, false, true, -1, false)]
            : ChainStatus.Map(image, offset, length).ToList();
        for (int i = 0; i < chunks.Count; i++)
        {
            var c = chunks[i];
            bool done = i == chunks.Count - 1;
            if (c.Zero)
            {
                var b = new byte[NbdMessages.StructuredHeaderLength + 12];
                NbdMessages.StructuredHeader(b, done, NbdReplyType.OffsetHole, req.Cookie, 12);
                BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(20), (ulong)c.Offset);
                BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(28), (uint)c.Length);
                await SendAsync(b);
                continue;
            }
            var data = ArrayPool<byte>.Shared.Rent((int)c.Length);
            try
            {
                image.Read(c.Offset, data.AsSpan(0, (int)c.Length));
                var h = new byte[NbdMessages.StructuredHeaderLength + 8];
                NbdMessages.StructuredHeader(h, done, NbdReplyType.OffsetData, req.Cookie, (uint)(8 + c.Length));
                BinaryPrimitives.WriteUInt64BigEndian(h.AsSpan(20), (ulong)c.Offset);
                await SendAsync(h, data.AsMemory(0, (int)c.Length));
            }
            finally
            {
                ArrayPool<byte>.Shared.Return(data);
            }
        }
    }

    private async Task BlockStatusAsync(NbdExport export, NbdRequest req, long offset, long length)
    {
        if (!_structured || _contexts.Count == 0)
        {
            await ReplyErrorAsync(req, NbdErrno.EINVAL, "No meta contexts negotiated");
            return;
        }
        if (length == 0)
        {
            await ReplyErrorAsync(req, NbdErrno.EINVAL, "zero-length block status request");
            return;
        }
        bool one = (req.Flags & NbdCommandFlags.ReqOne) != 0;
        for (int i = 0; i < _contexts.Count; i++)
        {
            var (id, name) = _contexts[i];
            var extents = Extents(export, name, offset, length, one);
            var b = new byte[NbdMessages.StructuredHeaderLength + 4 + 8 * extents.Count];
            NbdMessages.StructuredHeader(b, i == _contexts.Count - 1, NbdReplyType.BlockStatus, req.Cookie, (uint)(4 + 8 * extents.Count));
            BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(20), id);
            for (int k = 0; k < extents.Count; k++)
            {
                BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(24 + 8 * k), extents[k].Length);
                BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(28 + 8 * k), extents[k].Flags);
            }
            await SendAsync(b);
        }
    }

    private const int MaxExtents = 1 << 16;

    private static List<(uint Length, uint Flags)> Extents(NbdExport export, string context, long offset, long length, bool one)
    {
        var list = new List<(uint Length, uint Flags)>();
        long end = offset + length;
        void AddExtent(long len, uint flags)
        {
            if (list.Count > 0 && list[^1].Flags == flags) list[^1] = ((uint)(list[^1].Length + len), flags);
            else list.Add(((uint)len, flags));
        }
        if (context.StartsWith(NbdExport.DirtyBitmapPrefix, StringComparison.Ordinal))
        {
            var bitmap = export.Bitmaps.First(b => NbdExport.DirtyBitmapPrefix + b.Name == context);
            long pos = offset;
            foreach (var (o, l) in bitmap.DirtyExtents(offset, length))
            {
                if (o > pos) AddExtent(o - pos, 0);
                AddExtent(l, 1);
                pos = o + l;
                if (one || list.Count >= MaxExtents) break;
            }
            if (pos < end && !(one && list.Count > 0) && list.Count < MaxExtents) AddExtent(end - pos, 0);
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
                AddExtent(e.Length, flags);
                pos += e.Length;
                if (one) break;
            }
        }
        if (one && list.Count > 0) list.RemoveRange(1, list.Count - 1);
        return list;
    }
}
