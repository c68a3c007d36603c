using System.IO.Pipelines;
using System.Text;
using Strata.Formats.Nbd;

namespace Strata.Protocol.Nbd;

/// <summary>
/// The server's side of the fixed-newstyle handshake over a pipe pair: greeting, client flags, then option
/// haggling until the client picks an export (NBD_OPT_EXPORT_NAME or NBD_OPT_GO), aborts, or breaks the protocol.
/// Its result is the <see cref="NbdAgreement"/> the transmission phase runs on. Every refused option gets QEMU's
/// option reply (TLS is not offered: NBD_OPT_STARTTLS is unsupported like any unknown option).
/// </summary>
internal sealed class NbdNegotiation(INbdExportRegistry registry, PipeReader input, PipeWriter output)
{
    private bool _structured;
    private bool _noZeroes;
    /// <summary>The export the negotiated meta contexts were set for.</summary>
    private string? _contextExport;
    private IReadOnlyList<NbdMetaContext> _contexts = [];

    /// <returns>What was agreed, or null when the connection ends in the handshake (NBD_OPT_ABORT, an export
    /// NBD_OPT_EXPORT_NAME cannot find, unknown client flags, a bad option magic, an option too large to skip).</returns>
    public async Task<NbdAgreement?> RunAsync(CancellationToken ct)
    {
        WriteGreeting();
        await FlushAsync(ct);
        if (!NbdOptionCodec.TryParseClientFlags(await input.ReadExactAsync(NbdOptionCodec.ClientFlagsLength, ct), out _noZeroes)) return null;
        while (true)
        {
            if (!NbdOptionHeader.TryParse(await input.ReadExactAsync(NbdOptionHeader.Size, ct), out var header)) return null;
            uint option = header.Option;
            if (header.Length > NbdConst.MaxOptionLength)
            {
                // Oversize option data: refuse it, and drop a client that insists on sending megabytes.
                if (header.Length > 16 * NbdConst.MaxOptionLength) return null;
                await input.SkipAsync(header.Length, ct);
                await ErrorReplyAsync(option, NbdReply.ErrTooBig, "option too large", ct);
                continue;
            }
            var data = await input.ReadExactAsync((int)header.Length, ct);
            switch ((NbdOption)option)
            {
                case NbdOption.ExportName:
                {
                    var export = registry.Find(Encoding.UTF8.GetString(data));
                    if (export is null || export.ShuttingDown) return null; // no error reply exists for this option
                    var agreement = Agree(export);
                    WriteExportNameReply(export, agreement.Flags);
                    await FlushAsync(ct);
                    return agreement;
                }
                case NbdOption.Abort:
                    await ReplyAsync(option, NbdReply.Ack, [], ct);
                    return null;
                case NbdOption.List:
                    if (data.Length != 0)
                    {
                        await ErrorReplyAsync(option, NbdReply.ErrInvalid, "LIST takes no data", ct);
                        break;
                    }
                    foreach (var e in registry.All)
                        await ReplyAsync(option, NbdReply.Server, NbdOptionCodec.ServerEntry(Encoding.UTF8.GetBytes(e.Name), Encoding.UTF8.GetBytes(e.Description ?? "")), ct);
                    await ReplyAsync(option, NbdReply.Ack, [], ct);
                    break;
                case NbdOption.Info:
                case NbdOption.Go:
                    if (await InfoOrGoAsync(option, data, ct) is { } chosen && (NbdOption)option == NbdOption.Go)
                    {
                        if (_contextExport != chosen.Name) _contexts = []; // contexts apply to the export they were set for
                        return Agree(chosen);
                    }
                    break;
                case NbdOption.StructuredReply:
                    if (data.Length != 0) await ErrorReplyAsync(option, NbdReply.ErrInvalid, "STRUCTURED_REPLY takes no data", ct);
                    else if (_structured) await ErrorReplyAsync(option, NbdReply.ErrInvalid, "structured reply already negotiated", ct);
                    else
                    {
                        _structured = true;
                        await ReplyAsync(option, NbdReply.Ack, [], ct);
                    }
                    break;
                case NbdOption.ListMetaContext:
                case NbdOption.SetMetaContext:
                    await MetaContextAsync(option, data, ct);
                    break;
                default:
                    await ErrorReplyAsync(option, NbdReply.ErrUnsup, $"Unsupported option {option}", ct);
                    break;
            }
        }
    }

    private NbdAgreement Agree(NbdExport export) =>
        new(export, TransmissionFlags(export), _structured, _contexts, NbdBlockSizes.Server);

    private NbdTransmissionFlags TransmissionFlags(NbdExport e)
    {
        var f = NbdTransmissionFlags.HasFlags | NbdTransmissionFlags.SendFlush | NbdTransmissionFlags.SendFua | NbdTransmissionFlags.SendCache;
        if (e.Writable) f |= NbdTransmissionFlags.SendTrim | NbdTransmissionFlags.SendWriteZeroes | NbdTransmissionFlags.SendFastZero;
        else f |= NbdTransmissionFlags.ReadOnly;
        if (_structured) f |= NbdTransmissionFlags.SendDf;
        if (registry.MultiConn) f |= NbdTransmissionFlags.CanMultiConn;
        return f;
    }

