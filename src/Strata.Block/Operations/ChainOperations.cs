using System.Buffers;

namespace Strata.Block.Operations;

/// <summary>Offline chain edits: commit a layer into its backing file, and rebase onto a new backing file.</summary>
public static class ChainOperations
{
    private const int Chunk = 2 << 20;

    /// <summary>
    /// Writes everything <paramref name="top"/> holds in its own layer into <paramref name="backing"/> (opened
    /// read-write), then, unless <paramref name="keepTop"/>, empties the top layer as <c>qemu-img commit</c> does.
    /// </summary>
    public static void Commit(BlockImage top, BlockImage backing, bool keepTop, Action<long, long>? progress = null)
    {
        if (backing.Size < top.Size) backing.Resize(top.Size);
        var buffer = ArrayPool<byte>.Shared.Rent(Chunk);
        try
        {
            for (long pos = 0; pos < top.Size;)
            {
                var ext = top.GetLayerStatus(pos, Math.Min(Chunk, top.Size - pos));
                switch (ext.State)
                {
                    case LayerState.Data:
                        var span = buffer.AsSpan(0, (int)ext.Length);
                        top.Read(pos, span);
                        backing.Write(pos, span);
                        break;
                    case LayerState.Zero:
                        backing.WriteZeroes(pos, ext.Length, mayUnmap: true);
                        break;
                }
                pos += ext.Length;
                progress?.Invoke(pos, top.Size);
            }
            backing.Flush();
            if (!keepTop)
            {
                if (top is Qcow2.Qcow2Image q) q.MakeEmpty();
                top.Flush();
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>
    /// Safe rebase: wherever the old and new backing chains read differently and the image itself has nothing,
    /// the old content is copied into the image; then the header names the new backing file.
    /// <paramref name="newBacking"/> null means "no backing file" (everything the old chain shows is copied).
    /// </summary>
    public static void Rebase(BlockImage image, BlockImage? oldBacking, BlockImage? newBacking, string? newBackingName, string? newBackingFormat,
        Action<long, long>? progress = null)
    {
        var bufOld = ArrayPool<byte>.Shared.Rent(Chunk);
        var bufNew = ArrayPool<byte>.Shared.Rent(Chunk);
        try
        {
            for (long pos = 0; pos < image.Size;)
            {
                var ext = image.GetLayerStatus(pos, Math.Min(Chunk, image.Size - pos));
                if (ext.State == LayerState.Unallocated)
                {
                    int n = (int)ext.Length;
                    var o = bufOld.AsSpan(0, n);
                    var nw = bufNew.AsSpan(0, n);
                    BlockImage.ReadOrZeros(oldBacking, pos, o);
                    BlockImage.ReadOrZeros(newBacking, pos, nw);
                    if (!o.SequenceEqual(nw))
                    {
                        // Copy only the differing 512-byte-aligned pieces, cluster by cluster.
                        int g = Math.Max(image.CopyGranularity, 512);
                        for (int p = 0; p < n;)
                        {
                            int len = (int)Math.Min(g - ((pos + p) % g), n - p);
                            if (!o.Slice(p, len).SequenceEqual(nw.Slice(p, len)))
                                image.Write(pos + p, o.Slice(p, len));
                            p += len;
                        }
                    }
                }
                pos += ext.Length;
                progress?.Invoke(pos, image.Size);
            }
            image.Flush();
            image.SetBackingFile(newBackingName, newBackingFormat);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(bufOld);
            ArrayPool<byte>.Shared.Return(bufNew);
        }
    }
}
