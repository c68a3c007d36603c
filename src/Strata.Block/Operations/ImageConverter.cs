namespace Strata.Block.Operations;

/// <summary>How <see cref="ImageConverter"/> copies.</summary>
public sealed record ConvertOptions
{
    /// <summary>Write every data cluster compressed (qcow2 targets).</summary>
    public bool Compress { get; init; }

    /// <summary>The target has a backing file equal to the source's: copy only what the source's top layer holds.</summary>
    public bool TargetHasBacking { get; init; }

    /// <summary>Size of the target's backing file when the target is new (-1: unknown or none). Past its end the
    /// backing file reads as zeros, so the source's zero ranges there need no write.</summary>
    public long TargetBackingSize { get; init; } = -1;

    /// <summary>The target is freshly created and reads as zeros, so zero ranges need no write.</summary>
    public bool TargetIsZeroed { get; init; } = true;

    /// <summary>qemu-img's -S: a run of zeros at least this long (bytes, a multiple of 512) is not written as data.
    /// 0 writes everything as data (a fully allocated target).</summary>
    public int MinSparse { get; init; } = 4096;

    /// <summary>Writes land in the target in guest order (qemu-img's default; -W turns it off), so a new qcow2
    /// target's clusters are laid out in order. Reads still run in parallel.</summary>
    public bool WriteInOrder { get; init; } = true;

    /// <summary>--salvage: a sector that cannot be read is copied as zeros, with a warning, instead of failing.</summary>
    public bool Salvage { get; init; }

    /// <summary>Receives --salvage warnings (the text after "warning: ").</summary>
    public Action<string>? Warn { get; init; }

    /// <summary>Parallel copy workers.</summary>
    public int Workers { get; init; } = Math.Max(2, Environment.ProcessorCount);

    /// <summary>Largest single read/write.</summary>
    public int ChunkSize { get; init; } = 2 << 20;

    /// <summary>Called with (bytes done, bytes total) of the data to copy, as qemu-img counts progress: only ranges
    /// that are read and written as data count, each when a worker takes it.</summary>
    public Action<long, long>? Progress { get; init; }
}

/// <summary>
/// Copies one or more source images (concatenated) into a target, the way <c>qemu-img convert</c> does: block
/// status decides what is read at all, runs of zeros are left as holes (or zero-written where the target would not
/// read zeros), reads run in parallel and writes land in guest order.
/// </summary>
public static class ImageConverter
{
    private enum WorkKind { Data, Zero }

    /// <summary>A range of the target (the sources concatenated): it may span two sources when clusters are
    /// written compressed.</summary>
    private readonly record struct WorkItem(long TargetOffset, long Length, WorkKind Kind);

    public static void Convert(IReadOnlyList<BlockImage> sources, BlockImage target, ConvertOptions options)
    {
        long total = sources.Sum(s => s.Size);
        if (target.Size < total)
            throw new BlockException($"Target is smaller ({target.Size} bytes) than the source ({total} bytes)");
        int chunk = options.Compress ? target.ClusterSize : Math.Max(options.ChunkSize / 512 * 512, 512);
        var reserving = options.TargetIsZeroed && !options.Compress ? ReserveBeforeWrites(target) : [];
        try
        {
            Copy(sources, target, options, chunk);
        }
        finally
        {
            // Whatever writes the image afterwards (bitmaps, a restore's finishing touches) is no first fill.
            foreach (var file in reserving) file.ReserveBeforeWrite = false;
        }
    }

