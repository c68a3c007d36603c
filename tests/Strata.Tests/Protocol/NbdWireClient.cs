using System.Buffers.Binary;
using System.IO.Pipelines;
using System.Text;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>Two exports on qcow2 images in a temp folder: "e" (writable, described, with dirty bitmap "b0") and
/// "ro" (read-only).</summary>
internal sealed class TwoExports : INbdExportRegistry, IDisposable
{
    /// <summary>Over the 32 MiB payload limit, so a read can be refused for its size alone.</summary>
    public const long Size = 64 << 20;
    private readonly TempDir _dir = new();
    public readonly BlockImage Image, ReadOnlyImage;
    public readonly NbdExport Writable, ReadOnly;

    public TwoExports()
    {
        foreach (var f in new[] { "e.qcow2", "ro.qcow2" }) Qcow2Image.Create(_dir[f], new Qcow2CreateOptions { Size = Size }).Dispose();
        Image = ImageOpener.Open(_dir["e.qcow2"], readOnly: false);
        Image.Write(0, Enumerable.Repeat((byte)0x42, 65536).ToArray()); // cluster 0 data, before the bitmap exists
        var bitmap = Image.Bitmaps.Add("b0", 65536);
        ReadOnlyImage = ImageOpener.Open(_dir["ro.qcow2"], readOnly: true);
        Writable = new NbdExport("e", "e", "desc", Image, writable: true, [bitmap], allocationDepth: false) { DiscardUnmap = true };
        ReadOnly = new NbdExport("ro", "ro", null, ReadOnlyImage, writable: false, [], allocationDepth: false);
    }

    public NbdExport? Find(string name) => name == "e" ? Writable : name == "ro" ? ReadOnly : null;
    public IReadOnlyList<NbdExport> All => [Writable, ReadOnly];
    public bool MultiConn => true;

    public void Dispose()
    {
        Image.Dispose();
        ReadOnlyImage.Dispose();
        _dir.Dispose();
    }
}

/// <summary>A client speaking raw NBD bytes to a server-side pipe pair, for tests that check every byte.</summary>
internal sealed class NbdWireClient
{
    public readonly Pipe ToServer = new();
    public readonly Pipe ToClient = new();
    private readonly Stream _in;
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(20);

    public NbdWireClient() => _in = ToClient.Reader.AsStream();

    /// <summary>A whole session (handshake and transmission) on the client's pipes.</summary>
    public Task RunSession(INbdExportRegistry registry) =>
        Task.Run(() => new NbdServerSession(registry, ToServer.Reader, ToClient.Writer).RunAsync(CancellationToken.None));

    public async Task SendAsync(byte[] bytes) => await ToServer.Writer.WriteAsync(bytes);

    public async Task<byte[]> ReadExactAsync(int n)
    {
        var b = new byte[n];
        await _in.ReadExactlyAsync(b).AsTask().WaitAsync(Timeout);
        return b;
    }

    /// <summary>True when the server closed its side with nothing more to say.</summary>
    public async Task<bool> ClosedAsync() => await _in.ReadAsync(new byte[1]).AsTask().WaitAsync(Timeout) == 0;

    /// <summary>Reads the greeting and answers with client flags (default: fixed newstyle, no zeroes).</summary>
    public async Task<byte[]> GreetAsync(uint flags = NbdConst.ClientFlagFixedNewstyle | NbdConst.ClientFlagNoZeroes)
    {
        var greeting = await ReadExactAsync(NbdOptionCodec.GreetingLength);
        var f = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(f, flags);
        await SendAsync(f);
        return greeting;
    }

    public async Task OptionAsync(uint option, byte[] data)
    {
        var b = new byte[NbdOptionHeader.Size + data.Length];
        new NbdOptionHeader(option, (uint)data.Length).Write(b);
        data.CopyTo(b, NbdOptionHeader.Size);
        await SendAsync(b);
    }

    public Task OptionAsync(NbdOption option, byte[] data) => OptionAsync((uint)option, data);

