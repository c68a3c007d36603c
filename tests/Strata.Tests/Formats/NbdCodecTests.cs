using System.Text;
using Strata.Formats.Nbd;

namespace Strata.Tests.Formats;

/// <summary>
/// The NBD wire codecs against the byte layouts of doc/proto.md: every encoder's exact bytes, and every decoder on
/// valid input and on each malformation it must refuse (with the reason the server sends back).
/// </summary>
public class NbdCodecTests
{
    private static byte[] Hex(string hex) => Convert.FromHexString(hex.Replace(" ", ""));

    [Fact]
    public void WireEnumsKeepTheProtocolsValues()
    {
        Assert.Equal(new uint[] { 1, 2, 3, 5, 6, 7, 8, 9, 10, 11 },
            new[] { NbdOption.ExportName, NbdOption.Abort, NbdOption.List, NbdOption.StartTls, NbdOption.Info, NbdOption.Go,
                NbdOption.StructuredReply, NbdOption.ListMetaContext, NbdOption.SetMetaContext, NbdOption.ExtendedHeaders }.Select(o => (uint)o));
        Assert.Equal(new uint[] { 1, 2, 3, 4, 0x80000001, 0x80000003, 0x80000006, 0x80000009 },
            new[] { NbdReply.Ack, NbdReply.Server, NbdReply.Info, NbdReply.MetaContext, NbdReply.ErrUnsup, NbdReply.ErrInvalid,
                NbdReply.ErrUnknown, NbdReply.ErrTooBig }.Select(r => (uint)r));
        Assert.Equal(new ushort[] { 0, 1, 2, 5, 0x8001, 0x8002 },
            new[] { NbdReplyType.None, NbdReplyType.OffsetData, NbdReplyType.OffsetHole, NbdReplyType.BlockStatus,
                NbdReplyType.Error, NbdReplyType.ErrorOffset }.Select(t => (ushort)t));
        Assert.Equal(new ushort[] { 0, 1, 2, 3, 4, 5, 6, 7 },
            new[] { NbdCommand.Read, NbdCommand.Write, NbdCommand.Disc, NbdCommand.Flush, NbdCommand.Trim, NbdCommand.Cache,
                NbdCommand.WriteZeroes, NbdCommand.BlockStatus }.Select(c => (ushort)c));
        Assert.Equal(new ushort[] { 0, 1, 2, 3 }, new[] { NbdInfo.Export, NbdInfo.Name, NbdInfo.Description, NbdInfo.BlockSize }.Select(i => (ushort)i));
    }

    // ------------------------------------------------------------------ requests

    [Fact]
    public void RequestHeaderRoundTripsThroughItsTwentyEightBytes()
    {
        var golden = Hex("25609513 0001 0001 0102030405060708 0000000000001000 00000200");
        Assert.True(NbdRequest.TryParse(golden, out var request));
        Assert.Equal(new NbdRequest(NbdCommandFlags.Fua, NbdCommand.Write, 0x0102030405060708, 0x1000, 0x200), request);
        var written = new byte[NbdConst.RequestHeaderLength];
        request.Write(written);
        Assert.Equal(golden, written);
    }

    [Fact]
    public void RequestWithBadMagicOrTooShortIsRefused()
    {
        Assert.False(NbdRequest.TryParse(Hex("25609514 0000 0000 0000000000000001 0000000000000000 00000000"), out _));
        Assert.False(NbdRequest.TryParse(Hex("25609513 0000 0000 0000000000000001 0000000000000000 0000"), out _));
    }

    // ------------------------------------------------------------------ handshake

    [Fact]
    public void GreetingIsNbdMagicIHaveOptAndFixedNewstyleWithNoZeroes()
    {
        var b = new byte[NbdOptionCodec.GreetingLength];
        NbdOptionCodec.WriteGreeting(b);
        Assert.Equal("NBDMAGICIHAVEOPT"u8.ToArray().Concat(Hex("0003")).ToArray(), b);
    }

    [Theory]
    [InlineData(0u, true, false)]
    [InlineData(1u, true, false)]
    [InlineData(3u, true, true)]
    [InlineData(2u, true, true)]
    [InlineData(4u, false, false)]
    [InlineData(0x80000001u, false, false)]
    public void ClientFlagsBeyondFixedNewstyleAndNoZeroesAreRefused(uint flags, bool accepted, bool noZeroes)
    {
        var b = new byte[4];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(b, flags);
        Assert.Equal(accepted, NbdOptionCodec.TryParseClientFlags(b, out bool nz));
        Assert.Equal(noZeroes, nz);
    }

