using System.Buffers;
using System.Security.Cryptography;
using Microsoft.Win32.SafeHandles;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>
/// What a backup file's own layer holds (data and zero ranges, never what it reads through to), with a digest per
/// data piece, and the whole file's digest: the facts a manifest records and verify re-checks.
/// </summary>
public static class ImageDigest
{
    /// <summary>Data extents are hashed in pieces of at most this size, so that verify can say where damage is.</summary>
    public const int PieceSize = 4 << 20;

    /// <summary>The manifest format <see cref="Describe"/> writes. Format 3: a data piece's digest is the SHA-256 of
    /// the concatenated SHA-256s of its 64 KiB slices, the last one shorter (<see cref="PieceDigest"/>), as the file's
    /// is of its blocks; format 2 and 1 (the SHA-256 of the piece's bytes) are still read and verified.</summary>
    public const int ManifestFormat = 3;

    /// <summary>A data piece's digest in manifest format 3: the SHA-256 of the SHA-256s of its 64 KiB slices in order,
    /// the last one shorter. A piece that is whole blocks of the file gets it from their hashes, without a read.</summary>
    public static byte[] PieceDigest(ReadOnlySpan<byte> data)
    {
        var slices = new byte[(data.Length + BlockSize - 1) / BlockSize * SHA256.HashSizeInBytes];
        for (int i = 0; i * BlockSize < data.Length; i++)
            SHA256.HashData(data.Slice(i * BlockSize, Math.Min(BlockSize, data.Length - i * BlockSize)), slices.AsSpan(i * SHA256.HashSizeInBytes, SHA256.HashSizeInBytes));
        return SHA256.HashData(slices);
    }

    /// <summary>The layer's extents with their digests in manifest format <paramref name="format"/>;
    /// <paramref name="granules"/>, when given, is fed every range in the same pass (the data read once for both).
    /// <paramref name="fileBlockHashes"/> holds the SHA-256s of the first whole 64 KiB blocks of the image's own file,
    /// one after another, when they are already known (<see cref="Describe"/>): a data piece that is one such block,
    /// or (format 3) several in order, takes its digest and its granules' from there and is not read.</summary>
    /// <param name="layer">The layer's extents as <see cref="Layer"/> gave them, when the caller has walked it already.</param>
    public static List<ExtentDigest> TopLayer(BlockImage image, GranuleDigestBuilder? granules = null, byte[]? fileBlockHashes = null,
        IEnumerable<LayerExtent>? layer = null, int format = ManifestFormat)
    {
        var result = new List<ExtentDigest>();
        bool sliced = format >= 3;
        // Rented at the first piece that is read: a sparse incremental's pieces are all known by their blocks' hashes.
        // Native memory, as the hashing buffers are: a 4 MiB managed array lands on the large object heap, whose first
        // few megabytes of allocations set off a full, compacting collection in the middle of the commit.
        IMemoryOwner<byte>? lease = null;
        try
        {
            foreach (var ext in layer ?? Layer(image))
            {
                long pos = ext.Offset, len = ext.Length;
                switch (ext.State)
                {
                    case LayerState.Data when fileBlockHashes is not null && IsBlockOfTheFile(ext, len) && Known(fileBlockHashes, ext.HostOffset, len)
                                              && (granules is null || granules.IsWholeGranule(pos, len)):
                    {
                        var known = BlockHashes(fileBlockHashes, ext.HostOffset, len);
                        granules?.WholeGranule(pos, len, known);
                        result.Add(new ExtentDigest(pos, len, ExtentDigest.Data, Convert.ToHexStringLower(sliced ? SHA256.HashData(known) : known)));
                        break;
                    }
                    case LayerState.Data when sliced && fileBlockHashes is not null && AreBlocksOfTheFile(ext, len) && Known(fileBlockHashes, ext.HostOffset, len)
                                              && (granules is null || granules.IsWholeGranule(pos, BlockSize)):
                    {
                        // Whole blocks of the file, in order: their hashes, one after another, are the piece's slices'.
                        var blocks = BlockHashes(fileBlockHashes, ext.HostOffset, len);
                        for (int i = 0; i * BlockSize < len; i++)
                            granules?.WholeGranule(pos + (long)i * BlockSize, BlockSize, blocks.Slice(i * SHA256.HashSizeInBytes, SHA256.HashSizeInBytes));
                        result.Add(new ExtentDigest(pos, len, ExtentDigest.Data, Convert.ToHexStringLower(SHA256.HashData(blocks))));
                        break;
                    }
                    case LayerState.Data:
                        lease ??= AlignedBuffers.Rent(PieceSize);
                        var buffer = lease.Memory;
                        var span = buffer.Span[..(int)len];
                        image.Read(pos, span);
                        result.Add(new ExtentDigest(pos, len, ExtentDigest.Data, Convert.ToHexStringLower(
                            sliced ? SlicedPiece(buffer[..(int)len], pos, granules) : PlainPiece(buffer[..(int)len], pos, granules))));
                        break;
                    case LayerState.Unallocated:
                        granules?.Unallocated(pos, len);
                        break;
                    case LayerState.Zero:
                        granules?.Zero(pos, len);
                        if (result.Count > 0 && result[^1] is { Kind: ExtentDigest.Zero } z && z.Offset + z.Length == pos)
                            result[^1] = z with { Length = z.Length + len };
                        else
                            result.Add(new ExtentDigest(pos, len, ExtentDigest.Zero, null));
                        break;
                }
            }
        }
        finally
        {
            lease?.Dispose();
        }
        return result;
    }

