using System.Buffers.Binary;
using System.Text;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;

namespace Strata.Tests.Protocol;

/// <summary>
/// The server's handshake over in-memory pipes: what each option is answered, byte for byte where the spec fixes
/// it, and the <see cref="NbdAgreement"/> a successful negotiation yields. Flag values are QEMU 7.2's.
/// </summary>
public sealed class NbdNegotiationTests : IDisposable
{
    private readonly TwoExports _exports = new();

    public void Dispose() => _exports.Dispose();

    private const NbdTransmissionFlags WritableFlags = (NbdTransmissionFlags)0x0d6d, WritableStructuredFlags = (NbdTransmissionFlags)0x0ded;

    /// <summary>Runs only the negotiation on the client's pipes.</summary>
    private Task<NbdAgreement?> Negotiate(NbdWireClient c) =>
        Task.Run(() => new NbdNegotiation(_exports, c.ToServer.Reader, c.ToClient.Writer).RunAsync(CancellationToken.None));

    [Fact]
    public async Task GreetingIsFixedNewstyleAndUnknownClientFlagsEndTheHandshake()
    {
        var c = new NbdWireClient();
        var agreement = Negotiate(c);
        Assert.Equal("NBDMAGICIHAVEOPT\0\u0003"u8.ToArray(), await c.GreetAsync(flags: 1 | 4));
        Assert.Null(await agreement.WaitAsync(TimeSpan.FromSeconds(20)));
    }

