using System.Buffers;
using System.Collections.Concurrent;
using System.IO.Pipelines;
using System.Runtime.InteropServices;
using Strata.Block;
using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>
/// The transmission phase of one NBD connection, on what the handshake agreed: many requests in flight, replies in
/// completion order, simple or structured. It ends at NBD_CMD_DISC, at the end of input, at a request it cannot
/// trust the stream after (bad magic, an oversized write) or when the client is gone; every admitted request is
/// answered first.
/// </summary>
/// <remarks>
/// The request reader (<see cref="RunAsync"/>'s task, on the thread pool) parses a header, waits for an in-flight
/// slot and the data budget, and only then takes in a write's payload; it answers what needs no image I/O itself
/// and hands the rest to the block I/O threads. A block I/O thread does the synchronous image calls and then sends
/// the reply itself, with every other reply answered meanwhile, unless another thread is sending already (then that
/// one takes it along). The send never waits in the kernel: what the socket does not take at once goes on
/// asynchronously, and the replies answered until then wait for it. So a reply costs no hand-off to a writer task
/// (a thread wake-up per batch, which was most of the server's CPU after the copies), blocking I/O never holds a
/// pool thread, a slow image never delays another connection's handshake, and only a failed send — never an I/O
/// error — means the client is gone.
/// </remarks>
internal sealed class NbdTransmission
{
    /// <summary>Requests admitted and not yet answered (QEMU's MAX_NBD_REQUESTS).</summary>
    private const int MaxInFlight = 16;

    /// <summary>Data buffers (write payloads, read results) of a connection's admitted requests: with 16 requests of
    /// up to 32 MiB a connection could otherwise hold 512 MiB.</summary>
    private const long MaxDataInFlight = 64L << 20;

    /// <summary>Bytes of replies written into the pipe before a flush within one batch.</summary>
    private const long FlushThreshold = 4 << 20;

    /// <summary>Requests' data buffers, for every connection. Not the shared pool: a buffer goes back on whichever block
    /// I/O thread sent its reply, and the shared pool keeps one per size in each returning thread's own cache — with
    /// forty I/O threads, 10 MiB of peak RSS held in caches besides the buffers in use. This pool has one store.</summary>
    private static readonly ArrayPool<byte> DataBuffers = ArrayPool<byte>.Create(maxArrayLength: 4 << 20, maxArraysPerBucket: 32);

    /// <summary>Characters of an error message sent in an error chunk.</summary>
    private const int MaxErrorMessage = 4096;

    private readonly NbdAgreement _agreement;
    private readonly NbdExport _export;
    private readonly bool _structured;
    private readonly IReadOnlyList<NbdMetaContext> _contexts;
    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly BlockIoThreads _ioThreads;
    /// <summary>Non-null on a socket: replies go out as one gathered write per batch, read data straight from the
    /// requests' buffers.</summary>
    private readonly GatheredReplies? _gathered;
    private readonly SemaphoreSlim _inFlight = new(MaxInFlight, MaxInFlight);
    private readonly ByteBudget _dataBudget = new(MaxDataInFlight);
    private readonly Stack<Request> _idleRequests = new();
    /// <summary>Answered requests whose replies are not yet written.</summary>
    private readonly ConcurrentQueue<Request> _answered = new();
    /// <summary>1 while a thread writes and sends replies: there is one sender at a time, so replies keep whole.</summary>
    private int _sending;
    /// <summary>The requests whose replies the current send carries (the sender's).</summary>
    private readonly List<Request> _batch = new(MaxInFlight);
    private CancellationToken _sessionToken;
    private CancellationTokenSource? _stopReading;
    private volatile bool _clientGone;

    public NbdTransmission(NbdAgreement agreement, PipeReader input, PipeWriter output, BlockIoThreads ioThreads, IGatheredWriter? gathered = null)
    {
        if (gathered is not null) _gathered = new GatheredReplies(gathered);
        _agreement = agreement;
        _export = agreement.Export;
        _structured = agreement.StructuredReplies;
        _contexts = agreement.MetaContexts;
        _input = input;
        _output = output;
        _ioThreads = ioThreads;
    }

