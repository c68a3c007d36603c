using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Nbd;

/// <summary>One block status extent as sent in an NBD_REPLY_TYPE_BLOCK_STATUS chunk.</summary>
public readonly record struct NbdExtent(uint Length, uint Flags);

/// <summary>Transmission replies as byte layouts (doc/proto.md, "Transmission phase"): the simple reply, and the
/// structured reply's chunks. Each writer fills a span the caller sized with the matching length; the payload of
/// a read follows its header and is not copied here.</summary>
public static class NbdReplyCodec
{
    public const int SimpleReplyLength = 16;
    public const int StructuredHeaderLength = 20;
    /// <summary>NBD_REPLY_TYPE_OFFSET_DATA without its data: header and offset.</summary>
    public const int OffsetDataHeaderLength = StructuredHeaderLength + 8;
    public const int OffsetHoleLength = StructuredHeaderLength + 12;

    public static int BlockStatusLength(int extents) => StructuredHeaderLength + 4 + 8 * extents;

    /// <summary>An error chunk's length for a message of at most <paramref name="messageChars"/> characters.</summary>
    public static int MaxErrorLength(int messageChars) => StructuredHeaderLength + 6 + Encoding.UTF8.GetMaxByteCount(messageChars);

    /// <summary>The simple reply (its header: a read's data follows).</summary>
    public static void WriteSimpleReply(Span<byte> b, uint error, ulong cookie)
    {
        BinaryPrimitives.WriteUInt32BigEndian(b, NbdConst.SimpleReplyMagic);
        BinaryPrimitives.WriteUInt32BigEndian(b[4..], error);
        BinaryPrimitives.WriteUInt64BigEndian(b[8..], cookie);
    }

    /// <summary>A structured reply chunk's header; <paramref name="done"/> sets NBD_REPLY_FLAG_DONE.</summary>
    public static void WriteStructuredHeader(Span<byte> b, bool done, NbdReplyType type, ulong cookie, uint length)
    {
        BinaryPrimitives.WriteUInt32BigEndian(b, NbdConst.StructuredReplyMagic);
        BinaryPrimitives.WriteUInt16BigEndian(b[4..], done ? (ushort)1 : (ushort)0);
        BinaryPrimitives.WriteUInt16BigEndian(b[6..], (ushort)type);
        BinaryPrimitives.WriteUInt64BigEndian(b[8..], cookie);
        BinaryPrimitives.WriteUInt32BigEndian(b[16..], length);
    }

    /// <summary>NBD_REPLY_TYPE_NONE with NBD_REPLY_FLAG_DONE: the whole answer to a request that returns no data.</summary>
    public static void WriteDone(Span<byte> b, ulong cookie) => WriteStructuredHeader(b, true, NbdReplyType.None, cookie, 0);

    /// <summary>NBD_REPLY_TYPE_OFFSET_DATA up to its data: <paramref name="dataLength"/> bytes of data follow.</summary>
    public static void WriteOffsetDataHeader(Span<byte> b, bool done, ulong cookie, ulong offset, int dataLength)
    {
        WriteStructuredHeader(b, done, NbdReplyType.OffsetData, cookie, (uint)(8 + dataLength));
        BinaryPrimitives.WriteUInt64BigEndian(b[StructuredHeaderLength..], offset);
    }

    /// <summary>NBD_REPLY_TYPE_OFFSET_HOLE: <paramref name="length"/> bytes at <paramref name="offset"/> read as zeroes.</summary>
    public static void WriteOffsetHole(Span<byte> b, bool done, ulong cookie, ulong offset, uint length)
    {
        WriteStructuredHeader(b, done, NbdReplyType.OffsetHole, cookie, 12);
        BinaryPrimitives.WriteUInt64BigEndian(b[StructuredHeaderLength..], offset);
        BinaryPrimitives.WriteUInt32BigEndian(b[(StructuredHeaderLength + 8)..], length);
    }

    /// <summary>NBD_REPLY_TYPE_BLOCK_STATUS: the context id, then each extent's length and flags;
    /// <see cref="BlockStatusLength"/> bytes.</summary>
    public static void WriteBlockStatus(Span<byte> b, bool done, ulong cookie, uint contextId, ReadOnlySpan<NbdExtent> extents)
    {
        WriteStructuredHeader(b, done, NbdReplyType.BlockStatus, cookie, (uint)(4 + 8 * extents.Length));
        BinaryPrimitives.WriteUInt32BigEndian(b[StructuredHeaderLength..], contextId);
        var e = b[(StructuredHeaderLength + 4)..];
        for (int k = 0; k < extents.Length; k++)
        {
            BinaryPrimitives.WriteUInt32BigEndian(e[(8 * k)..], extents[k].Length);
            BinaryPrimitives.WriteUInt32BigEndian(e[(8 * k + 4)..], extents[k].Flags);
        }
    }

    /// <summary>NBD_REPLY_TYPE_ERROR with NBD_REPLY_FLAG_DONE: errno, u16 message length, UTF-8 message (the caller
    /// keeps it under 64 KiB). Returns the chunk's length; the span holds <see cref="MaxErrorLength"/> bytes.</summary>
    public static int WriteError(Span<byte> b, ulong cookie, uint errno, ReadOnlySpan<char> message)
    {
        int n = Encoding.UTF8.GetBytes(message, b[(StructuredHeaderLength + 6)..]);
        WriteStructuredHeader(b, true, NbdReplyType.Error, cookie, (uint)(6 + n));
        BinaryPrimitives.WriteUInt32BigEndian(b[StructuredHeaderLength..], errno);
        BinaryPrimitives.WriteUInt16BigEndian(b[(StructuredHeaderLength + 4)..], (ushort)n);
        return StructuredHeaderLength + 6 + n;
    }
}