    [Fact]
    public async Task GoWithoutStructuredRepliesAgreesOnSimpleReplies()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        var replies = await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("e"));
        Assert.Equal(new[] { NbdReply.Info, NbdReply.Info, NbdReply.Info, NbdReply.Info, NbdReply.Ack }, replies.Select(r => r.Type));
        Assert.Equal(NbdOptionCodec.InfoText(NbdInfo.Name, "e"u8), replies[0].Data);
        Assert.Equal(NbdOptionCodec.InfoText(NbdInfo.Description, "desc"u8), replies[1].Data);
        Assert.Equal(NbdOptionCodec.InfoBlockSize(1, 4096, 32 << 20), replies[2].Data);
        Assert.Equal(NbdOptionCodec.InfoExport(TwoExports.Size, WritableFlags), replies[3].Data);
        var agreement = await negotiation.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.NotNull(agreement);
        Assert.Same(_exports.Writable, agreement.Export);
        Assert.Equal(WritableFlags, agreement.Flags);
        Assert.False(agreement.StructuredReplies);
        Assert.Empty(agreement.MetaContexts);
        Assert.Equal(new NbdBlockSizes(1, 4096, 32 << 20), agreement.BlockSizes);
    }

    [Fact]
    public async Task GoWithStructuredRepliesAgreesOnTheMetaContextsSetForThatExport()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        Assert.Equal((NbdReply.ErrInvalid, "request option before structured reply"),
            await c.RefusalAsync(NbdOption.SetMetaContext, NbdWireClient.MetaContextQuery("e", "base:allocation")));
        var structured = Assert.Single(await c.AskAsync(NbdOption.StructuredReply, []));
        Assert.Equal((NbdReply.Ack, 0), (structured.Type, structured.Data.Length));
        Assert.Equal((NbdReply.ErrInvalid, "structured reply already negotiated"), await c.RefusalAsync(NbdOption.StructuredReply, []));
        // An unknown bitmap is left out; the ids are QEMU's: base:allocation 0, bitmaps from 2.
        var set = await c.AskAsync(NbdOption.SetMetaContext,
            NbdWireClient.MetaContextQuery("e", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:nope", "base:allocation"));
        Assert.Equal(new[] { NbdReply.MetaContext, NbdReply.MetaContext, NbdReply.Ack }, set.Select(r => r.Type));
        Assert.Equal(NbdOptionCodec.MetaContext(0, "base:allocation"u8), set[0].Data);
        Assert.Equal(NbdOptionCodec.MetaContext(2, "qemu:dirty-bitmap:b0"u8), set[1].Data);
        Assert.Equal(NbdReply.Ack, (await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("e")))[^1].Type);
        var agreement = await negotiation.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.NotNull(agreement);
        Assert.True(agreement.StructuredReplies);
        Assert.Equal(WritableStructuredFlags, agreement.Flags);
        Assert.Equal(new[] { new NbdMetaContext(0, "base:allocation"), new NbdMetaContext(2, "qemu:dirty-bitmap:b0") }, agreement.MetaContexts);
    }

    [Fact]
    public async Task MetaContextsSetForAnotherExportDoNotCarryOver()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        await c.AskAsync(NbdOption.StructuredReply, []);
        Assert.Equal(NbdReply.Ack, (await c.AskAsync(NbdOption.SetMetaContext, NbdWireClient.MetaContextQuery("e", "base:allocation")))[^1].Type);
        var replies = await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("ro"));
        Assert.Equal(NbdReply.Ack, replies[^1].Type);
        Assert.Equal(NbdOptionCodec.InfoExport(TwoExports.Size, (NbdTransmissionFlags)0x058f), replies[^2].Data); // read-only, structured
        var agreement = await negotiation.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Same(_exports.ReadOnly, agreement!.Export);
        Assert.Empty(agreement.MetaContexts);
    }

    [Fact]
    public async Task ListMetaContextListsWithIdZeroAndChangesNothing()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        var all = await c.AskAsync(NbdOption.ListMetaContext, NbdWireClient.MetaContextQuery("e"));
        Assert.Equal(new[] { NbdReply.MetaContext, NbdReply.MetaContext, NbdReply.Ack }, all.Select(r => r.Type));
        Assert.Equal(new[] { NbdOptionCodec.MetaContext(0, "base:allocation"u8), NbdOptionCodec.MetaContext(0, "qemu:dirty-bitmap:b0"u8), Array.Empty<byte>() },
            all.Select(r => r.Data));
        var qemu = await c.AskAsync(NbdOption.ListMetaContext, NbdWireClient.MetaContextQuery("e", "qemu:"));
        Assert.Equal(new[] { NbdOptionCodec.MetaContext(0, "qemu:dirty-bitmap:b0"u8), Array.Empty<byte>() }, qemu.Select(r => r.Data));
        Assert.Equal((NbdReply.ErrUnknown, "Export 'nope' not present"), await c.RefusalAsync(NbdOption.ListMetaContext, NbdWireClient.MetaContextQuery("nope")));
        Assert.Equal((NbdReply.ErrInvalid, "malformed meta context request: trailing bytes"),
            await c.RefusalAsync(NbdOption.ListMetaContext, [.. NbdWireClient.MetaContextQuery("e"), 0]));
        await c.AskAsync(NbdOption.StructuredReply, []);
        await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("e"));
        Assert.Empty((await negotiation.WaitAsync(TimeSpan.FromSeconds(20)))!.MetaContexts);
    }

    [Fact]
    public async Task ListNamesEveryExportWithItsDescription()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        var list = await c.AskAsync(NbdOption.List, []);
        Assert.Equal(new[] { NbdReply.Server, NbdReply.Server, NbdReply.Ack }, list.Select(r => r.Type));
        Assert.Equal(new[] { NbdOptionCodec.ServerEntry("e"u8, "desc"u8), NbdOptionCodec.ServerEntry("ro"u8, []), Array.Empty<byte>() }, list.Select(r => r.Data));
        Assert.Equal((NbdReply.ErrInvalid, "LIST takes no data"), await c.RefusalAsync(NbdOption.List, [0]));
        await c.OptionAsync(NbdOption.Abort, []);
        var (option, type, data) = await c.OptionReplyAsync();
        Assert.Equal(((uint)NbdOption.Abort, NbdReply.Ack, 0), (option, type, data.Length));
        Assert.Null(await negotiation.WaitAsync(TimeSpan.FromSeconds(20)));
    }

    [Fact]
    public async Task UnknownOptionsAndTlsAreUnsupportedAndTheHandshakeGoesOn()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        Assert.Equal((NbdReply.ErrUnsup, "Unsupported option 99"), await c.RefusalAsync((NbdOption)99, [1, 2, 3]));
        Assert.Equal((NbdReply.ErrUnsup, "Unsupported option 5"), await c.RefusalAsync(NbdOption.StartTls, []));
        Assert.Equal((NbdReply.ErrUnsup, "Unsupported option 11"), await c.RefusalAsync(NbdOption.ExtendedHeaders, []));
        Assert.Equal(NbdReply.Ack, (await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("e")))[^1].Type);
        Assert.NotNull(await negotiation.WaitAsync(TimeSpan.FromSeconds(20)));
    }

    [Fact]
    public async Task BadOptionLengthsAreRefusedAndTheHandshakeGoesOn()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        Assert.Equal((NbdReply.ErrInvalid, "option data too short"), await c.RefusalAsync(NbdOption.Go, [0, 0, 0, 1, (byte)'e']));
        Assert.Equal((NbdReply.ErrInvalid, "export name length exceeds the option data"), await c.RefusalAsync(NbdOption.Info, [0, 0, 0, 9, (byte)'e', 0, 0]));
        Assert.Equal((NbdReply.ErrInvalid, "information request count does not match the option length"),
            await c.RefusalAsync(NbdOption.Go, [0, 0, 0, 1, (byte)'e', 0, 1]));
        Assert.Equal((NbdReply.ErrInvalid, "STRUCTURED_REPLY takes no data"), await c.RefusalAsync(NbdOption.StructuredReply, [0]));
        Assert.Equal((NbdReply.ErrUnknown, "Export 'nope' not present"), await c.RefusalAsync(NbdOption.Info, NbdWireClient.ExportQuery("nope")));
        // Over 1 MiB of option data: skipped and refused.
        Assert.Equal((NbdReply.ErrTooBig, "option too large"), await c.RefusalAsync((NbdOption)99, new byte[NbdConst.MaxOptionLength + 1]));
        // INFO describes and leaves the handshake open.
        Assert.Equal(NbdReply.Ack, (await c.AskAsync(NbdOption.Info, NbdWireClient.ExportQuery("e")))[^1].Type);
        Assert.Equal(NbdReply.Ack, (await c.AskAsync(NbdOption.Go, NbdWireClient.ExportQuery("e")))[^1].Type);
        Assert.Same(_exports.Writable, (await negotiation.WaitAsync(TimeSpan.FromSeconds(20)))!.Export);
    }

    [Fact]
    public async Task OptionsTooLargeToSkipOrWithoutMagicEndTheHandshake()
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync();
        var header = new byte[NbdOptionHeader.Size];
        new NbdOptionHeader(99, 16 * NbdConst.MaxOptionLength + 1).Write(header);
        await c.SendAsync(header);
        Assert.Null(await negotiation.WaitAsync(TimeSpan.FromSeconds(20)));

        c = new NbdWireClient();
        negotiation = Negotiate(c);
        await c.GreetAsync();
        new NbdOptionHeader((uint)NbdOption.Go, 0).Write(header);
        header[0] ^= 0xff;
        await c.SendAsync(header);
        Assert.Null(await negotiation.WaitAsync(TimeSpan.FromSeconds(20)));
    }

    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task ExportNameAnswersSizeAndFlagsPaddedUnlessNoZeroes(bool noZeroes)
    {
        var c = new NbdWireClient();
        var negotiation = Negotiate(c);
        await c.GreetAsync(noZeroes ? 3u : 1u);
        await c.OptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("e"));
        var reply = await c.ReadExactAsync(noZeroes ? 10 : 134);
        Assert.Equal((ulong)TwoExports.Size, BinaryPrimitives.ReadUInt64BigEndian(reply));
        Assert.Equal((ushort)WritableFlags, BinaryPrimitives.ReadUInt16BigEndian(reply.AsSpan(8)));
        Assert.All(reply[10..], b => Assert.Equal(0, b));
        var agreement = await negotiation.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.Equal((_exports.Writable, false), (agreement!.Export, agreement.StructuredReplies));
    }

    [Fact]
    public async Task ExportNameOfAnUnknownExportEndsTheHandshakeWithoutAReply()
    {
        var c = new NbdWireClient();
        var session = c.RunSession(_exports);
        await c.GreetAsync();
        await c.OptionAsync(NbdOption.ExportName, Encoding.UTF8.GetBytes("nope"));
        Assert.True(await c.ClosedAsync());
        await session.WaitAsync(TimeSpan.FromSeconds(20));
    }
}