    /// <summary>One request from admission to reply; the transmission keeps at most <see cref="MaxInFlight"/> and
    /// reuses them, so a request allocates nothing but its data buffer (pooled).</summary>
    private sealed class Request(NbdTransmission transmission) : IBlockIoWork
    {
        public NbdRequest Header;
        /// <summary>The write payload, or the bytes read (from <see cref="DataBuffers"/>; longer than the request).</summary>
        public byte[]? Data;
        /// <summary>Bytes of the data budget this request holds.</summary>
        public long Reserved;
        /// <summary>Non-zero: the request failed with this NBD errno.</summary>
        public uint Errno;
        public string? Message;
        /// <summary>A structured read's extents, holes and data in order; empty: one data chunk for the whole range.</summary>
        public readonly List<(long Offset, long Length, bool Zero)> Chunks = new();
        /// <summary>Block status: the extents of each negotiated context, in context order.</summary>
        public readonly List<List<NbdExtent>> Status = new();

        public void Execute() => transmission.Perform(this);
    }

    /// <summary>The client has left (counted in the export's <see cref="NbdExport.LeavingConnections"/> until the
    /// session closes).</summary>
    public bool ClientLeft { get; private set; }

    public async Task RunAsync(CancellationToken ct)
    {
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
        _stopReading = stop;
        _sessionToken = ct;
        try
        {
            await ReadRequestsAsync(stop.Token);
        }
        finally
        {
            ClientLeft = true;
            Interlocked.Increment(ref _export.LeavingConnections);
            // DISC, end of input or a client gone: every admitted request still runs and gets its reply (sent only
            // while the client is there); a slot comes back only once its reply's send is over.
            for (int i = 0; i < MaxInFlight; i++) await _inFlight.WaitAsync(CancellationToken.None);
        }
    }

    // ------------------------------------------------------------------ the request reader

    private async Task ReadRequestsAsync(CancellationToken ct)
    {
        var header = new byte[NbdConst.RequestHeaderLength];
        uint maxPayload = _agreement.BlockSizes.Maximum;
        while (true)
        {
            await _input.ReadExactAsync(header, ct);
            if (!NbdRequest.TryParse(header, out var req)) return; // bad magic: the stream is lost
            if (req.Command == NbdCommand.Disc) return;
            // A slot first: nothing of a request, not even its payload, is taken in while MaxInFlight are unanswered.
            await _inFlight.WaitAsync(ct);
            var r = TakeRequest(req);
            try
            {
                if (req.Command == NbdCommand.Write && req.Length > maxPayload)
                {
                    // Too big to accept; past the limit we cannot even trust the stream, so stop here.
                    Answer(r, NbdErrno.EOVERFLOW, "write payload too large");
                    return;
                }
                if (Refusal(req) is { } refusal)
                {
                    if (req.Command == NbdCommand.Write) await _input.SkipAsync(req.Length, ct);
                    Answer(r, NbdErrno.EINVAL, refusal);
                    continue;
                }
                if (req.Command is NbdCommand.Read or NbdCommand.Write && req.Length > 0)
                {
                    await _dataBudget.AcquireAsync(req.Length, ct);
                    r.Reserved = req.Length;
                    r.Data = DataBuffers.Rent((int)req.Length);
                    if (req.Command == NbdCommand.Write) await _input.ReadExactAsync(r.Data.AsMemory(0, (int)req.Length), ct);
                }
                if (req.Command == NbdCommand.Cache)
                {
                    Answer(r, 0, null); // a hint with nothing to do for a local image
                    continue;
                }
                await _export.EnterAsync();
                if (!TryAnswerFromCache(r)) _ioThreads.Queue(r);
            }
            catch
            {
                Release(r); // not handed on: give back its slot and buffers
                throw;
            }
        }
    }

    private Request TakeRequest(NbdRequest header)
    {
        Request? r;
        lock (_idleRequests) _idleRequests.TryPop(out r);
        r ??= new Request(this);
        r.Header = header;
        return r;
    }

    /// <summary>A request answered without image I/O: the reader sends its reply (or the thread sending already does).</summary>
    private void Answer(Request r, uint errno, string? message)
    {
        r.Errno = errno;
        r.Message = message;
        Answered(r);
    }

