using System.Buffers;
using Strata.Block;
using Strata.Protocol.Nbd;

namespace Strata.Backup;

/// <summary>
/// Copies a frozen export into a backup image over NBD: everything allocated (full), or exactly the ranges a
/// dirty-bitmap context marks (incremental), with several reads in flight. Ranges the export reads as zeros
/// are written as zeros in an incremental (they hide older data) and skipped in a full (the file starts zeroed).
/// </summary>
public sealed class PullCopier(string nbdAddress, string exportName, string? dirtyContext)
{
    private const string Allocation = "base:allocation";
    private const uint AllocationZero = 2, DirtyFlag = 1;
    public int Chunk { get; init; } = 2 << 20;
    public int InFlight { get; init; } = 8;

    /// <summary>Returns the number of data bytes copied.</summary>
    public async Task<long> CopyAsync(BlockImage target, Action<long, long> progress)
    {
        var contexts = dirtyContext is null ? new[] { Allocation } : [Allocation, dirtyContext];
        await using var client = await ConnectAsync(contexts);
        if (client.Size != target.Size) throw new BackupException($"the export is {client.Size} bytes but the disk is {target.Size}");
        if (dirtyContext is not null && !client.Contexts.ContainsKey(dirtyContext))
            throw new BackupException($"the export does not offer {dirtyContext}", "the source must export the bitmap (block-export-add bitmaps)", BackupExitCodes.Source);
        var ranges = dirtyContext is null ? [(0L, client.Size)] : await client.ExtentsWithFlagAsync(dirtyContext, DirtyFlag);
        long total = ranges.Sum(r => r.Item2), done = 0, copied = 0;
        progress(0, total);
        using var slots = new SemaphoreSlim(InFlight);
        var running = new List<Task>();
        try
        {
            await QueueAsync();
            await Task.WhenAll(running);
        }
        catch
        {
            // No read may still be writing into the target once the caller disposes it.
            try { await Task.WhenAll(running); } catch (Exception) { }
            throw;
        }
        progress(total, total);
        return copied;

        async Task QueueAsync()
        {
            // The frozen export's zero ranges, read once: asking per dirty range would cost a round trip each, and an
            // incremental of a large disk has thousands of them.
            var zeros = await client.ExtentsWithFlagAsync(Allocation, AllocationZero);
            int z = 0;
            foreach (var (start, length) in ranges)
            {
                for (long pos = start, end = start + length; pos < end;)
                {
                    while (z < zeros.Count && zeros[z].Offset + zeros[z].Length <= pos) z++;
                    bool zero = z < zeros.Count && zeros[z].Offset <= pos;
                    long extentEnd = Math.Min(end, zero ? zeros[z].Offset + zeros[z].Length : z < zeros.Count ? zeros[z].Offset : end);
                    if (zero)
                    {
                        if (dirtyContext is not null) target.WriteZeroes(pos, extentEnd - pos, mayUnmap: false);
                        Interlocked.Add(ref done, extentEnd - pos);
                    }
                    else
                    {
                        for (long p = pos; p < extentEnd; p += Chunk)
                        {
                            long at = p;
                            int n = (int)Math.Min(Chunk, extentEnd - p);
                            await slots.WaitAsync();
                            running.RemoveAll(t => t.IsCompleted && t.Status == TaskStatus.RanToCompletion);
                            if (running.FirstOrDefault(t => t.IsFaulted) is { } failed) await failed;
                            running.Add(Task.Run(async () =>
                            {
                                var buffer = ArrayPool<byte>.Shared.Rent(n);
                                try
                                {
                                    await client.ReadAsync(at, buffer.AsMemory(0, n));
                                    target.Write(at, buffer.AsSpan(0, n));
                                }
                                finally
                                {
                                    ArrayPool<byte>.Shared.Return(buffer);
                                    slots.Release();
                                }
                                Interlocked.Add(ref copied, n);
                                progress(Interlocked.Add(ref done, n), total);
                            }));
                        }
                    }
                    pos = extentEnd;
                }
            }
        }
    }

    private async Task<NbdClient> ConnectAsync(string[] contexts)
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
