using System.Buffers;
using Strata.Block.Qcow2;

namespace Strata.Block.Operations;

/// <summary>Offline chain edits: commit a layer into its backing file, and rebase onto a new backing file.</summary>
public static class ChainOperations
{
    private const int Chunk = 2 << 20;

    /// <summary>
    /// Changes the virtual size the way QEMU's block layer does: when an image grows while its backing file is
    /// longer than the old end, the new range must read as zeros, not as the backing file's data there (nor as data a
    /// shrink left in the old last cluster). Whole clusters get zero clusters, the partial old last cluster explicit
    /// zeros. The image's backing chain must be open for that.
    /// </summary>
    public static void Resize(BlockImage image, long newSize, Preallocation preallocation = Preallocation.Off)
    {
        long oldSize = image.Size;
        image.Resize(newSize);
        long cluster = Math.Max(image.ClusterSize, 512);
        long zeroStart = (oldSize + cluster - 1) / cluster * cluster;
        if (newSize > oldSize && preallocation != Preallocation.Off)
        {
            // The grown whole clusters get their space now; a partly old cluster is left to the zeroing below.
            if (image is Qcow2Image qcow2) qcow2.Preallocate(preallocation, zeroStart, newSize, grown: true);
            else if (preallocation == Preallocation.Metadata) throw new BlockException("Unsupported preallocation mode: metadata");
            else WriteZeroBytes(image, oldSize, newSize);
        }
        if (newSize <= oldSize || image.Backing is not { } backing || backing.Size <= oldSize) return;
        // Falloc and full preallocation already wrote the clusters as zeros; metadata ones become zero clusters that
        // keep their space, as QEMU leaves them.
        bool writtenAsZeros = preallocation is Preallocation.Falloc or Preallocation.Full;
        if (newSize > zeroStart && !writtenAsZeros) image.WriteZeroes(zeroStart, newSize - zeroStart, mayUnmap: false);
        if (zeroStart > oldSize) image.Write(oldSize, new byte[Math.Min(zeroStart, newSize) - oldSize]);
    }

    private static void WriteZeroBytes(BlockImage image, long start, long end)
    {
        var zeros = new byte[(int)Math.Min(end - start, 1L << 20)];
        for (long at = start; at < end; at += zeros.Length)
            image.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, end - at)));
    }

    /// <summary>
    /// Writes into <paramref name="target"/> (the layer <paramref name="baseDepth"/> levels below
    /// <paramref name="top"/>, opened read-write on its own) everything the layers above it hold, as
    /// <c>qemu-img commit</c> does; past the end of a shorter intermediate layer the chain reads zeros, and those
    /// zeros are committed too. <paramref name="top"/> is the chain opened for reading. The target grows to the top's
    /// size if it is shorter.
    /// </summary>
    public static void Commit(BlockImage top, int baseDepth, BlockImage target, Action<long, long>? progress = null)
    {
        var layers = new List<BlockImage>();
        for (var layer = top; layers.Count < baseDepth; layer = layer.Backing)
            layers.Add(layer ?? throw new ArgumentOutOfRangeException(nameof(baseDepth), "the base is not in the chain"));
        if (target.Size < top.Size) Resize(target, top.Size);
        var buffer = ArrayPool<byte>.Shared.Rent(Chunk);
        try
        {
            for (long pos = 0; pos < top.Size;)
            {
                var (length, state) = StatusAbove(layers, pos, Math.Min(Chunk, top.Size - pos));
                switch (state)
                {
                    case LayerState.Data:
                        var span = buffer.AsSpan(0, (int)length);
                        top.Read(pos, span);
                        target.Write(pos, span);
                        break;
                    case LayerState.Zero:
                        target.WriteZeroes(pos, length, mayUnmap: true);
                        break;
                }
                pos += length;
                progress?.Invoke(pos, top.Size);
            }
            target.Flush();
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>What the layers above the base say about a range: the first layer that has it decides; a layer the
    /// range lies past the end of reads as zeros there, which counts as that layer's.</summary>
    private static (long Length, LayerState State) StatusAbove(List<BlockImage> layers, long pos, long length)
    {
        for (int i = 0; i < layers.Count; i++)
        {
            var layer = layers[i];
            if (pos >= layer.Size) return (length, LayerState.Zero);
            var ext = layer.GetLayerStatus(pos, Math.Min(length, layer.Size - pos));
            if (ext.State != LayerState.Unallocated) return (ext.Length, ext.State);
            length = ext.Length;
        }
        return (length, LayerState.Unallocated);
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
                long oldEnd = oldBacking?.Size ?? 0;
                // Past the old backing file's end the image read zeros: there the differences become zero writes.
                bool pastOldEnd = pos >= oldEnd;
                if (!pastOldEnd && pos + ext.Length > oldEnd) ext = ext with { Length = oldEnd - pos };
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
                            bool differs = !o.Slice(p, len).SequenceEqual(nw.Slice(p, len));
                            if (differs && pastOldEnd) image.WriteZeroes(pos + p, len, mayUnmap: false);
                            else if (differs) image.Write(pos + p, o.Slice(p, len));
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