    private static void Copy(IReadOnlyList<BlockImage> sources, BlockImage target, ConvertOptions options, int chunk)
    {
        // Planned up front, as qemu-img does, so progress can count the data to copy before copying starts.
        var items = Plan(sources, options, chunk).Where(i => !Skippable(i, options)).ToList();
        long dataTotal = items.Where(i => CountsForProgress(i, options)).Sum(i => i.Length);
        long dataDone = 0;

        Exception? failure = null;
        using var cts = new CancellationTokenSource();
        int workers = Math.Max(1, options.Workers);
        int nextTaken = 0;
        int nextToWrite = 0;
        // In-order writes: the writer of item i wakes only the worker that holds item i + 1 (its own event), never
        // every worker at once — a broadcast per chunk cost more than the copy itself.
        var owner = new int[items.Count + 1];
        Array.Fill(owner, -1);
        var turn = new ManualResetEventSlim[workers];
        // No spinning before a wait: the turn comes after a whole chunk's write, and a spinning waiter only takes the
        // core from the writer it waits for (2 cores: sched_yield showed as the largest syscall in strace -c).
        for (int w = 0; w < workers; w++) turn[w] = new ManualResetEventSlim(false, spinCount: 0);
        void PassTurn(int written)
        {
            Volatile.Write(ref nextToWrite, written + 1);
            int next = Volatile.Read(ref owner[written + 1]);
            if (next >= 0) turn[next].Set();
        }
        var threads = new Thread[workers];
        for (int w = 0; w < workers; w++)
        {
            int self = w;
            threads[w] = new Thread(() =>
            {
                // Page aligned: the kernel's copies into and out of the page cache (most of a convert's time, by
                // perf) then move whole pages, not every page straddling two of the buffer's.
                using var lease = AlignedBuffers.Rent(chunk);
                var buffer = lease.Memory;
                try
                {
                    while (!cts.IsCancellationRequested)
                    {
                        int index = Interlocked.Increment(ref nextTaken) - 1;
                        if (index >= items.Count) break;
                        Volatile.Write(ref owner[index], self);
                        var item = items[index];
                        if (CountsForProgress(item, options))
                            options.Progress?.Invoke(Interlocked.Add(ref dataDone, item.Length), dataTotal);
                        var span = buffer.Span[..(int)item.Length];
                        if (item.Kind == WorkKind.Data) ReadSources(sources, item.TargetOffset, span, options);
                        if (options.WriteInOrder)
                        {
                            // Reset before looking: a turn passed in between is seen in nextToWrite.
                            turn[self].Reset();
                            while (Volatile.Read(ref nextToWrite) != index && !cts.IsCancellationRequested) turn[self].Wait(100);
                            if (cts.IsCancellationRequested) break;
                        }
                        try
                        {
                            WriteOne(item, span, target, options);
                        }
                        finally
                        {
                            if (options.WriteInOrder) PassTurn(index);
                        }
                    }
                }
                catch (Exception e)
                {
                    Interlocked.CompareExchange(ref failure, e, null);
                    cts.Cancel();
                    foreach (var t in turn) t.Set();
                }
            }) { IsBackground = true, Name = $"convert-{w}" };
            threads[w].Start();
        }
        foreach (var t in threads) t.Join();
        foreach (var t in turn) t.Dispose();
        if (failure is not null)
        {
            if (failure is BlockException) throw failure;
            throw new BlockException($"error while converting: {failure.Message}");
        }
        target.Flush();
    }

    /// <summary>A fresh target is filled for the first time, so its files get their space reserved just before each
    /// write (<see cref="HostFile.ReserveBeforeWrite"/>) while the copy runs: writes into one file are serial in the
    /// kernel, and this made them the cheaper part of a convert. Compressed clusters are packed, many to a host
    /// cluster, and gain nothing.</summary>
    private static List<HostFile> ReserveBeforeWrites(BlockImage target)
    {
        HostFile?[] files = target switch
        {
            Qcow2.Qcow2Image q => [q.File, q.DataFile],
            RawImage r => [r.File],
            _ => [],
        };
        var reserving = new List<HostFile>();
        foreach (var file in files)
        {
            if (file is null || !file.ReservingPays) continue;
            file.ReserveBeforeWrite = true;
            if (file.ReserveBeforeWrite) reserving.Add(file);
        }
        return reserving;
    }

    /// <summary>A zero range of a target that already reads as zeros needs no write at all.</summary>
    private static bool Skippable(in WorkItem item, ConvertOptions options) =>
        item.Kind == WorkKind.Zero && options.MinSparse != 0 && options.TargetIsZeroed && !options.TargetHasBacking;

    /// <summary>qemu-img counts data, and with -S 0 the zeros it writes as data.</summary>
    private static bool CountsForProgress(in WorkItem item, ConvertOptions options) =>
        item.Kind == WorkKind.Data || options.MinSparse == 0;

