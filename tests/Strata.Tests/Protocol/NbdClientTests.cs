using System.Buffers.Binary;
using System.Net.Sockets;
using Strata.Block;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>NbdClient: the synchronous API against Strata's server, and a client that a misbehaving or vanishing
/// server can neither hang nor make allocate without bound.</summary>
public class NbdClientTests
{
    [Fact]
    public async Task TheSynchronousApiMovesRangesOfAnyLength()
    {
        using var dir = new TempDir();
        using var raw = RawImage.Create(dir["d.raw"], 128 << 20);
        await using var server = NbdServer.ListenUnix(dir["s.nbd"]);
        server.AddExport(new NbdExport("e", "e", null, raw, writable: true, [], allocationDepth: false) { DiscardUnmap = true });
        server.Start();
        await using var client = await NbdClient.ConnectUnixAsync(dir["s.nbd"], "e", ["base:allocation"]);

        // From a thread of its own, as a block driver calls it.
        await Task.Factory.StartNew(() =>
        {
            var data = new byte[40 << 20]; // more than one request may carry
            new Random(5).NextBytes(data);
            client.Write(1 << 20, data);
            var back = new byte[data.Length + (2 << 20)];
            client.Read(0, back);
            Assert.True(back.AsSpan(0, 1 << 20).IndexOfAnyExcept((byte)0) < 0);
            Assert.True(back.AsSpan(1 << 20, data.Length).SequenceEqual(data));
            Assert.True(back.AsSpan((1 << 20) + data.Length).IndexOfAnyExcept((byte)0) < 0);

            client.WriteZeroes(2 << 20, 3L << 20);
            client.Trim(10 << 20, 1 << 20);
            client.Flush();
            var some = new byte[8 << 20];
            client.Read(1 << 20, some);
            Assert.True(some.AsSpan(0, 1 << 20).SequenceEqual(data.AsSpan(0, 1 << 20)));
            Assert.True(some.AsSpan(1 << 20, 3 << 20).IndexOfAnyExcept((byte)0) < 0);
            Assert.NotEmpty(client.BlockStatus("base:allocation", 0, 64 << 20));

            // A request the server refuses: the errno, and the connection goes on.
            var e = Assert.Throws<NbdException>(() => client.Read(client.Size - 10, new byte[20]));
            Assert.Equal(NbdErrno.EINVAL, e.Errno);
            client.Read(0, new byte[4096]);
        }, TaskCreationOptions.LongRunning).WaitAsync(TimeSpan.FromSeconds(60));
    }

    /// <summary>A server that answers the handshake, then does what <paramref name="misbehave"/> does with the first
    /// request header it reads.</summary>
    private static async Task<(Socket Listener, Task Server)> FakeServerAsync(string path, Func<Socket, byte[], Task> misbehave)
    {
        var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var server = Task.Run(async () =>
        {
            using var s = await listener.AcceptAsync();
            var hello = new byte[18];
            BinaryPrimitives.WriteUInt64BigEndian(hello, NbdConst.NbdMagic);
            BinaryPrimitives.WriteUInt64BigEndian(hello.AsSpan(8), NbdConst.IHaveOpt);
            BinaryPrimitives.WriteUInt16BigEndian(hello.AsSpan(16), NbdConst.FlagFixedNewstyle | NbdConst.FlagNoZeroes);
            await s.SendAsync(hello);
            await ReceiveExactly(s, 4);
            while (true)
            {
                var h = await ReceiveExactly(s, 16);
                uint option = BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8));
                await ReceiveExactly(s, (int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)));
                if ((NbdOption)option == NbdOption.Go)
                {
                    var info = new byte[12];
                    BinaryPrimitives.WriteUInt16BigEndian(info, (ushort)NbdInfo.Export);
                    BinaryPrimitives.WriteUInt64BigEndian(info.AsSpan(2), 1 << 20);
                    BinaryPrimitives.WriteUInt16BigEndian(info.AsSpan(10), (ushort)NbdTransmissionFlags.HasFlags);
                    await s.SendAsync(NbdOptionCodec.Reply(option, NbdReply.Info, info));
                    await s.SendAsync(NbdOptionCodec.Reply(option, NbdReply.Ack, []));
                    break;
                }
                await s.SendAsync(NbdOptionCodec.Reply(option, NbdReply.Ack, []));
            }
            await misbehave(s, await ReceiveExactly(s, NbdConst.RequestHeaderLength));
        });
        await Task.Yield();
        return (listener, server);
    }

    private static async Task<byte[]> ReceiveExactly(Socket s, int n)
    {
        var b = new byte[n];
        for (int done = 0; done < n;)
        {
            int r = await s.ReceiveAsync(b.AsMemory(done));
            if (r == 0) throw new EndOfStreamException();
            done += r;
        }
        return b;
    }

    private static byte[] Chunk(NbdReplyType type, ulong cookie, uint length)
    {
        var h = new byte[NbdReplyCodec.StructuredHeaderLength];
        NbdReplyCodec.WriteStructuredHeader(h, true, type, cookie, length);
        return h;
    }

    [Fact]
    public async Task AHugeChunkFromTheServerFailsTheConnectionAndEveryRequestAfterIt()
    {
        using var dir = new TempDir();
        var (listener, server) = await FakeServerAsync(dir["f.nbd"], async (s, request) =>
        {
            ulong cookie = BinaryPrimitives.ReadUInt64BigEndian(request.AsSpan(8));
            await s.SendAsync(Chunk(NbdReplyType.BlockStatus, cookie, 0x7ffffff0)); // 2 GiB of "extents"
            await Task.Delay(Timeout.Infinite); // and keep the connection open
        });
        using (listener)
        {
            await using var client = await NbdClient.ConnectUnixAsync(dir["f.nbd"], "x");
            var e = await Assert.ThrowsAsync<NbdException>(() => client.ReadAsync(0, new byte[512]).WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains("block status", e.Message);
            // The stream is lost: later requests fail at once instead of waiting for replies that cannot come.
            await Assert.ThrowsAsync<NbdException>(() => client.ReadAsync(0, new byte[512]).WaitAsync(TimeSpan.FromSeconds(5)));
            Assert.Throws<NbdException>(() => client.Flush());
        }
    }

    [Fact]
    public async Task ARequestInFlightWhenTheServerVanishesFailsAndSoDoLaterOnes()
    {
        using var dir = new TempDir();
        var (listener, server) = await FakeServerAsync(dir["f.nbd"], (s, _) =>
        {
            s.Shutdown(SocketShutdown.Both); // gone without a reply
            return Task.CompletedTask;
        });
        using (listener)
        {
            await using var client = await NbdClient.ConnectUnixAsync(dir["f.nbd"], "x");
            var e = await Assert.ThrowsAsync<NbdException>(() => client.ReadAsync(0, new byte[512]).WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains("connection lost", e.Message);
            await Task.Factory.StartNew(() => Assert.Throws<NbdException>(() => client.Write(0, new byte[512])), TaskCreationOptions.LongRunning)
                .WaitAsync(TimeSpan.FromSeconds(20));
            await Assert.ThrowsAsync<NbdException>(() => client.FlushAsync().WaitAsync(TimeSpan.FromSeconds(5)));
        }
    }
}
