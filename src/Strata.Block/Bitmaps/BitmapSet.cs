using System.Text;

namespace Strata.Block.Bitmaps;

/// <summary>
/// The dirty bitmaps of one node, with QEMU's rules for what each state allows (qemu-spec §2.4) and the
/// successor mechanism jobs use (BitmapSet.Successors.cs). Writes to the node call <see cref="MarkDirty"/> before
/// they are acknowledged.
/// </summary>
public sealed partial class BitmapSet
{
    private readonly object _lock = new();
    private readonly List<DirtyBitmap> _bitmaps = new();
    private readonly List<InternalBitmap> _internal = new();
    private long _sequence;

    public BitmapSet(long diskSize, long defaultGranularity)
    {
        DiskSize = diskSize;
        DefaultGranularity = defaultGranularity;
    }

    public long DiskSize { get; private set; }
    public long DefaultGranularity { get; }

    /// <summary>Checks a persistent bitmap can be stored; returns an error message or null. Set by the format driver.</summary>
    public Func<string, long, string?>? PersistenceCheck { get; set; }

    /// <summary>Called after any change that a persistent copy must follow (add, remove, clear, enable, disable,
    /// merge, a job's outcome).</summary>
    public Action? Changed { get; set; }

    /// <summary>Newest first, as QEMU lists them (bitmaps loaded from an image count as created in directory order).</summary>
    public IReadOnlyList<DirtyBitmap> All
    {
        get { lock (_lock) return _bitmaps.OrderByDescending(b => b.Sequence).ToArray(); }
    }

    /// <summary>What query-named-block-nodes lists: the named bitmaps and the anonymous ones jobs and filters keep
    /// (successors, copy maps), newest first — QEMU 7.2 lists both, the anonymous ones without a name.</summary>
    public IReadOnlyList<ListedBitmap> Listed
    {
        get
        {
            lock (_lock)
                return _bitmaps.Select(b => (b.Sequence, new ListedBitmap(b.Name, b.Recording, b.Persistent, b.Busy, b.Granularity, b.CountBytes, b.Inconsistent)))
                    .Concat(_internal.Select(i => (i.Sequence, new ListedBitmap(null, i.Recording, false, false, i.Granularity, i.CountBytes, false))))
                    .OrderByDescending(x => x.Item1).Select(x => x.Item2).ToArray();
        }
    }

    /// <summary>Lists an anonymous bitmap of a job or filter (it cannot be addressed by any command).</summary>
    public void AddInternal(InternalBitmap bitmap)
    {
        lock (_lock)
        {
            bitmap.Sequence = ++_sequence;
            _internal.Add(bitmap);
        }
    }

    public void RemoveInternal(InternalBitmap? bitmap)
    {
        if (bitmap is null) return;
        lock (_lock) _internal.Remove(bitmap);
    }

    public bool HasPersistent
    {
        get { lock (_lock) return _bitmaps.Any(b => b.Persistent); }
    }

    /// <summary>The default granularity for a node: its cluster size clamped to 4 KiB..64 KiB (64 KiB without clusters).</summary>
    public static long DefaultGranularityFor(int clusterSize) => clusterSize <= 0 ? 65536 : Math.Clamp(clusterSize, 4096, 65536);

    public DirtyBitmap? Find(string name)
    {
        lock (_lock) return _bitmaps.FirstOrDefault(b => b.Name == name);
    }

    public DirtyBitmap Get(string name) => Find(name) ?? throw new BitmapException($"Dirty bitmap '{name}' not found");

    /// <summary>block-dirty-bitmap-add.</summary>
    public DirtyBitmap Add(string name, long? granularity = null, bool persistent = false, bool disabled = false)
    {
        if (string.IsNullOrEmpty(name)) throw new BitmapException("Bitmap name cannot be empty");
        if (Encoding.UTF8.GetByteCount(name) > DirtyBitmap.MaxNameBytes) throw new BitmapException($"Bitmap name too long: {name}");
        long g = granularity ?? DefaultGranularity;
        if (g < 512 || (g & (g - 1)) != 0 || g > 1L << 31) throw new BitmapException("Granularity must be power of 2 and at least 512");
        lock (_lock)
        {
            if (_bitmaps.Any(b => b.Name == name)) throw new BitmapException($"Bitmap already exists: {name}");
            if (persistent)
            {
                string? error = PersistenceCheck is null ? "Operation not supported" : PersistenceCheck(name, g);
                if (error is not null) throw new BitmapException(error);
            }
            var bitmap = new DirtyBitmap(name, g, DiskSize, enabled: !disabled) { Persistent = persistent, Sequence = ++_sequence };
            _bitmaps.Add(bitmap);
            Changed?.Invoke();
            return bitmap;
        }
    }

