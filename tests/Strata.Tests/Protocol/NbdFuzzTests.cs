using System.Buffers.Binary;
using System.Net.Sockets;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;

namespace Strata.Tests.Protocol;

/// <summary>
/// Random and mutated byte streams against the NBD server's handshake and request parsers, and thousands of
/// connections: every session ends cleanly or answers, and the server keeps serving well-behaved clients.
/// </summary>
public class NbdFuzzTests
{
    [Fact]
    public async Task MutatedHandshakesAndRequestsNeverHurtTheServer()
    {
        await using var served = new ServedQcow2("fuzz", writable: true, allocationDepth: true);

        // A valid conversation to mutate: handshake, structured replies, meta contexts, GO, then requests.
        var valid = new List<byte>();
        valid.AddRange(BitConverter.GetBytes(BinaryPrimitives.ReverseEndianness(3u)));
        void Option(NbdOption o, byte[] data)
        {
            var h = new byte[16];
            BinaryPrimitives.WriteUInt64BigEndian(h, NbdConst.IHaveOpt);
            BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), (uint)o);
            BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), (uint)data.Length);
            valid.AddRange(h);
            valid.AddRange(data);
        }
        Option(NbdOption.StructuredReply, []);
        Option(NbdOption.SetMetaContext, [0, 0, 0, 1, (byte)'e', 0, 0, 0, 2, 0, 0, 0, 15, .. "base:allocation"u8, 0, 0, 0, 21, .. "qemu:allocation-depth"u8]);
        Option(NbdOption.Go, [0, 0, 0, 1, (byte)'e', 0, 0]);
        void Request(NbdCommand c, ulong offset, uint length, byte[]? payload = null)
        {
            var h = new byte[28];
            new NbdRequest(0, c, 7, offset, length).Write(h);
            valid.AddRange(h);
            if (payload is not null) valid.AddRange(payload);
        }
        Request(NbdCommand.Read, 0, 4096);
        Request(NbdCommand.BlockStatus, 0, 1 << 20);
        Request(NbdCommand.Write, 8192, 512, new byte[512]);
        Request(NbdCommand.WriteZeroes, 1 << 20, 65536);
        Request(NbdCommand.Flush, 0, 0);
        var template = valid.ToArray();

        var rng = new Random(77);
        for (int round = 0; round < 400; round++)
        {
            var bytes = (byte[])template.Clone();
            int mutations = rng.Next(1, 6);
            for (int m = 0; m < mutations; m++) bytes[rng.Next(bytes.Length)] = (byte)rng.Next(256);
            if (rng.Next(4) == 0) bytes = bytes[..rng.Next(bytes.Length)];
            using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            await socket.ConnectAsync(new UnixDomainSocketEndPoint(served.Socket));
            await using var stream = new NetworkStream(socket);
            await stream.ReadExactlyAsync(new byte[18]);
            try
            {
                await stream.WriteAsync(bytes);
                socket.Shutdown(SocketShutdown.Send);
                // Drain whatever the server answers until it closes; it must close (no hang).
                var sink = new byte[65536];
                using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(10));
                while (await stream.ReadAsync(sink, cts.Token) > 0) { }
            }
            catch (IOException)
            {
                // The server dropped a broken client: allowed.
            }
        }

        // 2000 connections, most gone before the handshake completes.
        var tasks = new List<Task>();
        for (int i = 0; i < 2000; i++)
        {
            tasks.Add(Task.Run(async () =>
            {
                using var s = await WhileTheBacklogIsFull(async () =>
                {
                    var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                    try
                    {
                        await s.ConnectAsync(new UnixDomainSocketEndPoint(served.Socket));
                        return s;
                    }
                    catch
                    {
                        s.Dispose();
                        throw;
                    }
                });
            }));
            if (tasks.Count >= 50)
            {
                await Task.WhenAll(tasks);
                tasks.Clear();
            }
        }
        await Task.WhenAll(tasks);

        // Still serving, and the data is what the clients wrote or what was there.
        // The last batch's connections may still fill the backlog (closed but not yet accepted, each waiting for its
        // connection thread): this client waits for its turn like the others.
        await using var client = await WhileTheBacklogIsFull(() => NbdClient.ConnectUnixAsync(served.Socket, "e", ["base:allocation"]));
        var buf = new byte[4096];
        await client.ReadAsync(16384, buf);
        Assert.All(buf, b => Assert.Equal(ServedQcow2.Fill, b));
        Assert.NotEmpty(await client.BlockStatusAsync("base:allocation", 0, 1 << 20));
    }

    /// <summary>A non-blocking connect to a unix socket whose listen backlog is full fails with EAGAIN: clients try
    /// again. Up to 30 s, for a machine busy with the rest of the suite.</summary>
    private static async Task<T> WhileTheBacklogIsFull<T>(Func<Task<T>> connect)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(30);
        while (true)
        {
            try
            {
                return await connect();
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.TryAgain or SocketError.WouldBlock && DateTime.UtcNow < deadline)
            {
                await Task.Delay(10);
            }
        }
    }
}
