using System.Buffers;

namespace Strata.Block.Operations;

/// <summary>How <see cref="ImageConverter"/> copies.</summary>
public sealed record ConvertOptions
{
    /// <summary>Write every data cluster compressed (qcow2 targets).</summary>
    public bool Compress { get; init; }

    /// <summary>The target has a backing file equal to the source's: copy only what the source's top layer holds.</summary>
    public bool TargetHasBacking { get; init; }

    /// <summary>The target is freshly created and reads as zeros, so zero ranges need no write.</summary>
    public bool TargetIsZeroed { get; init; } = true;

    /// <summary>Parallel copy workers.</summary>
    public int Workers { get; init; } = Math.Max(2, Environment.ProcessorCount);

    /// <summary>Largest single read/write.</summary>
    public int ChunkSize { get; init; } = 2 << 20;

    /// <summary>Called with (bytes done, bytes total) as the copy proceeds.</summary>
    public Action<long, long>? Progress { get; init; }
}

/// <summary>
/// Copies one or more source images (concatenated) into a target, in parallel: block status decides what
/// is read at all, and chunks that read as zeros are not written to a zeroed target.
/// </summary>
public static class ImageConverter
{
    private enum WorkKind { Copy, Zero }

    private readonly record struct WorkItem(BlockImage Source, long SourceOffset, long TargetOffset, long Length, WorkKind Kind);

    public static void Convert(IReadOnlyList<BlockImage> sources, BlockImage target, ConvertOptions options)
    {
        long total = sources.Sum(s => s.Size);
        if (target.Size < total)
            throw new BlockException($"Target is smaller ({target.Size} bytes) than the source ({total} bytes)");
        int granularity = Math.Max(target.CopyGranularity, 512);
        int chunk = options.Compress ? target.ClusterSize : Math.Max(options.ChunkSize / granularity * granularity, granularity);
        long done = 0;
        var items = Plan(sources, options, chunk);
        Exception? failure = null;
        using var cts = new CancellationTokenSource();
        int workers = Math.Max(1, options.Workers);
        var queue = new System.Collections.Concurrent.BlockingCollection<WorkItem>(workers * 4);
        var threads = new Thread[workers];
        for (int w = 0; w < workers; w++)
        {
            threads[w] = new Thread(() =>
            {
                var buffer = ArrayPool<byte>.Shared.Rent(chunk);
                try
                {
                    foreach (var item in queue.GetConsumingEnumerable(cts.Token))
                    {
                        CopyOne(item, target, options, buffer, granularity);
                        long now = Interlocked.Add(ref done, item.Length);
                        options.Progress?.Invoke(now, total);
                    }
                }
                catch (OperationCanceledException)
                {
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref failure, e, null);
                    cts.Cancel();
                }
                finally
                {
                    ArrayPool<byte>.Shared.Return(buffer);
                }
            }) { IsBackground = true, Name = $"convert-{w}" };
            threads[w].Start();
        }
        try
        {
            foreach (var item in items)
            {
                if (cts.IsCancellationRequested) break;
                if (item.Kind == WorkKind.Zero && options.TargetIsZeroed && !options.TargetHasBacking)
                {
                    long now = Interlocked.Add(ref done, item.Length);
                    options.Progress?.Invoke(now, total);
                    continue;
                }
                try
                {
                    queue.Add(item, cts.Token);
                }
                catch (OperationCanceledException)
                {
                    break;
                }
            }
        }
        catch (Exception e)
        {
            Interlocked.CompareExchange(ref failure, e, null);
        }
        queue.CompleteAdding();
        foreach (var t in threads) t.Join();
        if (failure is not null)
        {
            if (failure is BlockException) throw failure;
            throw new BlockException($"error while converting: {failure.Message}");
        }
        target.Flush();
        options.Progress?.Invoke(total, total);
    }

    private static IEnumerable<WorkItem> Plan(IReadOnlyList<BlockImage> sources, ConvertOptions options, int chunk)
    {
        long targetOffset = 0;
        foreach (var source in sources)
        {
            long offset = 0;
            while (offset < source.Size)
            {
                long length;
                WorkKind kind;
                if (options.TargetHasBacking)
                {
                    // Only what the top layer itself holds differs from the shared backing file.
                    var ext = source.GetLayerStatus(offset, source.Size - offset);
                    length = ext.Length;
                    if (ext.State == LayerState.Unallocated)
                    {
                        offset += length;
                        targetOffset += length;
                        continue;
                    }
                    kind = ext.State == LayerState.Zero ? WorkKind.Zero : WorkKind.Copy;
                }
                else
                {
                    // Windows on the chunk grid (so compressed writes stay cluster aligned); a window that is
                    // zero throughout is not read at all.
                    length = Math.Min(chunk - (offset % chunk), source.Size - offset);
                    var ext = ChainStatus.Get(source, offset, length);
                    kind = ext.Zero && ext.Length >= length ? WorkKind.Zero : WorkKind.Copy;
                }
                if (length <= 0) throw new BlockException("block status returned an empty extent");
                for (long pos = 0; pos < length; pos += chunk)
                {
                    long n = Math.Min(chunk, length - pos);
                    yield return new WorkItem(source, offset + pos, targetOffset + pos, n, kind);
                }
                offset += length;
                targetOffset += length;
            }
        }
    }

    private static void CopyOne(WorkItem item, BlockImage target, ConvertOptions options, byte[] buffer, int granularity)
    {
        if (item.Kind == WorkKind.Zero)
        {
            target.WriteZeroes(item.TargetOffset, item.Length, mayUnmap: true);
            return;
        }
        var span = buffer.AsSpan(0, (int)item.Length);
        item.Source.Read(item.SourceOffset, span);
        if (options.Compress)
        {
            if (options.TargetIsZeroed && span.IndexOfAnyExcept((byte)0) < 0) return;
            if (item.TargetOffset % target.ClusterSize == 0)
            {
                target.WriteCompressed(item.TargetOffset, span);
                return;
            }
        }
        if (!options.TargetIsZeroed && !options.TargetHasBacking)
        {
            target.Write(item.TargetOffset, span);
            return;
        }
        // Write only the pieces that are not all zeros (qemu-img's default sparse detection); a target with a
        // backing file gets explicit zeros instead, since it would otherwise show the backing data.
        int pos = 0;
        while (pos < span.Length)
        {
            int piece = (int)Math.Min(granularity - ((item.TargetOffset + pos) % granularity), span.Length - pos);
            bool zero = span.Slice(pos, piece).IndexOfAnyExcept((byte)0) < 0;
            int runEnd = pos + piece;
            while (runEnd < span.Length)
            {
                int next = Math.Min(granularity, span.Length - runEnd);
                bool z = span.Slice(runEnd, next).IndexOfAnyExcept((byte)0) < 0;
                if (z != zero) break;
                runEnd += next;
            }
            if (!zero) target.Write(item.TargetOffset + pos, span[pos..runEnd]);
            else if (options.TargetHasBacking) target.WriteZeroes(item.TargetOffset + pos, runEnd - pos, mayUnmap: true);
            pos = runEnd;
        }
    }
}
