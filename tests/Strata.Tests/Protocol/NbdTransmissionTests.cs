using System.Buffers.Binary;
using System.Text;
using Strata.Formats.Nbd;

namespace Strata.Tests.Protocol;

/// <summary>
/// Whole sessions over in-memory pipes after the handshake: each command's reply, simple or structured, byte for
/// byte where the layout matters; refusals with their errno (and message in an error chunk); and the ways a
/// connection ends (NBD_CMD_DISC, a bad magic, an oversized write).
/// </summary>
public sealed class NbdTransmissionTests : IDisposable
{
    private readonly TwoExports _exports = new();
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(20);

    public void Dispose() => _exports.Dispose();

    private static readonly byte[] Pattern = Enumerable.Range(0, 8192).Select(i => (byte)(i * 7 + 1)).ToArray();

    private static (uint Errno, string Message) ErrorOf((bool Done, NbdReplyType Type, ulong Cookie, byte[] Payload) chunk)
    {
        Assert.True(chunk.Done);
        Assert.Equal(NbdReplyType.Error, chunk.Type);
        int length = BinaryPrimitives.ReadUInt16BigEndian(chunk.Payload.AsSpan(4));
        Assert.Equal(6 + length, chunk.Payload.Length);
        return (BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload), Encoding.UTF8.GetString(chunk.Payload, 6, length));
    }

    [Fact]
    public async Task SimpleRepliesAnswerEveryCommand()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: false);

        await c.RequestAsync(NbdCommand.Write, 1, 128 << 10, Pattern.Length, NbdCommandFlags.Fua, Pattern);
        Assert.Equal((0u, 1ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Read, 2, 128 << 10, Pattern.Length);
        Assert.Equal((0u, 2ul), await c.SimpleReplyAsync());
        Assert.Equal(Pattern, await c.ReadExactAsync(Pattern.Length));

        await c.RequestAsync(NbdCommand.WriteZeroes, 3, 128 << 10, 4096);
        Assert.Equal((0u, 3ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Read, 4, 128 << 10, Pattern.Length);
        Assert.Equal((0u, 4ul), await c.SimpleReplyAsync());
        Assert.Equal(new byte[4096].Concat(Pattern[4096..]), await c.ReadExactAsync(Pattern.Length));

        await c.RequestAsync(NbdCommand.Trim, 5, 132 << 10, 4096);
        Assert.Equal((0u, 5ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Flush, 6, 0, 0);
        Assert.Equal((0u, 6ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Cache, 7, 0, 4096);
        Assert.Equal((0u, 7ul), await c.SimpleReplyAsync());

        // Refusals: EINVAL in the error field and no data after it, as the next reply shows.
        await c.RequestAsync(NbdCommand.Read, 8, TwoExports.Size, 4096);
        Assert.Equal((NbdErrno.EINVAL, 8ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Read, 9, TwoExports.Size - 512, 1024);
        Assert.Equal((NbdErrno.EINVAL, 9ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.BlockStatus, 10, 0, 4096);
        Assert.Equal((NbdErrno.EINVAL, 10ul), await c.SimpleReplyAsync());
        await c.RequestAsync(NbdCommand.Read, 11, 0, 16);
        Assert.Equal((0u, 11ul), await c.SimpleReplyAsync());
        Assert.All(await c.ReadExactAsync(16), b => Assert.Equal(0x42, b));

        await c.RequestAsync(NbdCommand.Disc, 12, 0, 0);
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    [Fact]
    public async Task StructuredReadsDescribeHolesAndDataFlagsAsksForOneChunk()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: true);

        // Cluster 0 holds data, cluster 1 was never written: one data chunk, then a hole chunk that ends the reply.
        await c.RequestAsync(NbdCommand.Read, 1, 0, 128 << 10);
        var data = await c.ChunkAsync();
        Assert.Equal((false, NbdReplyType.OffsetData, 1ul, 8 + (64 << 10)), (data.Done, data.Type, data.Cookie, data.Payload.Length));
        Assert.Equal(0ul, BinaryPrimitives.ReadUInt64BigEndian(data.Payload));
        Assert.All(data.Payload[8..], b => Assert.Equal(0x42, b));
        var hole = await c.ChunkAsync();
        Assert.Equal((true, NbdReplyType.OffsetHole, 1ul), (hole.Done, hole.Type, hole.Cookie));
        var expected = new byte[12];
        BinaryPrimitives.WriteUInt64BigEndian(expected, 64 << 10);
        BinaryPrimitives.WriteUInt32BigEndian(expected.AsSpan(8), 64 << 10);
        Assert.Equal(expected, hole.Payload);

        await c.RequestAsync(NbdCommand.Read, 2, 0, 128 << 10, NbdCommandFlags.Df);
        var whole = await c.ChunkAsync();
        Assert.Equal((true, NbdReplyType.OffsetData, 2ul, 8 + (128 << 10)), (whole.Done, whole.Type, whole.Cookie, whole.Payload.Length));
        Assert.Equal(Enumerable.Repeat((byte)0x42, 64 << 10).Concat(new byte[64 << 10]), whole.Payload[8..]);

        // A request with no data to return gets one NONE chunk with DONE.
        await c.RequestAsync(NbdCommand.Write, 3, 256 << 10, Pattern.Length, payload: Pattern);
        var none = new byte[NbdReplyCodec.StructuredHeaderLength];
        NbdReplyCodec.WriteDone(none, 3);
        Assert.Equal(none, await c.ReadExactAsync(none.Length));

        // Refusals: an error chunk with EINVAL and QEMU's wording.
        await c.RequestAsync(NbdCommand.Read, 4, TwoExports.Size, 4096);
        Assert.Equal((NbdErrno.EINVAL, $"operation past EOF; From: {TwoExports.Size}, Len: 4096, Size: {TwoExports.Size}"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.Read, 5, 0, 4096, NbdCommandFlags.ReqOne);
        Assert.Equal((NbdErrno.EINVAL, "unsupported flags 0x8 for this command"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync((NbdCommand)77, 6, 0, 0);
        Assert.Equal((NbdErrno.EINVAL, "unsupported command 77"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.BlockStatus, 7, 0, 4096);
        Assert.Equal((NbdErrno.EINVAL, "No meta contexts negotiated"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.Read, 8, 0, NbdConst.MaxPayload + 1);
        Assert.Equal((NbdErrno.EINVAL, "read request too large"), ErrorOf(await c.ChunkAsync()));

        await c.RequestAsync(NbdCommand.Disc, 9, 0, 0);
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    private static void AssertStatus((bool Done, NbdReplyType Type, ulong Cookie, byte[] Payload) chunk, bool done, ulong cookie, uint context,
        params (uint Length, uint Flags)[] extents)
    {
        Assert.Equal((done, NbdReplyType.BlockStatus, cookie), (chunk.Done, chunk.Type, chunk.Cookie));
        Assert.Equal(context, BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload));
        var actual = new List<(uint, uint)>();
        for (int i = 4; i < chunk.Payload.Length; i += 8)
            actual.Add((BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(i)), BinaryPrimitives.ReadUInt32BigEndian(chunk.Payload.AsSpan(i + 4))));
        Assert.Equal(extents, actual);
    }

    [Fact]
    public async Task BlockStatusSendsOneChunkPerNegotiatedContext()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: true, "base:allocation", "qemu:dirty-bitmap:b0");
        await c.RequestAsync(NbdCommand.Write, 1, 128 << 10, 64 << 10, payload: new byte[64 << 10].Select((_, i) => (byte)(i | 1)).ToArray());
        var written = await c.ChunkAsync();
        Assert.Equal((true, NbdReplyType.None, 1ul), (written.Done, written.Type, written.Cookie));

        const uint K64 = 64 << 10, Rest = (1 << 20) - 3 * K64;
        await c.RequestAsync(NbdCommand.BlockStatus, 2, 0, 1 << 20);
        // base:allocation: data (0), hole and zero (3); the bitmap: clean (0), dirty (1) where the write went.
        AssertStatus(await c.ChunkAsync(), false, 2, 0, (K64, 0), (K64, 3), (K64, 0), (Rest, 3));
        AssertStatus(await c.ChunkAsync(), true, 2, 2, (2 * K64, 0), (K64, 1), (Rest, 0));

        await c.RequestAsync(NbdCommand.BlockStatus, 3, 0, 1 << 20, NbdCommandFlags.ReqOne);
        AssertStatus(await c.ChunkAsync(), false, 3, 0, (K64, 0));
        AssertStatus(await c.ChunkAsync(), true, 3, 2, (2 * K64, 0));

        await c.RequestAsync(NbdCommand.BlockStatus, 4, 0, 0);
        Assert.Equal((NbdErrno.EINVAL, "zero-length block status request"), ErrorOf(await c.ChunkAsync()));

        await c.RequestAsync(NbdCommand.Disc, 5, 0, 0);
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    [Fact]
    public async Task AReadOnlyExportRefusesWritesAndSkipsTheirPayload()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("ro", structured: true);
        await c.RequestAsync(NbdCommand.Write, 1, 0, Pattern.Length, payload: Pattern);
        Assert.Equal((NbdErrno.EINVAL, "Export is read-only"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.WriteZeroes, 2, 0, 4096);
        Assert.Equal((NbdErrno.EINVAL, "Export is read-only"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.Trim, 3, 0, 4096);
        Assert.Equal((NbdErrno.EINVAL, "Export is read-only"), ErrorOf(await c.ChunkAsync()));
        await c.RequestAsync(NbdCommand.Flush, 4, 0, 0);
        var flushed = await c.ChunkAsync();
        Assert.Equal((true, NbdReplyType.None, 4ul), (flushed.Done, flushed.Type, flushed.Cookie));
        await c.ToServer.Writer.CompleteAsync(); // end of input ends the session too
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    [Fact]
    public async Task ABadMagicEndsTheConnectionWithoutAReply()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: false);
        var request = new byte[NbdConst.RequestHeaderLength];
        new NbdRequest(0, NbdCommand.Read, 1, 0, 4096).Write(request);
        request[3] ^= 1;
        await c.SendAsync(request);
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    [Fact]
    public async Task AWriteOverTheMaximumIsAnsweredEoverflowAndEndsTheConnection()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: false);
        await c.RequestAsync(NbdCommand.Write, 1, 0, NbdConst.MaxPayload + 1);
        Assert.Equal((NbdErrno.EOVERFLOW, 1ul), await c.SimpleReplyAsync());
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
    }

    [Fact]
    public async Task DisconnectAnswersTheRequestsInFlightThenCloses()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GoAsync("e", structured: false);
        var both = new byte[2 * NbdConst.RequestHeaderLength + Pattern.Length];
        new NbdRequest(0, NbdCommand.Write, 1, 0, (uint)Pattern.Length).Write(both);
        Pattern.CopyTo(both, NbdConst.RequestHeaderLength);
        new NbdRequest(0, NbdCommand.Disc, 2, 0, 0).Write(both.AsSpan(NbdConst.RequestHeaderLength + Pattern.Length));
        await c.SendAsync(both);
        Assert.Equal((0u, 1ul), await c.SimpleReplyAsync());
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(Timeout);
        var back = new byte[Pattern.Length];
        _exports.Image.Read(0, back);
        Assert.Equal(Pattern, back);
    }
}