    internal void RemoveLoaded(DirtyBitmap bitmap)
    {
        lock (_lock) _bitmaps.Remove(bitmap);
    }

    /// <summary>Adds a bitmap loaded from an image (keeps the image's order: appended).</summary>
    internal void AddLoaded(DirtyBitmap bitmap)
    {
        lock (_lock)
        {
            bitmap.Sequence = ++_sequence;
            _bitmaps.Add(bitmap);
        }
    }

    private static void CheckUsable(DirtyBitmap b, bool allowReadOnly)
    {
        if (b.Busy || b.Successor is not null) throw new BitmapException($"Bitmap '{b.Name}' is currently in use by another operation and cannot be used");
        if (b.Inconsistent) throw new BitmapException($"Bitmap '{b.Name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
        if (!allowReadOnly && b.ReadOnly) throw new BitmapException($"Bitmap '{b.Name}' is readonly and cannot be modified");
    }

    /// <summary>block-dirty-bitmap-remove: allowed on inconsistent bitmaps, refused on busy or read-only ones.</summary>
    public void Remove(string name)
    {
        lock (_lock)
        {
            var b = Get(name);
            if (b.Busy || b.Successor is not null) throw new BitmapException($"Bitmap '{name}' is currently in use by another operation and cannot be used");
            if (b.ReadOnly) throw new BitmapException($"Bitmap '{name}' is readonly and cannot be modified");
            _bitmaps.Remove(b);
            Changed?.Invoke();
        }
    }

    public void Clear(string name)
    {
        lock (_lock)
        {
            var b = Get(name);
            CheckUsable(b, allowReadOnly: false);
            b.Bits.Clear();
            Changed?.Invoke();
        }
    }

    /// <summary>block-dirty-bitmap-enable (allowed on read-only bitmaps, as in QEMU; idempotent).</summary>
    public void Enable(string name)
    {
        lock (_lock)
        {
            var b = Get(name);
            CheckUsable(b, allowReadOnly: true);
            b.Enabled = true;
            Changed?.Invoke();
        }
    }

    public void Disable(string name)
    {
        lock (_lock)
        {
            var b = Get(name);
            CheckUsable(b, allowReadOnly: true);
            b.Enabled = false;
            Changed?.Invoke();
        }
    }

    /// <summary>block-dirty-bitmap-merge: target |= every source. On error the target is unchanged.</summary>
    public void Merge(string target, IReadOnlyList<DirtyBitmap> sources)
    {
        if (sources.Count == 0) throw new BitmapException("At least one source bitmap is required");
        lock (_lock)
        {
            var t = Get(target);
            CheckUsable(t, allowReadOnly: false);
            foreach (var s in sources)
            {
                if (s.Busy || (s.Successor is not null && !ReferenceEquals(s, t)))
                    throw new BitmapException($"Bitmap '{s.Name}' is currently in use by another operation and cannot be used");
                if (s.Inconsistent) throw new BitmapException($"Bitmap '{s.Name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
                if (s.DiskSize != t.DiskSize)
                    throw new BitmapException($"Bitmaps are of different sizes (destination size is {t.DiskSize}, source size is {s.DiskSize}) and can't be merged");
            }
            // Every check is done: merging cannot fail from here on, so the target is changed in place.
            foreach (var s in sources) t.MergeFrom(s);
            Changed?.Invoke();
        }
    }

    /// <summary>A bitmap arriving by migration: created busy (no command may use it) and, if it was recording on the
    /// source, recording writes here from now on; its old bits follow with <see cref="FinishImport"/>.</summary>
    public DirtyBitmap BeginImport(string name, long granularity, bool persistent, bool recording)
    {
        var b = Add(name, granularity, persistent, disabled: !recording);
        lock (_lock) b.Busy = true;
        return b;
    }

    /// <summary>The source's bits were merged in: the bitmap is usable.</summary>
    public void FinishImport(DirtyBitmap b)
    {
        lock (_lock) b.Busy = false;
        Changed?.Invoke();
    }

    /// <summary>The source's bits cannot be had: the bitmap is inconsistent (never silently incomplete); only
    /// remove is allowed on it, as for a bitmap found in use after a crash.</summary>
    public void FailImport(DirtyBitmap b)
    {
        lock (_lock)
        {
            b.Busy = false;
            b.Inconsistent = true;
            b.Enabled = false;
        }
        Changed?.Invoke();
    }

    /// <summary>Crash-safe tracking of the persistent bitmaps (null when off): regions are recorded durably before
    /// their first write since the last checkpoint.</summary>
    public WriteIntentLog? Intents { get; set; }

    /// <summary>Every write to the node: set the bits of each recording bitmap (successors included). With
    /// crash-safe tracking the write's regions are durably recorded first, in the epoch the bits are set in: a
    /// checkpoint that began meanwhile has snapshotted without this write, so it is recorded again.</summary>
    public void MarkDirty(long offset, long length)
    {
        var intents = Intents;
        while (true)
        {
            long epoch = intents?.MakeDurable(offset, length) ?? 0;
            lock (_lock)
            {
                if (intents is not null && intents.Epoch != epoch) continue;
                foreach (var b in _bitmaps)
                {
                    if (b.Enabled && !b.Inconsistent) b.MarkDirty(offset, length);
                    if (b.Successor is { Enabled: true } s) s.MarkDirty(offset, length);
                }
                return;
            }
        }
    }

    /// <summary>The persistent bitmaps as a checkpoint stores them (oldest first), taken in one step with
    /// <paramref name="atSnapshot"/> (which starts the intent log's next epoch): a frozen bitmap is stored with its
    /// successor's bits too, a superset of what it will hold whichever way its job ends.</summary>
    public IReadOnlyList<PersistentBitmapSnapshot> SnapshotPersistent(Action<bool> atSnapshot)
    {
        lock (_lock)
        {
            var list = new List<PersistentBitmapSnapshot>();
            foreach (var b in _bitmaps.Where(b => b.Persistent).OrderBy(b => b.Sequence))
            {
                HierarchicalBitmap? bits = null;
                if (!b.Inconsistent)
                {
                    bits = b.Bits.Clone();
                    if (b.Successor is { } s) bits.Merge(s.Bits);
                }
                list.Add(new PersistentBitmapSnapshot(b.Name!, b.Granularity, b.Enabled || b.Successor is { Enabled: true }, b.Inconsistent, bits));
            }
            atSnapshot(list.Any(s => s.Recording && !s.Inconsistent));
            return list;
        }
    }

    /// <summary>Marks a bitmap of any node busy (exports may name bitmaps on other nodes).</summary>
    public void SetBusyAnywhere(DirtyBitmap bitmap, bool busy) => SetBusy(bitmap, busy);

    /// <summary>Marks a bitmap in use by an export or a job (or releases it).</summary>
    public void SetBusy(DirtyBitmap bitmap, bool busy)
    {
        lock (_lock)
        {
            if (busy)
            {
                if (bitmap.Busy || bitmap.Successor is not null)
                    throw new BitmapException($"Bitmap '{bitmap.Name}' is currently in use by another operation and cannot be used");
                if (bitmap.Inconsistent)
                    throw new BitmapException($"Bitmap '{bitmap.Name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
            }
            bitmap.Busy = busy;
        }
    }

    /// <summary>A qcow2 image resizes its persistent bitmaps with the disk, but only those it can rewrite: a busy,
    /// inconsistent or read-only one refuses the resize, in QEMU's words.</summary>
    public void CheckResizeAllowed()
    {
        lock (_lock)
            foreach (var b in _bitmaps.Where(b => b.Persistent))
                CheckUsable(b, allowReadOnly: false);
    }

    /// <summary>The disk changed size: every bitmap follows, keeping the bits of what is left (QEMU truncates its
    /// bitmaps the same way; a regrown tail starts clean).</summary>
    internal void Resized(long newSize)
    {
        lock (_lock)
        {
            DiskSize = newSize;
            foreach (var b in _bitmaps)
            {
                b.Resize(newSize);
                b.Successor?.Resize(newSize);
            }
        }
    }
}

/// <summary>A persistent bitmap as a checkpoint writes it: its bits (null when inconsistent: they were never
/// loaded) and whether it records writes.</summary>
public sealed record PersistentBitmapSnapshot(string Name, long Granularity, bool Recording, bool Inconsistent, HierarchicalBitmap? Bits);

/// <summary>One entry of a node's dirty-bitmaps list (BlockDirtyInfo); Name is null for anonymous ones.</summary>
public sealed record ListedBitmap(string? Name, bool Recording, bool Persistent, bool Busy, long Granularity, long CountBytes, bool Inconsistent);

/// <summary>A bitmap a job or filter keeps for its own use; only listed, never addressed.</summary>
public sealed class InternalBitmap(long granularity, Func<long> countBytes, Func<bool> recording)
{
    public long Granularity { get; } = granularity;
    public long CountBytes => countBytes();
    public bool Recording => recording();
    internal long Sequence { get; set; }
}