    /// <summary>Format 3 of a piece that was read: its 64 KiB slices hashed on two cores, the granules fed from those
    /// hashes when they are the slices (the piece starts at a granule of 64 KiB), else from the bytes.</summary>
    private static byte[] SlicedPiece(Memory<byte> piece, long pos, GranuleDigestBuilder? granules)
    {
        int n = (piece.Length + BlockSize - 1) / BlockSize;
        var slices = new byte[n * SHA256.HashSizeInBytes];
        void Hash(int from, int to)
        {
            var data = piece.Span;
            for (int i = from; i < to; i++)
                SHA256.HashData(data.Slice(i * BlockSize, Math.Min(BlockSize, data.Length - i * BlockSize)), slices.AsSpan(i * SHA256.HashSizeInBytes, SHA256.HashSizeInBytes));
        }
        // One slice: hashed here; more: the second half on another core.
        int half = n > 1 ? n / 2 : n;
        var other = half < n ? Task.Run(() => Hash(half, n)) : Task.CompletedTask;
        try
        {
            Hash(0, half);
        }
        finally
        {
            // Never return the buffer to the pool while the other half still reads it.
            other.GetAwaiter().GetResult();
        }
        if (granules is not null)
        {
            if (piece.Length % BlockSize == 0 && granules.IsWholeGranule(pos, BlockSize))
                for (int i = 0; i < n; i++) granules.WholeGranule(pos + (long)i * BlockSize, BlockSize, slices.AsSpan(i * SHA256.HashSizeInBytes, SHA256.HashSizeInBytes));
            else
                granules.Data(pos, piece.Span);
        }
        return SHA256.HashData(slices);
    }

    /// <summary>Formats 1 and 2 of a piece that was read: the SHA-256 of its bytes, beside its granules' on another core.</summary>
    private static byte[] PlainPiece(Memory<byte> piece, long pos, GranuleDigestBuilder? granules)
    {
        if (granules is null) return SHA256.HashData(piece.Span);
        if (granules.IsWholeGranule(pos, piece.Length))
        {
            // One granule, one hash: the granule's digest from the piece's own SHA-256.
            var hash = SHA256.HashData(piece.Span);
            granules.WholeGranule(pos, piece.Length, hash);
            return hash;
        }
        var whole = Task.Run(() => SHA256.HashData(piece.Span));
        try
        {
            granules.Data(pos, piece.Span);
        }
        finally
        {
            // Never return the buffer to the pool while the other hash still reads it.
            whole.Wait();
        }
        return whole.GetAwaiter().GetResult();
    }

    /// <summary>A data piece that is whole blocks of the file, in order: whole clusters, uncompressed, at a block
    /// boundary (a host-contiguous run: a layer extent with a host offset is one).</summary>
    private static bool AreBlocksOfTheFile(LayerExtent ext, long len) =>
        len > 0 && len % BlockSize == 0 && ext.Offset % BlockSize == 0 && ext.HostOffset >= 0 && ext.HostOffset % BlockSize == 0
        && !ext.Compressed && !ext.ZeroOverData;

    /// <summary>Whether the hashes of the blocks from <paramref name="hostOffset"/> (a block boundary) for
    /// <paramref name="length"/> bytes (whole blocks) are all among the known ones.</summary>
    private static bool Known(byte[] fileBlockHashes, long hostOffset, long length) =>
        (hostOffset + length) / BlockSize * SHA256.HashSizeInBytes <= fileBlockHashes.Length;

    private static ReadOnlySpan<byte> BlockHashes(byte[] fileBlockHashes, long hostOffset, long length) =>
        fileBlockHashes.AsSpan((int)(hostOffset / BlockSize * SHA256.HashSizeInBytes), (int)(length / BlockSize * SHA256.HashSizeInBytes));

