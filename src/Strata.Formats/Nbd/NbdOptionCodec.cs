using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Nbd;

/// <summary>The 16-byte header of a client's option in fixed-newstyle negotiation: IHAVEOPT, option, data length.</summary>
public readonly record struct NbdOptionHeader(uint Option, uint Length)
{
    public const int Size = 16;

    /// <summary>False when the magic is not IHAVEOPT: the stream is lost.</summary>
    public static bool TryParse(ReadOnlySpan<byte> h, out NbdOptionHeader header)
    {
        header = default;
        if (h.Length < Size || BinaryPrimitives.ReadUInt64BigEndian(h) != NbdConst.IHaveOpt) return false;
        header = new NbdOptionHeader(BinaryPrimitives.ReadUInt32BigEndian(h[8..]), BinaryPrimitives.ReadUInt32BigEndian(h[12..]));
        return true;
    }

    public void Write(Span<byte> h)
    {
        BinaryPrimitives.WriteUInt64BigEndian(h, NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(h[8..], Option);
        BinaryPrimitives.WriteUInt32BigEndian(h[12..], Length);
    }
}

/// <summary>The data of NBD_OPT_INFO and NBD_OPT_GO: u32 name length, name, u16 count, count u16 information
/// requests. The requests are only counted: the server sends the same information whatever is asked.</summary>
public readonly record struct NbdExportQuery(string Name, int InformationRequests)
{
    /// <summary>False with the reason (sent to the client in NBD_REP_ERR_INVALID) when the data is malformed.</summary>
    public static bool TryParse(ReadOnlySpan<byte> data, out NbdExportQuery query, out string error)
    {
        query = default;
        error = "";
        if (data.Length < 6)
        {
            error = "option data too short";
            return false;
        }
        uint nameLength = BinaryPrimitives.ReadUInt32BigEndian(data);
        if (nameLength > data.Length - 6)
        {
            error = "export name length exceeds the option data";
            return false;
        }
        int count = BinaryPrimitives.ReadUInt16BigEndian(data[(4 + (int)nameLength)..]);
        if (data.Length != 6 + nameLength + 2 * count)
        {
            error = "information request count does not match the option length";
            return false;
        }
        query = new NbdExportQuery(Encoding.UTF8.GetString(data.Slice(4, (int)nameLength)), count);
        return true;
    }
}

/// <summary>The data of NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: u32 export name length, export name,
/// u32 query count, then each query as u32 length and text.</summary>
public sealed record NbdMetaContextQuery(string ExportName, IReadOnlyList<string> Queries)
{
    /// <summary>QEMU's NBD_MAX_STRING_SIZE: a longer query is refused.</summary>
    public const int MaxQueryLength = 4096;

    /// <summary>False with the reason when the data is malformed; checked in wire order, so a client sees the first
    /// fault.</summary>
    public static bool TryParse(ReadOnlySpan<byte> data, out NbdMetaContextQuery? query, out string error)
    {
        query = null;
        int pos = 0;
        if (!TryReadU32(data, ref pos, out uint nameLength, out error)) return false;
        if (!TryTake(data, ref pos, nameLength, out var name, out error)) return false;
        if (!TryReadU32(data, ref pos, out uint count, out error)) return false;
        var queries = new List<string>();
        for (uint i = 0; i < count; i++)
        {
            if (!TryReadU32(data, ref pos, out uint queryLength, out error)) return false;
            if (queryLength > MaxQueryLength)
            {
                error = "query too long";
                return false;
            }
            if (!TryTake(data, ref pos, queryLength, out var text, out error)) return false;
            queries.Add(Encoding.UTF8.GetString(text));
        }
        if (pos != data.Length)
        {
            error = "trailing bytes";
            return false;
        }
        query = new NbdMetaContextQuery(Encoding.UTF8.GetString(name), queries);
        return true;
    }

    private static bool TryReadU32(ReadOnlySpan<byte> data, ref int pos, out uint value, out string error)
    {
        value = 0;
        error = "";
        if (pos + 4 > data.Length)
        {
            error = "truncated";
            return false;
        }
        value = BinaryPrimitives.ReadUInt32BigEndian(data[pos..]);
        pos += 4;
        return true;
    }

    private static bool TryTake(ReadOnlySpan<byte> data, ref int pos, uint length, out ReadOnlySpan<byte> taken, out string error)
    {
        taken = default;
        error = "";
        if (length > data.Length - pos)
        {
            error = "length exceeds the option data";
            return false;
        }
        taken = data.Slice(pos, (int)length);
        pos += (int)length;
        return true;
    }
}

/// <summary>The server's side of the handshake as byte layouts (doc/proto.md, "Fixed newstyle negotiation"):
/// greeting, the reply to NBD_OPT_EXPORT_NAME, option replies and their payloads.</summary>
public static class NbdOptionCodec
{
    public const int GreetingLength = 18;
    public const int ClientFlagsLength = 4;
    public const int ReplyHeaderLength = 20;
    /// <summary>The reply to NBD_OPT_EXPORT_NAME: size and transmission flags, then 124 zero bytes unless the
    /// client asked for none.</summary>
    public const int ExportNameReplyLength = 10, ExportNameReplyPaddedLength = 134;

    /// <summary>NBDMAGIC, IHAVEOPT, handshake flags: fixed newstyle and no zeroes.</summary>
    public static void WriteGreeting(Span<byte> b)
    {
        BinaryPrimitives.WriteUInt64BigEndian(b, NbdConst.NbdMagic);
        BinaryPrimitives.WriteUInt64BigEndian(b[8..], NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt16BigEndian(b[16..], NbdConst.FlagFixedNewstyle | NbdConst.FlagNoZeroes);
    }

    /// <summary>The client's 32-bit flags; false when it sets a flag this server did not offer.</summary>
    public static bool TryParseClientFlags(ReadOnlySpan<byte> b, out bool noZeroes)
    {
        uint flags = BinaryPrimitives.ReadUInt32BigEndian(b);
        noZeroes = (flags & NbdConst.ClientFlagNoZeroes) != 0;
        return (flags & ~(NbdConst.ClientFlagFixedNewstyle | NbdConst.ClientFlagNoZeroes)) == 0;
    }

    /// <summary>Writes the reply to NBD_OPT_EXPORT_NAME; returns its length.</summary>
    public static int WriteExportNameReply(Span<byte> b, ulong size, NbdTransmissionFlags flags, bool noZeroes)
    {
        int length = noZeroes ? ExportNameReplyLength : ExportNameReplyPaddedLength;
        BinaryPrimitives.WriteUInt64BigEndian(b, size);
        BinaryPrimitives.WriteUInt16BigEndian(b[8..], (ushort)flags);
        b[ExportNameReplyLength..length].Clear();
        return length;
    }

    /// <summary>Writes one option reply (header and payload); returns its length.</summary>
    public static int WriteReply(Span<byte> b, uint option, NbdReply type, ReadOnlySpan<byte> payload)
    {
        BinaryPrimitives.WriteUInt64BigEndian(b, NbdConst.OptReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(b[8..], option);
        BinaryPrimitives.WriteUInt32BigEndian(b[12..], (uint)type);
        BinaryPrimitives.WriteUInt32BigEndian(b[16..], (uint)payload.Length);
        payload.CopyTo(b[ReplyHeaderLength..]);
        return ReplyHeaderLength + payload.Length;
    }

    public static byte[] Reply(uint option, NbdReply type, ReadOnlySpan<byte> payload)
    {
        var b = new byte[ReplyHeaderLength + payload.Length];
        WriteReply(b, option, type, payload);
        return b;
    }

    /// <summary>NBD_REP_SERVER's payload for NBD_OPT_LIST: u32 name length, name, description (to the end).</summary>
    public static byte[] ServerEntry(ReadOnlySpan<byte> name, ReadOnlySpan<byte> description)
    {
        var b = new byte[4 + name.Length + description.Length];
        BinaryPrimitives.WriteUInt32BigEndian(b, (uint)name.Length);
        name.CopyTo(b.AsSpan(4));
        description.CopyTo(b.AsSpan(4 + name.Length));
        return b;
    }

    /// <summary>NBD_REP_INFO NBD_INFO_NAME or NBD_INFO_DESCRIPTION: the type, then the text to the end.</summary>
    public static byte[] InfoText(NbdInfo type, ReadOnlySpan<byte> text)
    {
        var b = new byte[2 + text.Length];
        BinaryPrimitives.WriteUInt16BigEndian(b, (ushort)type);
        text.CopyTo(b.AsSpan(2));
        return b;
    }

    /// <summary>NBD_REP_INFO NBD_INFO_BLOCK_SIZE: minimum, preferred and maximum block size.</summary>
    public static byte[] InfoBlockSize(uint minimum, uint preferred, uint maximum)
    {
        var b = new byte[14];
        BinaryPrimitives.WriteUInt16BigEndian(b, (ushort)NbdInfo.BlockSize);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(2), minimum);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(6), preferred);
        BinaryPrimitives.WriteUInt32BigEndian(b.AsSpan(10), maximum);
        return b;
    }

    /// <summary>NBD_REP_INFO NBD_INFO_EXPORT: size and transmission flags.</summary>
    public static byte[] InfoExport(ulong size, NbdTransmissionFlags flags)
    {
        var b = new byte[12];
        BinaryPrimitives.WriteUInt16BigEndian(b, (ushort)NbdInfo.Export);
        BinaryPrimitives.WriteUInt64BigEndian(b.AsSpan(2), size);
        BinaryPrimitives.WriteUInt16BigEndian(b.AsSpan(10), (ushort)flags);
        return b;
    }

    /// <summary>NBD_REP_META_CONTEXT: u32 context id, then the name to the end.</summary>
    public static byte[] MetaContext(uint id, ReadOnlySpan<byte> name)
    {
        var b = new byte[4 + name.Length];
        BinaryPrimitives.WriteUInt32BigEndian(b, id);
        name.CopyTo(b.AsSpan(4));
        return b;
    }
}