    /// <summary>Answers NBD_OPT_INFO or NBD_OPT_GO; returns the export when it was found and described.</summary>
    private async Task<NbdExport?> InfoOrGoAsync(uint option, byte[] data, CancellationToken ct)
    {
        if (!NbdExportQuery.TryParse(data, out var query, out string error))
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, error, ct);
            return null;
        }
        var export = registry.Find(query.Name);
        if (export is null || export.ShuttingDown)
        {
            await ErrorReplyAsync(option, NbdReply.ErrUnknown, $"Export '{query.Name}' not present", ct);
            return null;
        }
        await ReplyAsync(option, NbdReply.Info, NbdOptionCodec.InfoText(NbdInfo.Name, Encoding.UTF8.GetBytes(export.Name)), ct);
        if (export.Description is { } description)
            await ReplyAsync(option, NbdReply.Info, NbdOptionCodec.InfoText(NbdInfo.Description, Encoding.UTF8.GetBytes(description)), ct);
        var sizes = NbdBlockSizes.Server;
        await ReplyAsync(option, NbdReply.Info, NbdOptionCodec.InfoBlockSize(sizes.Minimum, sizes.Preferred, sizes.Maximum), ct);
        await ReplyAsync(option, NbdReply.Info, NbdOptionCodec.InfoExport((ulong)export.Image.Size, TransmissionFlags(export)), ct);
        await ReplyAsync(option, NbdReply.Ack, [], ct);
        return export;
    }

    /// <summary>NBD_OPT_LIST_META_CONTEXT lists what a query matches (ids 0, the namespace wildcards allowed);
    /// NBD_OPT_SET_META_CONTEXT, once structured replies are on, replaces the negotiated contexts with exact
    /// matches.</summary>
    private async Task MetaContextAsync(uint option, byte[] data, CancellationToken ct)
    {
        bool listing = (NbdOption)option == NbdOption.ListMetaContext;
        if (!listing && !_structured)
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, "request option before structured reply", ct);
            return;
        }
        if (!NbdMetaContextQuery.TryParse(data, out var query, out string error))
        {
            await ErrorReplyAsync(option, NbdReply.ErrInvalid, $"malformed meta context request: {error}", ct);
            return;
        }
        var export = registry.Find(query!.ExportName);
        if (export is null)
        {
            await ErrorReplyAsync(option, NbdReply.ErrUnknown, $"Export '{query.ExportName}' not present", ct);
            return;
        }
        var selected = new List<NbdMetaContext>();
        if (query.Queries.Count == 0 && listing) selected.AddRange(export.Contexts());
        foreach (var q in query.Queries)
            foreach (var c in export.Match(q, listing))
                if (!selected.Contains(c)) selected.Add(c);
        selected.Sort((a, b) => a.Id.CompareTo(b.Id));
        foreach (var (id, name) in selected)
            await ReplyAsync(option, NbdReply.MetaContext, NbdOptionCodec.MetaContext(listing ? 0 : id, Encoding.UTF8.GetBytes(name)), ct);
        await ReplyAsync(option, NbdReply.Ack, [], ct);
        if (!listing)
        {
            _contexts = selected.ToArray();
            _contextExport = export.Name;
        }
    }

    // Replies go out one at a time, each flushed: the client answers before the next option.

    private void WriteGreeting()
    {
        NbdOptionCodec.WriteGreeting(output.GetSpan(NbdOptionCodec.GreetingLength));
        output.Advance(NbdOptionCodec.GreetingLength);
    }

    private void WriteExportNameReply(NbdExport export, NbdTransmissionFlags flags)
    {
        int n = NbdOptionCodec.WriteExportNameReply(output.GetSpan(NbdOptionCodec.ExportNameReplyPaddedLength), (ulong)export.Image.Size, flags, _noZeroes);
        output.Advance(n);
    }

    private ValueTask ErrorReplyAsync(uint option, NbdReply error, string message, CancellationToken ct) =>
        ReplyAsync(option, error, Encoding.UTF8.GetBytes(message), ct);

    private ValueTask ReplyAsync(uint option, NbdReply type, ReadOnlySpan<byte> payload, CancellationToken ct)
    {
        int n = NbdOptionCodec.WriteReply(output.GetSpan(NbdOptionCodec.ReplyHeaderLength + payload.Length), option, type, payload);
        output.Advance(n);
        return FlushAsync(ct);
    }

    private async ValueTask FlushAsync(CancellationToken ct)
    {
        var flush = await output.FlushAsync(ct);
        if (flush.IsCompleted) throw new IOException("client went away");
    }
}