    [Fact]
    public void OptionHeaderIsIHaveOptOptionAndLength()
    {
        var golden = Hex("49484156454F5054 00000007 0000000A");
        Assert.True(NbdOptionHeader.TryParse(golden, out var header));
        Assert.Equal(new NbdOptionHeader(7, 10), header);
        var written = new byte[NbdOptionHeader.Size];
        header.Write(written);
        Assert.Equal(golden, written);
        Assert.False(NbdOptionHeader.TryParse(Hex("49484156454F5055 00000007 0000000A"), out _));
    }

    [Fact]
    public void OptionRepliesCarryTheirMagicOptionTypeAndPayload()
    {
        Assert.Equal(Hex("0003e889045565a9 00000007 00000001 00000000"), NbdOptionCodec.Reply(7, NbdReply.Ack, []));
        Assert.Equal(Hex("0003e889045565a9 00000063 80000001 00000002 6869"), NbdOptionCodec.Reply(99, NbdReply.ErrUnsup, "hi"u8));
        var b = new byte[30];
        Assert.Equal(22, NbdOptionCodec.WriteReply(b, 3, NbdReply.Server, Hex("0102")));
        Assert.Equal(Hex("0003e889045565a9 00000003 00000002 00000002 0102"), b[..22]);
    }

    [Fact]
    public void ExportNameReplyIsSizeAndFlagsPaddedUnlessNoZeroes()
    {
        var b = new byte[NbdOptionCodec.ExportNameReplyPaddedLength];
        b.AsSpan().Fill(0xee);
        Assert.Equal(10, NbdOptionCodec.WriteExportNameReply(b, 0x10000000, (NbdTransmissionFlags)0x0d6d, noZeroes: true));
        Assert.Equal(Hex("0000000010000000 0d6d"), b[..10]);
        Assert.Equal(0xee, b[10]); // nothing written past the reply
        b.AsSpan().Fill(0xee);
        Assert.Equal(134, NbdOptionCodec.WriteExportNameReply(b, 0x10000000, (NbdTransmissionFlags)0x0d6d, noZeroes: false));
        Assert.Equal(Hex("0000000010000000 0d6d").Concat(new byte[124]).ToArray(), b);
    }

    [Fact]
    public void ListAndInfoPayloadsFollowTheSpec()
    {
        Assert.Equal(Hex("00000002 6162 64657363"), NbdOptionCodec.ServerEntry("ab"u8, "desc"u8));
        Assert.Equal(Hex("00000000"), NbdOptionCodec.ServerEntry([], []));
        Assert.Equal(Hex("0001 6578"), NbdOptionCodec.InfoText(NbdInfo.Name, "ex"u8));
        Assert.Equal(Hex("0002 64"), NbdOptionCodec.InfoText(NbdInfo.Description, "d"u8));
        Assert.Equal(Hex("0003 00000001 00001000 02000000"), NbdOptionCodec.InfoBlockSize(1, 4096, 32 << 20));
        Assert.Equal(Hex("0000 0000000004000000 0ded"), NbdOptionCodec.InfoExport(64 << 20, (NbdTransmissionFlags)0x0ded));
        Assert.Equal(Hex("00000002").Concat("base:allocation"u8.ToArray()).ToArray(), NbdOptionCodec.MetaContext(2, "base:allocation"u8));
    }

    // ------------------------------------------------------------------ option data

    private static byte[] ExportQuery(string name, params ushort[] infos)
    {
        var n = Encoding.UTF8.GetBytes(name);
        var b = new List<byte>();
        b.AddRange(Hex(((uint)n.Length).ToString("x8")));
        b.AddRange(n);
        b.AddRange(Hex(((ushort)infos.Length).ToString("x4")));
        foreach (var i in infos) b.AddRange(Hex(i.ToString("x4")));
        return b.ToArray();
    }

    [Fact]
    public void GoAndInfoDataNameTheExportAndCountTheRequests()
    {
        Assert.True(NbdExportQuery.TryParse(ExportQuery("disk", 3, 1), out var q, out _));
        Assert.Equal(new NbdExportQuery("disk", 2), q);
        Assert.True(NbdExportQuery.TryParse(ExportQuery(""), out q, out _));
        Assert.Equal(new NbdExportQuery("", 0), q);
    }

    [Theory]
    [InlineData("0000000065", "option data too short")]
    [InlineData("00000005 6578 0000", "export name length exceeds the option data")]
    [InlineData("ffffffff 6578 0000", "export name length exceeds the option data")]
    [InlineData("00000002 6578 0002 0001", "information request count does not match the option length")]
    [InlineData("00000002 6578 0000 00", "information request count does not match the option length")]
    public void MalformedGoDataIsRefusedWithItsReason(string hex, string reason)
    {
        Assert.False(NbdExportQuery.TryParse(Hex(hex), out _, out string error));
        Assert.Equal(reason, error);
    }

