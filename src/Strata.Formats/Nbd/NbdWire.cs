using System.Buffers.Binary;

namespace Strata.Formats.Nbd;

/// <summary>NBD protocol constants (doc/proto.md), frozen wire values.</summary>
public static class NbdConst
{
    public const ulong NbdMagic = 0x4e42444d41474943;
    public const ulong IHaveOpt = 0x49484156454F5054;
    public const ulong OptReplyMagic = 0x0003e889045565a9;
    public const uint RequestMagic = 0x25609513;
    public const uint SimpleReplyMagic = 0x67446698;
    public const uint StructuredReplyMagic = 0x668e33ef;

    public const ushort FlagFixedNewstyle = 1, FlagNoZeroes = 2;
    public const uint ClientFlagFixedNewstyle = 1, ClientFlagNoZeroes = 2;

    public const int RequestHeaderLength = 28;
    public const int MaxPayload = 32 << 20;
    public const int MaxOptionLength = 1 << 20;
}

public enum NbdOption : uint
{
    ExportName = 1, Abort = 2, List = 3, StartTls = 5, Info = 6, Go = 7, StructuredReply = 8,
    ListMetaContext = 9, SetMetaContext = 10, ExtendedHeaders = 11,
}

public enum NbdReply : uint
{
    Ack = 1, Server = 2, Info = 3, MetaContext = 4,
    ErrUnsup = 0x80000001, ErrPolicy = 0x80000002, ErrInvalid = 0x80000003, ErrPlatform = 0x80000004,
    ErrTlsReqd = 0x80000005, ErrUnknown = 0x80000006, ErrShutdown = 0x80000007, ErrBlockSizeReqd = 0x80000008, ErrTooBig = 0x80000009,
}

public enum NbdInfo : ushort { Export = 0, Name = 1, Description = 2, BlockSize = 3 }

[Flags]
public enum NbdTransmissionFlags : ushort
{
    HasFlags = 1 << 0, ReadOnly = 1 << 1, SendFlush = 1 << 2, SendFua = 1 << 3, Rotational = 1 << 4,
    SendTrim = 1 << 5, SendWriteZeroes = 1 << 6, SendDf = 1 << 7, CanMultiConn = 1 << 8, SendResize = 1 << 9,
    SendCache = 1 << 10, SendFastZero = 1 << 11,
}

public enum NbdCommand : ushort { Read = 0, Write = 1, Disc = 2, Flush = 3, Trim = 4, Cache = 5, WriteZeroes = 6, BlockStatus = 7 }

[Flags]
public enum NbdCommandFlags : ushort { None = 0, Fua = 1, NoHole = 2, Df = 4, ReqOne = 8, FastZero = 16 }

public enum NbdReplyType : ushort { None = 0, OffsetData = 1, OffsetHole = 2, BlockStatus = 5, Error = 0x8001, ErrorOffset = 0x8002 }

/// <summary>NBD errno values (the protocol's own numbering).</summary>
public static class NbdErrno
{
    public const uint EPERM = 1, EIO = 5, ENOMEM = 12, EINVAL = 22, ENOSPC = 28, EOVERFLOW = 75, ENOTSUP = 95, ESHUTDOWN = 108;

    /// <summary>The errno a client sees for a Linux errno, as QEMU's server maps it (anything unknown is EINVAL).</summary>
    public static uint FromSystem(int errno) => errno switch
    {
        1 or 30 => EPERM,            // EPERM, EROFS
        5 => EIO,
        12 => ENOMEM,
        27 or 28 or 122 => ENOSPC,   // EFBIG, ENOSPC, EDQUOT
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EINVAL,
    };
}

/// <summary>The 28-byte request header.</summary>
public readonly record struct NbdRequest(NbdCommandFlags Flags, NbdCommand Command, ulong Cookie, ulong Offset, uint Length)
{
    public static bool TryParse(ReadOnlySpan<byte> h, out NbdRequest request)
    {
        request = default;
        if (h.Length < NbdConst.RequestHeaderLength || BinaryPrimitives.ReadUInt32BigEndian(h) != NbdConst.RequestMagic) return false;
        request = new NbdRequest(
            (NbdCommandFlags)BinaryPrimitives.ReadUInt16BigEndian(h[4..]),
            (NbdCommand)BinaryPrimitives.ReadUInt16BigEndian(h[6..]),
            BinaryPrimitives.ReadUInt64BigEndian(h[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(h[16..]),
            BinaryPrimitives.ReadUInt32BigEndian(h[24..]));
        return true;
    }

    public void Write(Span<byte> h)
    {
        BinaryPrimitives.WriteUInt32BigEndian(h, NbdConst.RequestMagic);
        BinaryPrimitives.WriteUInt16BigEndian(h[4..], (ushort)Flags);
        BinaryPrimitives.WriteUInt16BigEndian(h[6..], (ushort)Command);
        BinaryPrimitives.WriteUInt64BigEndian(h[8..], Cookie);
        BinaryPrimitives.WriteUInt64BigEndian(h[16..], Offset);
        BinaryPrimitives.WriteUInt32BigEndian(h[24..], Length);
    }
}
