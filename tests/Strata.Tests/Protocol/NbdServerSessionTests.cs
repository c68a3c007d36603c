using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using Strata.Block;
using Strata.Block.Filters;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>
/// The NBD server session over in-memory pipes (no socket): every request is answered — a failing image gives the
/// errno the failure carries and the session goes on — and a connection takes in no more than its in-flight
/// slots and data budget allow.
/// </summary>
public class NbdServerSessionTests
{
    /// <summary>A pass-through node that fails the next data call (or block status) with an exception the test
    /// chooses, and can hold writes at a gate.</summary>
    private sealed class FaultyImage(BlockImage child) : FilterImage(child)
    {
        public Exception? NextFault;
        public Exception? NextStatusFault;
        public ManualResetEventSlim? WriteGate;
        public int WritesWaiting;

        public override string FormatName => "faulty";

        private void Fault()
        {
            if (Interlocked.Exchange(ref NextFault, null) is { } e) throw e;
        }

        protected override void DriverRead(long offset, Span<byte> buffer)
        {
            Fault();
            base.DriverRead(offset, buffer);
        }

        protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
        {
            Fault();
            if (WriteGate is { } gate)
            {
                Interlocked.Increment(ref WritesWaiting);
                gate.Wait();
                Interlocked.Decrement(ref WritesWaiting);
            }
            base.DriverWrite(offset, data);
        }

        protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap)
        {
            Fault();
            base.DriverWriteZeroes(offset, length, mayUnmap);
        }

        protected override void DriverDiscard(long offset, long length)
        {
            Fault();
            base.DriverDiscard(offset, length);
        }

        protected override void DriverFlush()
        {
            Fault();
            base.DriverFlush();
        }

