using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>The block size constraints the server advertises (NBD_INFO_BLOCK_SIZE) and enforces.</summary>
internal readonly record struct NbdBlockSizes(uint Minimum, uint Preferred, uint Maximum)
{
    /// <summary>Any alignment works, 4 KiB is best, and no request moves more than 32 MiB of data (QEMU's
    /// NBD_MAX_BUFFER_SIZE).</summary>
    public static readonly NbdBlockSizes Server = new(1, 4096, NbdConst.MaxPayload);
}

/// <summary>What a client and the server agreed in the handshake, fixed for the whole transmission phase: the
/// export, its transmission flags, whether replies are structured, the meta contexts block status reports (with
/// the ids sent to the client, in id order), and the block sizes.</summary>
internal sealed record NbdAgreement(
    NbdExport Export,
    NbdTransmissionFlags Flags,
    bool StructuredReplies,
    IReadOnlyList<NbdMetaContext> MetaContexts,
    NbdBlockSizes BlockSizes);