    private static IEnumerable<WorkItem> Plan(IReadOnlyList<BlockImage> sources, ConvertOptions options, int chunk)
    {
        if (options.Compress)
        {
            foreach (var item in PlanClusters(sources, options, chunk)) yield return item;
            yield break;
        }
        long targetOffset = 0;
        foreach (var source in sources)
        {
            long offset = 0;
            while (offset < source.Size)
            {
                long length;
                WorkKind kind;
                bool skip = false;
                if (options.TargetHasBacking)
                {
                    // Only what the top layer itself holds differs from the shared backing file.
                    var ext = source.GetLayerStatus(offset, source.Size - offset);
                    length = ext.Length;
                    kind = ext.State == LayerState.Zero ? WorkKind.Zero : WorkKind.Data;
                    skip = ext.State == LayerState.Unallocated;
                    if (ext.State == LayerState.Zero && options.TargetBackingSize >= 0)
                    {
                        // Past the end of the target's backing file the target reads zeros already.
                        long backingEnd = options.TargetBackingSize;
                        if (targetOffset >= backingEnd) skip = true;
                        else if (targetOffset + length > backingEnd) length = backingEnd - targetOffset;
                    }
                }
                else
                {
                    // One block-status extent at a time, as qemu-img goes: sparse detection then sees the data of
                    // one extent, and a zero extent is not read at all.
                    var ext = ChainStatus.Get(source, offset, source.Size - offset);
                    length = ext.Length;
                    kind = ext.Zero ? WorkKind.Zero : WorkKind.Data;
                }
                if (length <= 0) throw new BlockException("block status returned an empty extent");
                if (!skip)
                    for (long pos = 0; pos < length; pos += chunk)
                        yield return new WorkItem(targetOffset + pos, Math.Min(chunk, length - pos), kind);
                offset += length;
                targetOffset += length;
            }
        }
    }

    /// <summary>Compressed clusters are written whole: target clusters, across source boundaries. A cluster is
    /// zero (or, with a backing file, left to it) only if it is so throughout; anything mixed is read as data.</summary>
    private static IEnumerable<WorkItem> PlanClusters(IReadOnlyList<BlockImage> sources, ConvertOptions options, int cluster)
    {
        long total = sources.Sum(s => s.Size);
        for (long t = 0; t < total; t += cluster)
        {
            long length = Math.Min(cluster, total - t);
            LayerState? common = null;
            bool mixed = false;
            foreach (var (source, offset, n) in Pieces(sources, t, length))
            {
                for (long pos = offset; !mixed && pos < offset + n;)
                {
                    LayerState state;
                    long extent;
                    if (options.TargetHasBacking)
                    {
                        var ext = source.GetLayerStatus(pos, offset + n - pos);
                        (state, extent) = (ext.State, ext.Length);
                    }
                    else
                    {
                        var ext = ChainStatus.Get(source, pos, offset + n - pos);
                        (state, extent) = (ext.Zero ? LayerState.Zero : LayerState.Data, ext.Length);
                    }
                    mixed = common is { } c && c != state;
                    common = state;
                    pos += extent;
                }
            }
            var kind = mixed || common != LayerState.Zero && common != LayerState.Unallocated ? WorkKind.Data
                : common == LayerState.Zero ? WorkKind.Zero : (WorkKind?)null;
            // Past the end of the target's backing file a zero cluster is left as it is: it reads zeros already.
            if (kind == WorkKind.Zero && options.TargetHasBacking && options.TargetBackingSize >= 0 && t >= options.TargetBackingSize) kind = null;
            if (kind is { } k) yield return new WorkItem(t, length, k);
        }
    }

    /// <summary>The (source, offset in it, length) pieces of a target range.</summary>
    private static IEnumerable<(BlockImage Source, long Offset, long Length)> Pieces(IReadOnlyList<BlockImage> sources, long targetOffset, long length)
    {
        long start = 0;
        foreach (var source in sources)
        {
            long end = start + source.Size;
            if (targetOffset < end && length > 0)
            {
                long n = Math.Min(length, end - targetOffset);
                yield return (source, targetOffset - start, n);
                targetOffset += n;
                length -= n;
            }
            start = end;
        }
    }

    private static void ReadSources(IReadOnlyList<BlockImage> sources, long targetOffset, Span<byte> span, ConvertOptions options)
    {
        int done = 0;
        foreach (var (source, offset, n) in Pieces(sources, targetOffset, span.Length))
        {
            ReadSource(source, offset, span.Slice(done, (int)n), options);
            done += (int)n;
        }
    }

    private static void ReadSource(BlockImage source, long offset, Span<byte> span, ConvertOptions options)
    {
        if (!options.Salvage)
        {
            source.Read(offset, span);
            return;
        }
        try
        {
            source.Read(offset, span);
        }
        catch (BlockException)
        {
            // Sector by sector: what cannot be read is copied as zeros.
            for (int pos = 0; pos < span.Length; pos += 512)
            {
                var sector = span.Slice(pos, Math.Min(512, span.Length - pos));
                try
                {
                    source.Read(offset + pos, sector);
                }
                catch (BlockException e)
                {
                    options.Warn?.Invoke($"error while reading offset {offset + pos}: {e.Message}");
                    sector.Clear();
                }
            }
        }
    }

