using System.IO.Pipelines;
using Strata.Block;

namespace Strata.Protocol.Nbd;

/// <summary>
/// One NBD connection over a pipe pair (it never touches a socket): the handshake (<see cref="NbdNegotiation"/>)
/// agrees on an export and how to talk, then the transmission phase (<see cref="NbdTransmission"/>) serves it.
/// Protocol violations close this connection; every request gets a reply, failed ones the protocol's errno.
/// </summary>
public sealed class NbdServerSession
{
    private readonly INbdExportRegistry _registry;
    private readonly PipeReader _input;
    private readonly PipeWriter _output;
    private readonly BlockIoThreads _ioThreads;
    private readonly IGatheredWriter? _gathered;

    /// <param name="ioThreads">Where the image calls run (default: <see cref="BlockIoThreads.Shared"/>).</param>
    /// <param name="gathered">The connection's gathered writer, when it is a socket: replies of the transmission
    /// phase go out through it (read data without a copy into the output pipe).</param>
    /// <summary>How long the option haggling may take before the connection is dropped (see
    /// <see cref="NbdServer.HandshakeLimit"/>); zero or less: no limit.</summary>
    public TimeSpan HandshakeLimit { get; init; }

    public NbdServerSession(INbdExportRegistry registry, PipeReader input, PipeWriter output, BlockIoThreads? ioThreads = null, IGatheredWriter? gathered = null)
    {
        _gathered = gathered;
        _registry = registry;
        _input = input;
        _output = output;
        _ioThreads = ioThreads ?? BlockIoThreads.Shared;
    }

    public async Task RunAsync(CancellationToken ct)
    {
        try
        {
            NbdAgreement? agreement;
            using (var handshake = CancellationTokenSource.CreateLinkedTokenSource(ct))
            {
                if (HandshakeLimit > TimeSpan.Zero) handshake.CancelAfter(HandshakeLimit);
                agreement = await new NbdNegotiation(_registry, _input, _output).RunAsync(handshake.Token);
            }
            if (agreement is null) return;
            var export = agreement.Export;
            Interlocked.Increment(ref export.Connections);
            // A hard deletion of this export ends this connection (and no other).
            using var connection = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var registered = export.RegisterConnection(() => { try { connection.Cancel(); } catch (ObjectDisposedException) { } });
            var transmission = new NbdTransmission(agreement, _input, _output, _ioThreads, _gathered);
            try
            {
                await transmission.RunAsync(connection.Token);
            }
            finally
            {
                Interlocked.Decrement(ref export.Connections);
                if (transmission.ClientLeft) Interlocked.Decrement(ref export.LeavingConnections);
            }
        }
        catch (Exception e) when (e is IOException or OperationCanceledException or InvalidOperationException or EndOfStreamException)
        {
        }
        finally
        {
            await _input.CompleteAsync();
            await _output.CompleteAsync();
        }
    }
}
