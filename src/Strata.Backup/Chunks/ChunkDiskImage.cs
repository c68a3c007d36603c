using Strata.Block;
using Strata.Block.Bitmaps;

namespace Strata.Backup.Chunks;

/// <summary>
/// One disk of one point of a chunk repository as a read-only image (restore, serve, copy read it). A chunk is fetched
/// when a read first touches it, checked against its id, and kept in a small LRU; readers wanting the same chunk share
/// one fetch. Zero chunks are holes reading as zeros. A chunk that is missing or damaged fails the read with EIO and a
/// message naming it.
/// </summary>
internal sealed class ChunkDiskImage : BlockImage
{
    private const int EIO = 5;
    private readonly ChunkRepository _repo;
    private readonly ChunkDisk _disk;
    private readonly string _name;
    private readonly int _capacity;
    private readonly Dictionary<long, LinkedListNode<(long Index, Task<byte[]> Data)>> _cache = [];
    private readonly LinkedList<(long Index, Task<byte[]> Data)> _lru = new();

    public ChunkDiskImage(ChunkRepository repo, ChunkPoint point, ChunkDisk disk, int cacheChunks)
    {
        _repo = repo;
        _disk = disk;
        _capacity = Math.Max(1, cacheChunks);
        _name = $"{repo.Store.Location}#{point.Id}/{disk.Disk}";
        Bitmaps = new BitmapSet(disk.VirtualSize, BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (name, _) => $"Can't make bitmap '{name}' persistent in '{_name}': Operation not supported",
        };
    }

    public override string FormatName => "strata-chunks";
    public override long Size => _disk.VirtualSize;
    public override bool ReadOnly => true;
    public override string FileName => _name;
    public override int ClusterSize => 0;

    private int LengthOf(long index) => (int)Math.Min(_repo.ChunkSize, Size - index * _repo.ChunkSize);

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        int chunkSize = _repo.ChunkSize;
        while (!buffer.IsEmpty)
        {
            long index = offset / chunkSize;
            int within = (int)(offset % chunkSize);
            int n = Math.Min(buffer.Length, LengthOf(index) - within);
            if (_disk.Chunks[(int)index].IsZero) buffer[..n].Clear();
            else Chunk(index).AsSpan(within, n).CopyTo(buffer);
            buffer = buffer[n..];
            offset += n;
        }
    }

    /// <summary>The chunk's plaintext, from the cache or fetched (one fetch shared by concurrent readers).</summary>
    private byte[] Chunk(long index)
    {
        Task<byte[]> fetch;
        TaskCompletionSource<byte[]>? mine = null;
        lock (_cache)
        {
            if (_cache.TryGetValue(index, out var node))
            {
                _lru.Remove(node);
                _lru.AddFirst(node);
                fetch = node.Value.Data;
            }
            else
            {
                mine = new TaskCompletionSource<byte[]>(TaskCreationOptions.RunContinuationsAsynchronously);
                fetch = mine.Task;
                _cache[index] = _lru.AddFirst((index, fetch));
                while (_lru.Count > _capacity)
                {
                    _cache.Remove(_lru.Last!.Value.Index);
                    _lru.RemoveLast();
                }
            }
        }
        if (mine is not null)
        {
            // Fetched and checked outside the lock: readers of other chunks go on meanwhile.
            try
            {
                mine.SetResult(_repo.ReadChunkAsync(_disk.Chunks[(int)index], LengthOf(index)).GetAwaiter().GetResult());
            }
            catch (Exception e)
            {
                mine.SetException(e);
            }
        }
        try
        {
            return fetch.GetAwaiter().GetResult();
        }
        catch (Exception e) when (e is ChunkIntegrityException or ObjectStoreException)
        {
            lock (_cache)
            {
                // A failed fetch is not cached: the next read tries again (the store may have been unreachable).
                if (_cache.TryGetValue(index, out var node) && node.Value.Data == fetch)
                {
                    _cache.Remove(index);
                    _lru.Remove(node);
                }
            }
            throw new BlockIOException($"{_name} at offset {index * _repo.ChunkSize}: {e.Message}", EIO);
        }
    }

    public override LayerExtent GetLayerStatus(long offset, long maxLength)
    {
        CheckRange(offset, 0);
        long end = Math.Min(Size, offset + maxLength);
        if (offset >= end) return new LayerExtent(offset, 0, LayerState.Data, -1);
        int chunkSize = _repo.ChunkSize;
        long index = offset / chunkSize;
        bool zero = _disk.Chunks[(int)index].IsZero;
        long pos = (index + 1) * chunkSize;
        while (pos < end && _disk.Chunks[(int)(pos / chunkSize)].IsZero == zero) pos += chunkSize;
        return new LayerExtent(offset, Math.Min(pos, end) - offset, zero ? LayerState.Zero : LayerState.Data, -1);
    }

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => throw ReadOnlyError();
    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => throw ReadOnlyError();
    protected override void DriverDiscard(long offset, long length) => throw ReadOnlyError();

    protected override void DriverFlush()
    {
    }

    public override void Resize(long newSize) => throw ReadOnlyError();

    private BlockException ReadOnlyError() => new($"Image '{_name}' is read-only");

    public override void Dispose()
    {
        lock (_cache)
        {
            _cache.Clear();
            _lru.Clear();
        }
        base.Dispose();
    }
}