    public async Task<(uint Option, NbdReply Type, byte[] Data)> OptionReplyAsync()
    {
        var h = await ReadExactAsync(NbdOptionCodec.ReplyHeaderLength);
        Assert.Equal(NbdConst.OptReplyMagic, BinaryPrimitives.ReadUInt64BigEndian(h));
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(8)), (NbdReply)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)),
            await ReadExactAsync((int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16))));
    }

    /// <summary>Sends an option and collects its replies up to the ACK or an error (included).</summary>
    public async Task<List<(NbdReply Type, byte[] Data)>> AskAsync(NbdOption option, byte[] data)
    {
        await OptionAsync(option, data);
        var replies = new List<(NbdReply, byte[])>();
        while (true)
        {
            var (o, type, payload) = await OptionReplyAsync();
            Assert.Equal((uint)option, o);
            replies.Add((type, payload));
            if (type == NbdReply.Ack || ((uint)type & 0x80000000) != 0) return replies;
        }
    }

    /// <summary>The error an option got, with its message.</summary>
    public async Task<(NbdReply Type, string Message)> RefusalAsync(NbdOption option, byte[] data)
    {
        var replies = await AskAsync(option, data);
        Assert.Single(replies);
        return (replies[0].Type, Encoding.UTF8.GetString(replies[0].Data));
    }

    public static byte[] ExportQuery(string name)
    {
        var n = Encoding.UTF8.GetBytes(name);
        var b = new byte[6 + n.Length];
        BinaryPrimitives.WriteUInt32BigEndian(b, (uint)n.Length);
        n.CopyTo(b, 4);
        return b;
    }

    public static byte[] MetaContextQuery(string export, params string[] queries)
    {
        var b = new List<byte>();
        void U32(int v)
        {
            var x = new byte[4];
            BinaryPrimitives.WriteUInt32BigEndian(x, (uint)v);
            b.AddRange(x);
        }
        var e = Encoding.UTF8.GetBytes(export);
        U32(e.Length);
        b.AddRange(e);
        U32(queries.Length);
        foreach (var q in queries)
        {
            var t = Encoding.UTF8.GetBytes(q);
            U32(t.Length);
            b.AddRange(t);
        }
        return b.ToArray();
    }

    public async Task RequestAsync(NbdCommand command, ulong cookie, long offset, int length, NbdCommandFlags flags = 0, byte[]? payload = null)
    {
        var b = new byte[NbdConst.RequestHeaderLength + (payload?.Length ?? 0)];
        new NbdRequest(flags, command, cookie, (ulong)offset, (uint)length).Write(b);
        payload?.CopyTo(b, NbdConst.RequestHeaderLength);
        await SendAsync(b);
    }

    /// <summary>A simple reply: errno and cookie (its data, if any, is read by the caller).</summary>
    public async Task<(uint Errno, ulong Cookie)> SimpleReplyAsync()
    {
        var h = await ReadExactAsync(NbdReplyCodec.SimpleReplyLength);
        Assert.Equal(NbdConst.SimpleReplyMagic, BinaryPrimitives.ReadUInt32BigEndian(h));
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(4)), BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(8)));
    }

    /// <summary>One structured reply chunk.</summary>
    public async Task<(bool Done, NbdReplyType Type, ulong Cookie, byte[] Payload)> ChunkAsync()
    {
        var h = await ReadExactAsync(NbdReplyCodec.StructuredHeaderLength);
        Assert.Equal(NbdConst.StructuredReplyMagic, BinaryPrimitives.ReadUInt32BigEndian(h));
        return ((BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(4)) & 1) != 0, (NbdReplyType)BinaryPrimitives.ReadUInt16BigEndian(h.AsSpan(6)),
            BinaryPrimitives.ReadUInt64BigEndian(h.AsSpan(8)), await ReadExactAsync((int)BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16))));
    }

    /// <summary>The handshake up to GO (optionally with structured replies and meta contexts first).</summary>
    public async Task GoAsync(string export, bool structured, params string[] contexts)
    {
        await GreetAsync();
        if (structured) Assert.Equal(NbdReply.Ack, (await AskAsync(NbdOption.StructuredReply, []))[^1].Type);
        if (contexts.Length > 0) Assert.Equal(NbdReply.Ack, (await AskAsync(NbdOption.SetMetaContext, MetaContextQuery(export, contexts)))[^1].Type);
        Assert.Equal(NbdReply.Ack, (await AskAsync(NbdOption.Go, ExportQuery(export)))[^1].Type);
    }
}