    /// <summary>The image's own layer from its start to its end, in extents of at most <see cref="PieceSize"/> (the
    /// pieces data is hashed in), each cut at the image's end.</summary>
    public static IEnumerable<LayerExtent> Layer(BlockImage image)
    {
        for (long pos = 0; pos < image.Size;)
        {
            var ext = image.GetLayerStatus(pos, Math.Min(PieceSize, image.Size - pos));
            long len = Math.Min(ext.Length, image.Size - pos);
            yield return ext with { Offset = pos, Length = len };
            pos += len;
        }
    }

    /// <summary>A data piece that is exactly one 64 KiB block of the file: one whole cluster, stored uncompressed at a
    /// block boundary. (The caller has checked that the image keeps its data in the file as it is, <see cref="StoresDataAsIs"/>.)</summary>
    private static bool IsBlockOfTheFile(LayerExtent ext, long len) =>
        len == BlockSize && ext.HostOffset >= 0 && ext.HostOffset % BlockSize == 0 && !ext.Compressed && !ext.ZeroOverData;

    /// <summary>Whether a guest cluster's bytes are the bytes of its host cluster in the image's own file: a qcow2 of
    /// 64 KiB clusters, unencrypted, with no external data file (every point the tool writes).</summary>
    private static bool StoresDataAsIs(BlockImage image) =>
        image is Qcow2Image { ClusterSize: BlockSize, EncryptionFormat: null, HasExternalDataFile: false };

    /// <summary>The block size of <see cref="FileBlockDigest"/>: a point's cluster size, so that a cluster of data is a block.</summary>
    public const int BlockSize = 65536;

    /// <summary>Blocks hashed per read (256 KiB): the two workers' fresh buffers cost 128 page faults together where
    /// megabyte reads took 512, and a 10 MiB incremental's blocks were hashed in 3.9 ms instead of 4.4 (with the
    /// commit's fsync running beside them).</summary>
    private const int BlocksPerRun = 4;

    /// <summary>
    /// The file's digest in manifest formats 2 and 3: the SHA-256 of the concatenated SHA-256s of its 64 KiB blocks, the
    /// last one shorter (an empty file: the SHA-256 of nothing). The blocks are hashed on every core, 256 KiB at a
    /// time, in windows whose hashes are then fed in order; the SHA-256s of the first <paramref name="keepBlocks"/>
    /// whole blocks (a last block cut short by the file's end is never kept; at most <see cref="MaxKeptBlocks"/>) are
    /// returned one after another.
    /// </summary>
    public static (string Digest, byte[] Kept) FileBlockDigest(SafeFileHandle file, long keepBlocks = 0)
    {
        long length = RandomAccess.GetLength(file);
        long blocks = (length + BlockSize - 1) / BlockSize;
        keepBlocks = Math.Clamp(keepBlocks, 0, Math.Min(length / BlockSize, MaxKeptBlocks));
        var kept = new byte[keepBlocks * SHA256.HashSizeInBytes];
        using var outer = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        int workers = Math.Clamp(Environment.ProcessorCount, 1, 8);
        // A window of 64 MiB of blocks at a time: their hashes (32 bytes a block) wait for the window to be done.
        const long WindowBlocks = 1024;
        var hashes = new byte[(int)Math.Min(blocks, WindowBlocks) * SHA256.HashSizeInBytes];
        for (long first = 0; first < blocks; first += WindowBlocks)
        {
            long count = Math.Min(WindowBlocks, blocks - first);
            long runs = (count + BlocksPerRun - 1) / BlocksPerRun;
            long next = -1;
            void Work()
            {
                // Native memory (see TopLayer): a managed buffer this size would be a large-object allocation.
                using var lease = AlignedBuffers.Rent(BlocksPerRun * BlockSize);
                var buffer = lease.Memory.Span;
                for (long r; (r = Interlocked.Increment(ref next)) < runs;)
                {
                    long block = first + r * BlocksPerRun;
                    long pos = block * BlockSize;
                    int want = (int)Math.Min((long)BlocksPerRun * BlockSize, length - pos);
                    var data = buffer[..want];
                    for (int done = 0; done < want;)
                    {
                        int n = RandomAccess.Read(file, data[done..], pos + done);
                        if (n == 0) throw new IOException($"the file ended at {pos + done} bytes while being hashed ({length} expected): it changed under the hash");
                        done += n;
                    }
                    for (int i = 0; i * BlockSize < want; i++)
                        SHA256.HashData(data.Slice(i * BlockSize, Math.Min(BlockSize, want - i * BlockSize)),
                            hashes.AsSpan((int)((block - first + i) * SHA256.HashSizeInBytes), SHA256.HashSizeInBytes));
                }
            }
            var others = new Task[Math.Min(workers, (int)runs) - 1];
            for (int i = 0; i < others.Length; i++) others[i] = Task.Run(Work);
            try
            {
                Work();
            }
            catch
            {
                // None still writing into the window's hashes when the method leaves.
                try { Task.WaitAll(others); } catch (AggregateException) { }
                throw;
            }
            // A worker's failure as itself (an IOException), not wrapped.
            Task.WhenAll(others).GetAwaiter().GetResult();
            var window = hashes.AsSpan(0, (int)count * SHA256.HashSizeInBytes);
            outer.AppendData(window);
            if (first < keepBlocks)
                window[..(int)(Math.Min(count, keepBlocks - first) * SHA256.HashSizeInBytes)].CopyTo(kept.AsSpan((int)(first * SHA256.HashSizeInBytes)));
        }
        return (Convert.ToHexStringLower(outer.GetHashAndReset()), kept);
    }