    private static void WriteOne(in WorkItem item, Span<byte> span, BlockImage target, ConvertOptions options)
    {
        if (item.Kind == WorkKind.Zero)
        {
            if (options.MinSparse != 0)
            {
                WriteZeroRange(target, item.TargetOffset, item.Length, options);
                return;
            }
            // -S 0: zeros are written as data, so the target ends up fully allocated.
            span.Clear();
        }
        if (options.Compress)
        {
            // Compressed clusters are written whole: only a cluster of nothing but zeros can be left out.
            if (options.MinSparse != 0 && span.IndexOfAnyExcept((byte)0) < 0)
            {
                WriteZeroRange(target, item.TargetOffset, item.Length, options);
                return;
            }
            if (item.TargetOffset % target.ClusterSize == 0)
            {
                target.WriteCompressed(item.TargetOffset, span);
                return;
            }
        }
        if (options.MinSparse == 0)
        {
            target.Write(item.TargetOffset, span);
            return;
        }
        for (int pos = 0; pos < span.Length;)
        {
            int run = SparseDetection.NextRun(span[pos..], item.TargetOffset + pos, options.MinSparse, out bool data);
            if (data) target.Write(item.TargetOffset + pos, span.Slice(pos, run));
            else WriteZeroRange(target, item.TargetOffset + pos, run, options);
            pos += run;
        }
    }

    /// <summary>Makes a target range read as zeros: nothing to do on a fresh target without a backing file.</summary>
    private static void WriteZeroRange(BlockImage target, long offset, long length, ConvertOptions options)
    {
        if (options.TargetIsZeroed && !options.TargetHasBacking) return;
        target.WriteZeroes(offset, length, mayUnmap: true);
    }
}

/// <summary>
/// qemu-img convert's sparse detection (-S): which leading part of a buffer is written as data and which is left
/// as a hole. Zero runs shorter than the minimum are written with the data around them, and run ends are moved to
/// the alignment grid so that writes avoid read-modify-write cycles.
/// </summary>
public static class SparseDetection
{
    private const int Sector = 512;

    /// <summary>Length in bytes of the run at the start of <paramref name="buffer"/> (which starts at target offset
    /// <paramref name="offset"/>, sector aligned), and whether it is written as data.</summary>
    public static int NextRun(ReadOnlySpan<byte> buffer, long offset, int minSparse, out bool data)
    {
        int sectors = (buffer.Length + Sector - 1) / Sector;
        long sector = offset / Sector;
        int minSectors = Math.Max(1, Math.Min(minSparse / Sector, sectors));
        int alignment = 1 << System.Numerics.BitOperations.Log2((uint)Math.Max(1, minSparse / Sector));
        int used = SameRun(buffer, 0, sectors, sector, alignment, out bool first);
        data = first;
        if (!first) return ToBytes(used, buffer.Length);
        int checkedSectors = used;
        while (checkedSectors < sectors)
        {
            int run = SameRun(buffer, checkedSectors, sectors, sector + checkedSectors, alignment, out bool isData);
            checkedSectors += run;
            if (isData) used = checkedSectors;
            else if (run >= minSectors) break;
        }
        return ToBytes(used, buffer.Length);
    }

    private static int ToBytes(int sectors, int limit) => (int)Math.Min((long)sectors * Sector, limit);

    /// <summary>Sectors from <paramref name="start"/> that are all zero or all not, the end moved onto the alignment
    /// grid: a data run grows to the next boundary, a zero run shrinks to the previous one (or becomes data when
    /// that would leave nothing).</summary>
    private static int SameRun(ReadOnlySpan<byte> buffer, int start, int sectors, long sector, int alignment, out bool data)
    {
        int n = sectors - start;
        bool zero = IsZeroSector(buffer, start);
        int i = 1;
        while (i < n && IsZeroSector(buffer, start + i) == zero) i++;
        if (i < n)
        {
            int tail = (int)((sector + i) & (alignment - 1));
            if (tail != 0)
            {
                if (zero && i <= tail) zero = false;
                i = zero ? i - tail : Math.Min(i + alignment - tail, n);
            }
        }
        data = !zero;
        return i;
    }

    private static bool IsZeroSector(ReadOnlySpan<byte> buffer, int sector)
    {
        int from = sector * Sector;
        return buffer.Slice(from, Math.Min(Sector, buffer.Length - from)).IndexOfAnyExcept((byte)0) < 0;
    }
}