        public override LayerExtent GetLayerStatus(long offset, long maxLength)
        {
            if (Interlocked.Exchange(ref NextStatusFault, null) is { } e) throw e;
            return base.GetLayerStatus(offset, maxLength);
        }
    }

    private sealed class Exports(NbdExport export) : INbdExportRegistry
    {
        public NbdExport? Find(string name) => name == export.Name ? export : null;
        public IReadOnlyList<NbdExport> All => [export];
        public bool MultiConn => true;
    }

    /// <summary>A client speaking raw NBD to a session through two pipes.</summary>
    private sealed class PipeClient : IAsyncDisposable
    {
        // The request pipe pauses its writer at 64 KiB unread: a payload the session does not take in stays put.
        public readonly Pipe ToServer = new(new PipeOptions(pauseWriterThreshold: 64 << 10, resumeWriterThreshold: 32 << 10));
        public readonly Pipe ToClient = new();
        public Task Session = Task.CompletedTask;
        public bool Structured;
        private readonly Stream _in;

        public PipeClient() => _in = ToClient.Reader.AsStream();

        public static async Task<PipeClient> StartAsync(NbdExport export, bool structured, BlockIoThreads? ioThreads = null)
        {
            var c = new PipeClient { Structured = structured };
            var session = new NbdServerSession(new Exports(export), c.ToServer.Reader, c.ToClient.Writer, ioThreads);
            c.Session = Task.Run(() => session.RunAsync(CancellationToken.None));
            await c.ReadExactAsync(18);
            await c.SendAsync([0, 0, 0, 3]); // fixed newstyle, no zeroes
            if (structured)
            {
                await c.OptionAsync(NbdOption.StructuredReply, []);
                Assert.Equal((uint)NbdReply.Ack, (await c.OptionReplyAsync()).Type);
            }
            var name = Encoding.UTF8.GetBytes(export.Name);
            var go = new byte[6 + name.Length];
            BinaryPrimitives.WriteUInt32BigEndian(go, (uint)name.Length);
            name.CopyTo(go, 4);
            await c.OptionAsync(NbdOption.Go, go);
            while ((await c.OptionReplyAsync()).Type != (uint)NbdReply.Ack) { }
            return c;
        }

        public async Task SendAsync(byte[] bytes) => await ToServer.Writer.WriteAsync(bytes);

        public async Task<byte[]> ReadExactAsync(int n)
        {
            var b = new byte[n];
            await _in.ReadExactlyAsync(b).AsTask().WaitAsync(TimeSpan.FromSeconds(20));
            return b;
        }

        private async Task OptionAsync(NbdOption option, byte[] data)
        {
            var h = new byte[16 + data.Length];
            BinaryPrimitives.WriteUInt64BigEndian(h, NbdConst.IHaveOpt);
            BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), (uint)option);
            BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), (uint)data.Length);
            data.CopyTo(h, 16);
            await SendAsync(h);
        }

        private async Task<(uint Type, byte[] Data)> OptionReplyAsync()
        {
            var h = await ReadExactAsync(20);
            return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)), await ReadExactAsync((int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16))));
        }

        public static byte[] Request(NbdCommand command, ulong cookie, long offset, int length, byte[]? payload = null)
        {
            var b = new byte[NbdConst.RequestHeaderLength + (payload?.Length ?? 0)];
            new NbdRequest(0, command, cookie, (ulong)offset, (uint)length).Write(b);
            payload?.CopyTo(b, NbdConst.RequestHeaderLength);
            return b;
        }

        /// <summary>One whole reply: its cookie, errno, error message (structured) and the data of a read.</summary>
        public async Task<(ulong Cookie, uint Errno, string Message, byte[] Data)> ReplyAsync(int readLength = 0, long readOffset = 0)
        {
            var data = new byte[readLength];
            while (true)
            {
                var h = await ReadExactAsync(4);
                uint magic = BinaryPrimitives.ReadUInt32BigEndian(h);
                if (magic == NbdConst.SimpleReplyMagic)
                {
                    var rest = await ReadExactAsync(12);
                    uint errno = BinaryPrimitives.ReadUInt32BigEndian(rest);
                    if (errno == 0 && readLength > 0) data = await ReadExactAsync(readLength);
                    return (BinaryPrimitives.ReadUInt64BigEndian(rest.AsSpan(4)), errno, "", data);
                }
                Assert.Equal(NbdConst.StructuredReplyMagic, magic);
                var sh = await ReadExactAsync(16);
                bool done = (BinaryPrimitives.ReadUInt16BigEndian(sh) & 1) != 0;
                var type = (NbdReplyType)BinaryPrimitives.ReadUInt16BigEndian(sh.AsSpan(2));
                ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(sh.AsSpan(4));
                var payload = await ReadExactAsync((int)BinaryPrimitives.ReadUInt32BigEndian(sh.AsSpan(12)));
                switch (type)
                {
                    case NbdReplyType.Error:
                        Assert.True(done, "an error chunk ends this reply");
                        int ml = BinaryPrimitives.ReadUInt16BigEndian(payload.AsSpan(4));
                        return (cookie, BinaryPrimitives.ReadUInt32BigEndian(payload), Encoding.UTF8.GetString(payload, 6, ml), data);
                    case NbdReplyType.OffsetData:
                        payload.AsSpan(8).CopyTo(data.AsSpan((int)((long)BinaryPrimitives.ReadUInt64BigEndian(payload) - readOffset)));
                        break;
                }
                if (done) return (cookie, 0, "", data);
            }
        }

        public async ValueTask DisposeAsync()
        {
            await ToServer.Writer.CompleteAsync();
            await Session.WaitAsync(TimeSpan.FromSeconds(20));
        }
    }

    private static (FaultyImage Image, NbdExport Export) MakeExport(TempDir dir)
    {
        var raw = RawImage.Create(dir["d.raw"], 64 << 20);
        var image = new FaultyImage(raw);
        return (image, new NbdExport("e", "e", null, image, writable: true, [], allocationDepth: false) { DiscardUnmap = true });
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task EveryFailingRequestGetsItsErrnoAndTheSessionKeepsServing(bool structured)
    {
        using var dir = new TempDir();
        var (image, export) = MakeExport(dir);
        using var raw = image.FilteredChild!;
        raw.Write(0, Enumerable.Repeat((byte)0x5a, 1 << 20).ToArray()); // data, so structured reads do read
        await using var c = await PipeClient.StartAsync(export, structured);
        var cases = new (NbdCommand Command, Exception Fault, uint Errno)[]
        {
            (NbdCommand.Read, new IOException("Input/output error : 'd.raw'", 5), NbdErrno.EIO),      // as .NET reports a host EIO
            (NbdCommand.Write, new IOException("No space left on device : 'd.raw'", 28), NbdErrno.ENOSPC),
            (NbdCommand.Read, new IOException("a host error .NET has no errno for"), NbdErrno.EIO),
            (NbdCommand.Write, new BlockIOException("No space left on device", 28), NbdErrno.ENOSPC),
            (NbdCommand.Flush, new BlockIOException("Operation not permitted", 1), NbdErrno.EPERM),
            (NbdCommand.WriteZeroes, new BlockIOException("Disk quota exceeded", 122), NbdErrno.ENOSPC),
            (NbdCommand.Trim, new BlockIOException("Cannot allocate memory", 12), NbdErrno.ENOMEM),
            (NbdCommand.Write, new UnauthorizedAccessException("Access to the path is denied."), NbdErrno.EPERM),
            (NbdCommand.Read, new BlockException("qcow2: L2 table offset unaligned"), NbdErrno.EIO),
            (NbdCommand.Read, new InvalidOperationException("a bug in a driver"), NbdErrno.EIO),            // unexpected: EIO, logged
            (NbdCommand.Write, new NullReferenceException(), NbdErrno.EIO),
        };
        ulong cookie = 100;
        foreach (var (command, fault, errno) in cases)
        {
            image.NextFault = fault;
            int length = command == NbdCommand.Flush ? 0 : 4096;
            await c.SendAsync(PipeClient.Request(command, ++cookie, 65536, length, command == NbdCommand.Write ? new byte[4096] : null));
            var reply = await c.ReplyAsync(command == NbdCommand.Read ? length : 0);
            Assert.Equal(cookie, reply.Cookie);
            Assert.True(errno == reply.Errno, $"{fault.GetType().Name} on {command}: errno {reply.Errno}, expected {errno}");
            // Host exceptions reach the client as strerror, as QEMU words them; block errors keep their own message.
            string message = HostError.IsHostError(fault) ? BlockIOException.Describe(HostError.ErrnoOf(fault)) : fault.Message;
            if (structured) Assert.Equal(message, reply.Message);
            Assert.Null(image.NextFault); // the request did reach the image
        }
        if (structured)
        {
            // Block status and a structured read that fail in the driver's status call.
            image.NextStatusFault = new IOException("Input/output error", 5);
            await c.SendAsync(PipeClient.Request(NbdCommand.Read, 900, 0, 4096));
            Assert.Equal(NbdErrno.EIO, (await c.ReplyAsync(4096)).Errno);
            Assert.Null(image.NextStatusFault);
        }

        // Still serving: a write and a read of it.
        var pattern = Enumerable.Range(0, 8192).Select(i => (byte)(i * 7)).ToArray();
        await c.SendAsync(PipeClient.Request(NbdCommand.Write, 1, 1 << 20, pattern.Length, pattern));
        var written = await c.ReplyAsync();
        Assert.Equal((1ul, 0u), (written.Cookie, written.Errno));
        await c.SendAsync(PipeClient.Request(NbdCommand.Read, 2, 1 << 20, pattern.Length));
        var back = await c.ReplyAsync(pattern.Length, readOffset: 1 << 20);
        Assert.Equal(0u, back.Errno);
        Assert.Equal(pattern, back.Data);
        // DISC: the session ends on its own.
        await c.SendAsync(PipeClient.Request(NbdCommand.Disc, 3, 0, 0));
        await c.Session.WaitAsync(TimeSpan.FromSeconds(20));
    }

    /// <summary>An error reply is sent even when requests before and after it succeed at the same time: many requests
    /// in flight, every third failing, each answered once with the right errno.</summary>
    [Fact]
    public async Task ConcurrentRequestsWithFailuresAreEachAnsweredOnce()
    {
        using var dir = new TempDir();
        using var raw = RawImage.Create(dir["d.raw"], 64 << 20);
        var image = new EveryThirdFails(raw);
        var export = new NbdExport("e", "e", null, image, writable: true, [], allocationDepth: false);
        await using var c = await PipeClient.StartAsync(export, structured: true);
        const int count = 300;
        var send = Task.Run(async () =>
        {
            for (int i = 0; i < count; i++) await c.SendAsync(PipeClient.Request(NbdCommand.Write, (ulong)i, i * 4096L, 4096, new byte[4096]));
        });
        var seen = new Dictionary<ulong, uint>();
        for (int i = 0; i < count; i++)
        {
            var r = await c.ReplyAsync();
            Assert.True(seen.TryAdd(r.Cookie, r.Errno), $"cookie {r.Cookie} answered twice");
        }
        await send;
        Assert.Equal(count, seen.Count);
        Assert.Equal(image.Failed, seen.Count(kv => kv.Value == NbdErrno.ENOSPC));
        Assert.True(image.Failed > 0);
        Assert.All(seen, kv => Assert.Contains(kv.Value, new[] { 0u, NbdErrno.ENOSPC }));
    }

    private sealed class EveryThirdFails(BlockImage child) : FilterImage(child)
    {
        private int _calls;
        public int Failed;
        public override string FormatName => "every-third-fails";

        protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
        {
            if (Interlocked.Increment(ref _calls) % 3 == 0)
            {
                Interlocked.Increment(ref Failed);
                throw new IOException("No space left on device", 28);
            }
            base.DriverWrite(offset, data);
        }
    }

    /// <summary>With every in-flight slot taken by a write that cannot finish, the next write's payload stays in the
    /// client's pipe: the server rents no buffer and reads no payload for a request it cannot run yet.</summary>
    [Fact]
    public async Task AWritePayloadIsTakenInOnlyOnceTheRequestHasASlot()
    {
        using var dir = new TempDir();
        var (image, export) = MakeExport(dir);
        using var raw = image.FilteredChild!;
        using var gate = new ManualResetEventSlim();
        image.WriteGate = gate;
        var io = new BlockIoThreads("test-io", 0, 32, TimeSpan.FromSeconds(1));
        await using var c = await PipeClient.StartAsync(export, structured: false, io);
        for (int i = 0; i < 16; i++) await c.SendAsync(PipeClient.Request(NbdCommand.Write, (ulong)i, i * 4096L, 4096, new byte[4096]));
        Assert.True(SpinWait.SpinUntil(() => image.WritesWaiting == 16, 10000), $"{image.WritesWaiting} writes reached the image");
        // The 17th: 1 MiB that the session must leave unread for now.
        var pending = c.ToServer.Writer.WriteAsync(PipeClient.Request(NbdCommand.Write, 16, 1 << 20, 1 << 20, new byte[1 << 20])).AsTask();
        await Task.Delay(500);
        Assert.False(pending.IsCompleted, "the 17th write's payload was read before it had a slot");
        gate.Set();
        await pending.WaitAsync(TimeSpan.FromSeconds(20));
        var cookies = new HashSet<ulong>();
        for (int i = 0; i < 17; i++)
        {
            var r = await c.ReplyAsync();
            Assert.Equal(0u, r.Errno);
            cookies.Add(r.Cookie);
        }
        Assert.Equal(17, cookies.Count);
    }

    /// <summary>A connection's write payloads in flight are bounded in bytes too: two 32 MiB writes fill the budget,
    /// and a third is left unread until one of them is answered.</summary>
    [Fact]
    public async Task WritePayloadsInFlightAreBoundedInBytes()
    {
        using var dir = new TempDir();
        var (image, export) = MakeExport(dir);
        using var raw = image.FilteredChild!;
        using var gate = new ManualResetEventSlim();
        image.WriteGate = gate;
        var io = new BlockIoThreads("test-io", 0, 32, TimeSpan.FromSeconds(1));
        await using var c = await PipeClient.StartAsync(export, structured: true, io);
        var big = new byte[NbdConst.MaxPayload];
        for (int i = 0; i < 2; i++) await c.SendAsync(PipeClient.Request(NbdCommand.Write, (ulong)i, i * (long)big.Length, big.Length, big));
        Assert.True(SpinWait.SpinUntil(() => image.WritesWaiting == 2, 10000), $"{image.WritesWaiting} writes reached the image");
        var third = c.ToServer.Writer.WriteAsync(PipeClient.Request(NbdCommand.Write, 2, 0, big.Length, big)).AsTask();
        await Task.Delay(500);
        Assert.False(third.IsCompleted, "a third 32 MiB payload was taken in with 64 MiB already in flight");
        gate.Set();
        await third.WaitAsync(TimeSpan.FromSeconds(20));
        for (int i = 0; i < 3; i++) Assert.Equal(0u, (await c.ReplyAsync()).Errno);
    }

    /// <summary>Refusals need no I/O and are answered even while every block I/O thread is stuck.</summary>
    [Fact]
    public async Task RefusalsAreAnsweredWhileTheImageIsStuck()
    {
        using var dir = new TempDir();
        var (image, export) = MakeExport(dir);
        using var raw = image.FilteredChild!;
        using var gate = new ManualResetEventSlim();
        image.WriteGate = gate;
        var io = new BlockIoThreads("test-io", 0, 1, TimeSpan.FromSeconds(1));
        await using var c = await PipeClient.StartAsync(export, structured: true, io);
        await c.SendAsync(PipeClient.Request(NbdCommand.Write, 1, 0, 4096, new byte[4096]));
        Assert.True(SpinWait.SpinUntil(() => image.WritesWaiting == 1, 10000));
        await c.SendAsync(PipeClient.Request(NbdCommand.Read, 2, 64 << 20, 4096)); // past the end
        var r = await c.ReplyAsync();
        Assert.Equal((2ul, NbdErrno.EINVAL), (r.Cookie, r.Errno));
        await c.SendAsync(PipeClient.Request((NbdCommand)77, 3, 0, 0));
        r = await c.ReplyAsync();
        Assert.Equal((3ul, NbdErrno.EINVAL), (r.Cookie, r.Errno));
        gate.Set();
        r = await c.ReplyAsync();
        Assert.Equal((1ul, 0u), (r.Cookie, r.Errno));
    }
}