    /// <summary>Why a request is refused before any I/O (EINVAL), or null.</summary>
    private string? Refusal(NbdRequest req)
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
        long size = _export.Image.Size;
        if (req.Command != NbdCommand.Flush && (req.Offset > (ulong)size || req.Length > (ulong)size - req.Offset))
            return $"operation past EOF; From: {req.Offset}, Len: {req.Length}, Size: {size}";
        if (!_export.Writable && req.Command is NbdCommand.Write or NbdCommand.WriteZeroes or NbdCommand.Trim) return "Export is read-only";
        if (req.Command == NbdCommand.Read && req.Length > _agreement.BlockSizes.Maximum) return "read request too large";
        if (req.Command == NbdCommand.BlockStatus)
        {
            if (!_structured || _contexts.Count == 0) return "No meta contexts negotiated";
            if (req.Length == 0) return "zero-length block status request";
        }
        return null;
    }

    // ------------------------------------------------------------------ on the reader, from memory

    /// <summary>Requests to send straight to the block I/O threads after a cached-only attempt gave up: a client
    /// reading what is not in memory pays for one failed attempt per this many requests, not for one each.</summary>
    private const int MissBackoff = 16;
    private int _skipCachedAttempts;

    /// <summary>
    /// A read or block status that can be answered from memory (the page cache, the node's metadata caches, a dirty
    /// bitmap) is answered here on the reader, with no hand-off to a block I/O thread: that hand-off was most of a
    /// small read's cost, in latency and in CPU the client needs on a small machine. It gives up at the first thing
    /// that could block (see <see cref="CachedReads"/>) and the request goes to the I/O threads as before.
    /// </summary>
    private bool TryAnswerFromCache(Request r)
    {
        if (r.Header.Command is not (NbdCommand.Read or NbdCommand.BlockStatus) || !_export.Image.ServesCachedReads) return false;
        if (_skipCachedAttempts > 0)
        {
            _skipCachedAttempts--;
            return false;
        }
        bool answered;
        using (NodeRequests.Internal()) // admitted at EnterAsync, as on an I/O thread
        {
            try
            {
                answered = CachedReads.TryRun(this, r, static (t, r) => t.ReadOrCollect(r));
            }
            catch (Exception)
            {
                answered = false; // an error: the I/O thread meets it again and answers it with its errno
            }
        }
        if (!answered)
        {
            // Undo what the attempt collected; the request starts over on an I/O thread.
            r.Chunks.Clear();
            foreach (var s in r.Status) s.Clear();
            _skipCachedAttempts = MissBackoff;
            return false;
        }
        _export.Leave();
        Answered(r);
        return true;
    }

    private void ReadOrCollect(Request r)
    {
        var req = r.Header;
        if (req.Command == NbdCommand.Read) ReadData(_export.Image, r, (long)req.Offset, (int)req.Length);
        else CollectStatus(r, (long)req.Offset, req.Length);
    }

    // ------------------------------------------------------------------ on a block I/O thread

    /// <summary>The image calls of one request, on a block I/O thread. Whatever they throw becomes the request's
    /// errno: the client always gets an answer and the session goes on.</summary>
    private void Perform(Request r)
    {
        var export = _export;
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
                    CollectStatus(r, offset, length);
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
        Answered(r);
    }

    /// <summary>The NBD errno for a failed image call, or null for a failure nobody expects (a bug: answered EIO
    /// and logged). Host errors arrive as IOException: on Linux .NET keeps the errno of those it has no better
    /// type for in HResult (ENOSPC is 28, EIO 5); EACCES, EPERM and EBADF become UnauthorizedAccessException.</summary>
    internal static uint? ErrnoOf(Exception e) => e switch
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

    private void CollectStatus(Request r, long offset, long length)
    {
        bool one = (r.Header.Flags & NbdCommandFlags.ReqOne) != 0;
        while (r.Status.Count < _contexts.Count) r.Status.Add(new List<NbdExtent>());
        for (int i = 0; i < _contexts.Count; i++) NbdBlockStatus.Collect(_export, _contexts[i].Name, offset, length, one, r.Status[i]);
    }

    // ------------------------------------------------------------------ sending replies

    /// <summary>Queues an answered request's reply and sends, unless another thread is sending: then it is that
    /// thread's to take along.</summary>
    private void Answered(Request r)
    {
        _answered.Enqueue(r);
        SendAnswered();
    }

    private void SendAnswered()
    {
        // The exchange that ends a sender's turn is a full fence, so a reply queued while it ended is either seen by
        // its queue check here or its own thread wins the turn: none is left behind.
        while (!_answered.IsEmpty && Interlocked.CompareExchange(ref _sending, 1, 0) == 0)
        {
            ValueTask send;
            try
            {
                send = WriteAndSendBatch();
            }
            catch (Exception)
            {
                ClientGone();
                send = default;
            }
            if (!send.IsCompletedSuccessfully)
            {
                _ = FinishSendLaterAsync(send);
                return;
            }
            EndBatch();
            Interlocked.Exchange(ref _sending, 0);
        }
    }

    /// <summary>The socket did not take the whole batch at once: the rest goes asynchronously, and this turn (with
    /// the replies answered meanwhile) ends when it is out.</summary>
    private async Task FinishSendLaterAsync(ValueTask send)
    {
        try
        {
            await send;
        }
        catch (Exception)
        {
            ClientGone();
        }
        EndBatch();
        Interlocked.Exchange(ref _sending, 0);
        SendAnswered();
    }

    /// <summary>Writes the queued replies into one batch (up to <see cref="FlushThreshold"/> bytes, or what one
    /// gathered write takes) and starts its send.</summary>
    private ValueTask WriteAndSendBatch()
    {
        long unsent = 0;
        while (unsent < FlushThreshold && _gathered is not { Full: true } && _answered.TryDequeue(out var r))
        {
            _batch.Add(r);
            if (_clientGone) continue;
            try
            {
                unsent += WriteReply(r);
            }
            catch (Exception)
            {
                ClientGone(); // the pipe is closed
            }
        }
        if (unsent == 0 || _clientGone) return default;
        return _gathered is not null ? _gathered.SendAsync() : FlushPipeAsync();
    }

    private async ValueTask FlushPipeAsync()
    {
        var flush = await _output.FlushAsync(_sessionToken);
        if (flush.IsCompleted || flush.IsCanceled) ClientGone();
    }

    /// <summary>Frees the sent batch's requests: on a socket the send read their buffers until now.</summary>
    private void EndBatch()
    {
        _gathered?.Clear();
        foreach (var r in _batch) Release(r);
        _batch.Clear();
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
        if (r.Data is not null) DataBuffers.Return(r.Data);
        r.Data = null;
        if (r.Reserved > 0) _dataBudget.Release(r.Reserved);
        r.Reserved = 0;
        r.Errno = 0;
        r.Message = null;
        // Keep small lists for the next request, not the rare huge ones (emptied first: a capacity below the count
        // throws, and a throw here once ended the reply writer, so every later request of the connection hung).
        r.Chunks.Clear();
        if (r.Chunks.Capacity > 1024) r.Chunks.Capacity = 0;
        foreach (var s in r.Status)
        {
            s.Clear();
            if (s.Capacity > 4096) s.Capacity = 0;
        }
        lock (_idleRequests) _idleRequests.Push(r);
        _inFlight.Release();
    }

    /// <summary>Writes one reply into the batch (not sent); returns how many bytes.</summary>
    private long WriteReply(Request r)
    {
        var req = r.Header;
        if (r.Errno != 0) return WriteError(req.Cookie, r.Errno, r.Message ?? "");
        if (req.Command == NbdCommand.BlockStatus) return WriteStatus(r);
        if (req.Command != NbdCommand.Read || req.Length == 0) return WriteDone(req.Cookie);
        var data = r.Data.AsSpan(0, (int)req.Length);
        if (!_structured)
        {
            NbdReplyCodec.WriteSimpleReply(HeaderSpan(NbdReplyCodec.SimpleReplyLength), 0, req.Cookie);
            HeaderAdvance(NbdReplyCodec.SimpleReplyLength);
            WriteData(r.Data!, 0, data.Length);
            return NbdReplyCodec.SimpleReplyLength + data.Length;
        }
        if (r.Chunks.Count == 0)
        {
            WriteDataChunk(req.Cookie, true, (long)req.Offset, r.Data!, 0, data.Length);
            return NbdReplyCodec.OffsetDataHeaderLength + data.Length;
        }
        long written = 0;
        for (int i = 0; i < r.Chunks.Count; i++)
        {
            var (at, n, zero) = r.Chunks[i];
            bool done = i == r.Chunks.Count - 1;
            if (zero)
            {
                NbdReplyCodec.WriteOffsetHole(HeaderSpan(NbdReplyCodec.OffsetHoleLength), done, req.Cookie, (ulong)at, (uint)n);
                HeaderAdvance(NbdReplyCodec.OffsetHoleLength);
                written += NbdReplyCodec.OffsetHoleLength;
            }
            else
            {
                WriteDataChunk(req.Cookie, done, at, r.Data!, (int)(at - (long)req.Offset), (int)n);
                written += NbdReplyCodec.OffsetDataHeaderLength + n;
            }
        }
        return written;
    }

    private void WriteDataChunk(ulong cookie, bool done, long offset, byte[] data, int start, int length)
    {
        NbdReplyCodec.WriteOffsetDataHeader(HeaderSpan(NbdReplyCodec.OffsetDataHeaderLength), done, cookie, (ulong)offset, length);
        HeaderAdvance(NbdReplyCodec.OffsetDataHeaderLength);
        WriteData(data, start, length);
    }

    // Reply headers are built in place (in the pipe, or in the batch's header buffer); read data is copied into the
    // pipe, or on a socket only referenced, and sent from where it lies.
    private Span<byte> HeaderSpan(int length) => _gathered is { } g ? g.GetSpan(length) : _output.GetSpan(length);

    private void HeaderAdvance(int length)
    {
        if (_gathered is { } g) g.Advance(length);
        else _output.Advance(length);
    }

    private void WriteData(byte[] data, int start, int length)
    {
        if (_gathered is { } g) g.AddData(data, start, length);
        else _output.Write(data.AsSpan(start, length));
    }

    private long WriteDone(ulong cookie)
    {
        if (_structured)
        {
            NbdReplyCodec.WriteDone(HeaderSpan(NbdReplyCodec.StructuredHeaderLength), cookie);
            HeaderAdvance(NbdReplyCodec.StructuredHeaderLength);
            return NbdReplyCodec.StructuredHeaderLength;
        }
        NbdReplyCodec.WriteSimpleReply(HeaderSpan(NbdReplyCodec.SimpleReplyLength), 0, cookie);
        HeaderAdvance(NbdReplyCodec.SimpleReplyLength);
        return NbdReplyCodec.SimpleReplyLength;
    }

    /// <summary>A failed request: the simple reply's error field, or an error chunk with the message.</summary>
    private long WriteError(ulong cookie, uint errno, string message)
    {
        if (!_structured)
        {
            NbdReplyCodec.WriteSimpleReply(HeaderSpan(NbdReplyCodec.SimpleReplyLength), errno, cookie);
            HeaderAdvance(NbdReplyCodec.SimpleReplyLength);
            return NbdReplyCodec.SimpleReplyLength;
        }
        var text = message.AsSpan(0, Math.Min(message.Length, MaxErrorMessage));
        int n = NbdReplyCodec.WriteError(HeaderSpan(NbdReplyCodec.MaxErrorLength(text.Length)), cookie, errno, text);
        HeaderAdvance(n);
        return n;
    }

    /// <summary>One block status chunk per negotiated context, in the order they were negotiated; the last is done.</summary>
    private long WriteStatus(Request r)
    {
        long written = 0;
        for (int i = 0; i < _contexts.Count; i++)
        {
            var extents = CollectionsMarshal.AsSpan(r.Status[i]);
            int length = NbdReplyCodec.BlockStatusLength(extents.Length);
            NbdReplyCodec.WriteBlockStatus(HeaderSpan(length), i == _contexts.Count - 1, r.Header.Cookie, _contexts[i].Id, extents);
            HeaderAdvance(length);
            written += length;
        }
        return written;
    }
}
