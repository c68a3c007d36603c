using System.Buffers;
using Strata.Block;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;

namespace Strata.Backup;

/// <summary>
/// Copies a frozen export into a backup image over NBD: everything allocated (full), or exactly the ranges a
/// dirty-bitmap context marks (incremental), with many reads in flight — over several connections when the server
/// allows it (multi-conn), as nbdcopy does. Ranges the export reads as zeros are written as zeros in an incremental
/// (they hide older data) and skipped in a full (the file starts zeroed).
/// </summary>
public sealed class PullCopier(string nbdAddress, string exportName, string? dirtyContext)
{
    private const string Allocation = "base:allocation";
    private const uint AllocationZero = 2, DirtyFlag = 1;
    public int Chunk { get; init; } = 2 << 20;
    /// <summary>Reads in flight, over all connections together.</summary>
    public int InFlight { get; init; } = 16;
    /// <summary>Connections at most; more than one only when the server advertises multi-conn.</summary>
    public int Connections { get; init; } = 4;

    private readonly record struct Piece(long Offset, int Length, bool Zero);

    /// <summary>Returns the number of data bytes copied.</summary>
    public async Task<long> CopyAsync(BlockImage target, Action<long, long> progress)
    {
        var contexts = dirtyContext is null ? new[] { Allocation } : [Allocation, dirtyContext];
        var clients = new List<NbdClient>();
        try
        {
            var client = await ConnectAsync(contexts);
            clients.Add(client);
            if (client.Size != target.Size) throw new BackupException($"the export is {client.Size} bytes but the disk is {target.Size}");
            if (dirtyContext is not null && !client.Contexts.ContainsKey(dirtyContext))
                throw new BackupException($"the export does not offer {dirtyContext}", "the source must export the bitmap (block-export-add bitmaps)", BackupExitCodes.Source);
            var ranges = dirtyContext is null ? [(0L, client.Size)] : await client.ExtentsWithFlagAsync(dirtyContext, DirtyFlag);
            // The frozen export's zero ranges, read once: asking per dirty range would cost a round trip each, and an
            // incremental of a large disk has thousands of them.
            var zeros = await client.ExtentsWithFlagAsync(Allocation, AllocationZero);
            var pieces = Plan(ranges, zeros);
            long total = ranges.Sum(r => r.Item2);
            progress(0, total);
            // The other connections only read: the first one's block status already answered what they need.
            if ((client.Flags & NbdTransmissionFlags.CanMultiConn) != 0)
                await AddConnectionsAsync(clients, Math.Min(Connections, InFlight) - 1);
            long copied = await CopyPiecesAsync(clients, pieces, target, total, progress);
            progress(total, total);
            return copied;
        }
        finally
        {
            foreach (var c in clients) await c.DisposeAsync();
        }
    }

    /// <summary>The ranges cut at the zero extents and into chunks: data to read, or zeros to write.</summary>
    private List<Piece> Plan(List<(long Offset, long Length)> ranges, List<(long Offset, long Length)> zeros)
    {
        var pieces = new List<Piece>();
        int z = 0;
        foreach (var (start, length) in ranges)
        {
            for (long pos = start, end = start + length; pos < end;)
            {
                while (z < zeros.Count && zeros[z].Offset + zeros[z].Length <= pos) z++;
                bool zero = z < zeros.Count && zeros[z].Offset <= pos;
                long extentEnd = Math.Min(end, zero ? zeros[z].Offset + zeros[z].Length : z < zeros.Count ? zeros[z].Offset : end);
                for (long p = pos; p < extentEnd; p += Chunk)
                    pieces.Add(new Piece(p, (int)Math.Min(Chunk, extentEnd - p), zero));
                pos = extentEnd;
            }
        }
        return pieces;
    }

    /// <summary>Workers take the pieces in order, each on a connection of its own share; every worker has finished
    /// (none still writes into the target) when this returns or throws.</summary>
    private async Task<long> CopyPiecesAsync(List<NbdClient> clients, List<Piece> pieces, BlockImage target, long total, Action<long, long> progress)
    {
        long done = 0, copied = 0;
        int next = -1;
        using var failed = new CancellationTokenSource();
        var workers = new Task[Math.Max(1, InFlight)];
        for (int w = 0; w < workers.Length; w++)
        {
            var client = clients[w % clients.Count];
            workers[w] = Task.Run(async () =>
            {
                byte[]? buffer = null;
                try
                {
                    int index;
                    while (!failed.IsCancellationRequested && (index = Interlocked.Increment(ref next)) < pieces.Count)
                    {
                        var piece = pieces[index];
                        if (piece.Zero)
                        {
                            if (dirtyContext is not null) target.WriteZeroes(piece.Offset, piece.Length, mayUnmap: false);
                            progress(Interlocked.Add(ref done, piece.Length), total);
                            continue;
                        }
                        buffer ??= ArrayPool<byte>.Shared.Rent(Chunk);
                        await client.ReadAsync(piece.Offset, buffer.AsMemory(0, piece.Length));
                        target.Write(piece.Offset, buffer.AsSpan(0, piece.Length));
                        Interlocked.Add(ref copied, piece.Length);
                        progress(Interlocked.Add(ref done, piece.Length), total);
                    }
                }
                catch
                {
                    failed.Cancel();
                    throw;
                }
                finally
                {
                    if (buffer is not null) ArrayPool<byte>.Shared.Return(buffer);
                }
            });
        }
        await Task.WhenAll(workers); // a worker that saw another fail stops without an error of its own
        return copied;
    }

    /// <summary>Up to <paramref name="count"/> more connections; a server that takes fewer (its max-connections) is
    /// read over those it took.</summary>
    private async Task AddConnectionsAsync(List<NbdClient> clients, int count)
    {
        for (int i = 0; i < count; i++)
        {
            try
            {
                clients.Add(await ConnectAsync([]));
            }
            catch (BackupException)
            {
                return;
            }
        }
    }

    private Task<NbdClient> ConnectAsync(string[] contexts) => ConnectExportAsync(nbdAddress, exportName, contexts);

    /// <summary>Connects to an export of a run's NBD server (a unix socket path or HOST:PORT), asking for
    /// <paramref name="contexts"/>; an unreachable server is the source's failure (exit code 4).</summary>
    public static async Task<NbdClient> ConnectExportAsync(string nbdAddress, string exportName, string[] contexts)
    {
        try
        {
            int colon = nbdAddress.LastIndexOf(':');
            return !nbdAddress.Contains('/') && colon > 0 && int.TryParse(nbdAddress[(colon + 1)..], out int port)
                ? await NbdClient.ConnectTcpAsync(nbdAddress[..colon], port, exportName, contexts)
                : await NbdClient.ConnectUnixAsync(nbdAddress, exportName, contexts);
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException)
        {
            throw new BackupException($"cannot read export '{exportName}' at '{nbdAddress}': {e.Message}", "is the NBD server address right (--nbd)?", BackupExitCodes.Source);
        }
    }
}