    private static byte[] MetaQuery(string export, params string[] queries)
    {
        var b = new List<byte>();
        void Text(string s)
        {
            var t = Encoding.UTF8.GetBytes(s);
            b.AddRange(Hex(((uint)t.Length).ToString("x8")));
            b.AddRange(t);
        }
        Text(export);
        b.AddRange(Hex(((uint)queries.Length).ToString("x8")));
        foreach (var q in queries) Text(q);
        return b.ToArray();
    }

    [Fact]
    public void MetaContextDataNamesTheExportAndItsQueries()
    {
        Assert.True(NbdMetaContextQuery.TryParse(MetaQuery("e", "base:allocation", "qemu:dirty-bitmap:b0"), out var q, out _));
        Assert.Equal("e", q!.ExportName);
        Assert.Equal(new[] { "base:allocation", "qemu:dirty-bitmap:b0" }, q.Queries);
        Assert.True(NbdMetaContextQuery.TryParse(MetaQuery(""), out q, out _));
        Assert.Empty(q!.Queries);
    }

    [Fact]
    public void MalformedMetaContextDataIsRefusedAtItsFirstFault()
    {
        string Reason(byte[] data)
        {
            Assert.False(NbdMetaContextQuery.TryParse(data, out var q, out string error));
            Assert.Null(q);
            return error;
        }
        var valid = MetaQuery("e", "base:allocation");
        Assert.Equal("truncated", Reason(Hex("000000")));
        Assert.Equal("length exceeds the option data", Reason(Hex("00000009 65")));
        Assert.Equal("truncated", Reason(Hex("00000001 65 0000")));
        Assert.Equal("truncated", Reason(Hex("00000001 65 00000002 00000001 61")));          // the second query is missing
        Assert.Equal("length exceeds the option data", Reason(valid[..^1]));
        Assert.Equal("trailing bytes", Reason([.. valid, 0]));
        Assert.Equal("query too long", Reason(Hex("00000001 65 00000001 00001001")));
        Assert.True(NbdMetaContextQuery.TryParse(MetaQuery("e", new string('a', NbdMetaContextQuery.MaxQueryLength)), out _, out _));
    }

    // ------------------------------------------------------------------ transmission replies

    [Fact]
    public void SimpleReplyIsMagicErrorAndCookie()
    {
        var b = new byte[NbdReplyCodec.SimpleReplyLength];
        NbdReplyCodec.WriteSimpleReply(b, NbdErrno.EINVAL, 7);
        Assert.Equal(Hex("67446698 00000016 0000000000000007"), b);
    }

    [Fact]
    public void StructuredChunksFollowTheSpec()
    {
        var b = new byte[NbdReplyCodec.StructuredHeaderLength];
        NbdReplyCodec.WriteDone(b, 0x1122334455667788);
        Assert.Equal(Hex("668e33ef 0001 0000 1122334455667788 00000000"), b);

        b = new byte[NbdReplyCodec.OffsetDataHeaderLength];
        NbdReplyCodec.WriteOffsetDataHeader(b, done: false, 9, 0x200, 0x1000);
        Assert.Equal(Hex("668e33ef 0000 0001 0000000000000009 00001008 0000000000000200"), b);

        b = new byte[NbdReplyCodec.OffsetHoleLength];
        NbdReplyCodec.WriteOffsetHole(b, done: true, 9, 0x1200, 0x3000);
        Assert.Equal(Hex("668e33ef 0001 0002 0000000000000009 0000000c 0000000000001200 00003000"), b);

        NbdExtent[] extents = [new(0x10000, 1), new(0x30000, 0)];
        b = new byte[NbdReplyCodec.BlockStatusLength(extents.Length)];
        Assert.Equal(40, b.Length);
        NbdReplyCodec.WriteBlockStatus(b, done: false, 5, 2, extents);
        Assert.Equal(Hex("668e33ef 0000 0005 0000000000000005 00000014 00000002 00010000 00000001 00030000 00000000"), b);
    }

    [Fact]
    public void ErrorChunkCarriesErrnoAndTheUtf8Message()
    {
        var b = new byte[NbdReplyCodec.MaxErrorLength(5)];
        int n = NbdReplyCodec.WriteError(b, 3, NbdErrno.EINVAL, "bad é");
        Assert.Equal(32, n);
        Assert.Equal(Hex("668e33ef 0001 8001 0000000000000003 0000000c 00000016 0006 626164 20 c3a9"), b[..n]);
        n = NbdReplyCodec.WriteError(b, 3, NbdErrno.EIO, "");
        Assert.Equal(Hex("668e33ef 0001 8001 0000000000000003 00000006 00000005 0000"), b[..n]);
    }
}