    public static string FileBlockDigest(string path)
    {
        using var handle = File.OpenHandle(path);
        return FileBlockDigest(handle).Digest;
    }

    /// <summary>The read size of <see cref="FileSha256"/>: as fast as larger reads from the page cache, and a fresh
    /// buffer's first touch (a page fault per page, dear in a VM) is paid on a quarter of a piece, not on four MiB.</summary>
    private const int FileReadSize = 1 << 20;

    public static string FileSha256(string path)
    {
        using var handle = File.OpenHandle(path);
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var buffer = ArrayPool<byte>.Shared.Rent(FileReadSize);
        try
        {
            int n;
            for (long pos = 0; (n = RandomAccess.Read(handle, buffer.AsSpan(0, FileReadSize), pos)) > 0; pos += n)
                hash.AppendData(buffer, 0, n);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    /// <summary>The builder's digests; granules it could not finish from the file's own layer are read through the
    /// chain of <paramref name="path"/>, which is opened only then.</summary>
    public static GranuleDigests FinishGranules(GranuleDigestBuilder builder, string path)
    {
        BlockImage? chain = null;
        try
        {
            return builder.Finish((offset, span) => (chain ??= ImageOpener.Open(path, "qcow2", readOnly: true)).Read(offset, span));
        }
        finally
        {
            chain?.Dispose();
        }
    }

    /// <summary>The granule digests of <paramref name="image"/> read whole (through its chain): zero ranges by block
    /// status, without a read.</summary>
    public static GranuleDigests ChainGranules(BlockImage image, long granularity)
    {
        var builder = new GranuleDigestBuilder(image.Size, granularity, parent: null);
        var buffer = ArrayPool<byte>.Shared.Rent(PieceSize);
        try
        {
            for (long pos = 0; pos < image.Size;)
            {
                var ext = ChainStatus.Get(image, pos, Math.Min(PieceSize, image.Size - pos));
                if (ext.Zero) builder.Zero(pos, ext.Length);
                else
                {
                    var span = buffer.AsSpan(0, (int)ext.Length);
                    image.Read(pos, span);
                    builder.Data(pos, span);
                }
                pos += ext.Length;
            }
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
        return builder.Finish();
    }

    public static long DataBytes(IEnumerable<ExtentDigest> extents) => extents.Where(e => e.Kind == ExtentDigest.Data).Sum(e => e.Length);

    /// <summary>At most this many blocks' hashes are kept for the pieces (32 bytes each, held meanwhile: 32 MiB for the
    /// first 64 GiB of a file); past them, pieces are read and hashed.</summary>
    public const int MaxKeptBlocks = 1 << 20;

    /// <summary>The manifest (format 3, <see cref="ManifestFormat"/>) with the facts of its file as it is now: extents, bytes copied, size and
    /// digest; <paramref name="granules"/>, when given, is fed the file's layer in the same pass. The file's blocks
    /// are hashed first, on every core; a data piece that is one block of the file (every piece of a sparse
    /// incremental) takes its SHA-256 from there, so such a file is read and hashed once. So does a piece of several
    /// blocks (a full's), in format 3, with its granules: a 1 GiB full was hashed three times over in format 2 (its
    /// blocks; then each piece on one core and its granules on the other), now once.</summary>
    public static BackupManifest Describe(BackupManifest m, string path, GranuleDigestBuilder? granules = null)
    {
        using var image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true);
        using var file = File.OpenHandle(path);
        long fileLength = RandomAccess.GetLength(file);
        // Every whole block's hash kept (up to the cap), in one array: a piece's blocks are its host run's.
        var (digest, kept) = FileBlockDigest(file, StoresDataAsIs(image) ? MaxKeptBlocks : 0);
        var extents = TopLayer(image, granules, kept);
        return m with
        {
            Format = ManifestFormat,
            Extents = extents,
            CopiedBytes = DataBytes(extents),
            FileSize = fileLength,
            FileSha256 = null,
            FileDigest = digest,
        };
    }
}
