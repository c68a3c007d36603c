namespace Strata.Block.Bitmaps;

/// <summary>
/// The in-memory side of crash-safe bitmap tracking, in the manner of md-raid's write-intent bitmap: the disk is cut
/// into coarse regions, and before the first write to a region since the last checkpoint of the bitmaps that region
/// is recorded durably (<see cref="Persist"/>: a write of the record and an fsync). After a crash the bitmaps are
/// the checkpoint's bits ∪ the recorded regions: a superset of the truth.
///
/// An <em>epoch</em> runs from one checkpoint to the next. A checkpoint snapshots the bits and starts a new epoch in
/// one step (<see cref="BeginEpoch"/>, under the bitmap set's lock), so every write is either in the snapshot or
/// recorded in the new epoch. Until the checkpoint's header names the new record (<see cref="Commit"/>), the record
/// on disk still belongs to the old checkpoint, so regions recorded meanwhile are written into it together with the
/// old epoch's regions.
///
/// Hot regions stay recorded, as md-raid clears its bits lazily: a new epoch starts with the regions written in both
/// of the two epochs before already recorded, so a guest's hot data costs no fsync once it is known to be hot, while
/// a region written once (a burst across the disk) is dropped at the next checkpoint and does not inflate what a
/// crash makes the next backup copy.
///
/// Concurrent first writes share one fsync (group commit): a writer adds its regions to the pending set, then takes
/// the persist lock; whoever holds it writes every pending region, so the writers queued behind it find theirs
/// already durable.
/// </summary>
public sealed class WriteIntentLog
{
    private readonly object _persistLock = new();
    private readonly object _pendingLock = new();
    private readonly Action<byte[]> _persist;
    private ulong[] _durable;
    private ulong[] _pending;
    /// <summary>The regions of the epoch before, while the record on disk still belongs to it.</summary>
    private ulong[]? _carried;
    /// <summary>Regions written to in this epoch (recorded or not yet): the next epoch starts with them recorded.</summary>
    private ulong[] _touched;
    private ulong[] _touchedBefore;
    private long _epoch;
    private volatile bool _active;
    private int _markedCount;

    /// <param name="diskSize">The disk's size: the number of regions follows from it.</param>
    /// <param name="regionBits">log2 of the region size.</param>
    /// <param name="persist">Writes the record's region bits (bit i of byte i/8, LSB first) and makes them durable.
    /// Called under the persist lock, never concurrently.</param>
    public WriteIntentLog(long diskSize, int regionBits, Action<byte[]> persist)
    {
        RegionBits = regionBits;
        Regions = (diskSize + (1L << regionBits) - 1) >> regionBits;
        _persist = persist;
        _durable = new ulong[(Regions + 63) / 64];
        _pending = new ulong[_durable.Length];
        _touched = new ulong[_durable.Length];
        _touchedBefore = new ulong[_durable.Length];
    }

    public int RegionBits { get; }
    public long Regions { get; }
    public long RegionSize => 1L << RegionBits;

    /// <summary>The current epoch; a write whose regions were made durable in another epoch must ask again.</summary>
    public long Epoch => Volatile.Read(ref _epoch);

    /// <summary>Regions newly recorded in this epoch (beyond those carried in as still being written).</summary>
    public int MarkedCount => Volatile.Read(ref _markedCount);

    /// <summary>When the last write asked (Environment.TickCount64): a checkpoint waits for a quiet moment.</summary>
    public long LastWriteTicks => Volatile.Read(ref _lastWriteTicks);
    private long _lastWriteTicks;

    /// <summary>Record writes made durable so far (each one an fsync).</summary>
    public long Persists { get; private set; }

    /// <summary>Called (outside every lock) after a write recorded a new region; the owner decides whether a
    /// checkpoint is due.</summary>
    public Action? RegionRecorded { get; set; }

    /// <summary>
    /// Returns once every region of [offset, offset+length) is durably recorded in the epoch it returns (at once
    /// when it already was, or when no persistent bitmap records writes in this epoch).
    /// </summary>
    public long MakeDurable(long offset, long length)
    {
        long epoch = Epoch;
        Volatile.Write(ref _lastWriteTicks, Environment.TickCount64);
        if (!_active || length <= 0) return epoch;
        long first = offset >> RegionBits, last = Math.Min((offset + length - 1) >> RegionBits, Regions - 1);
        var touched = Volatile.Read(ref _touched);
        for (long r = first; r <= last; r++)
        {
            ulong bit = 1UL << (int)(r & 63);
            if ((Volatile.Read(ref touched[r >> 6]) & bit) == 0) Interlocked.Or(ref touched[r >> 6], bit);
        }
        if (AllSet(Volatile.Read(ref _durable), first, last)) return epoch;
        lock (_pendingLock) SetRange(_pending, first, last);
        bool recorded = false;
        lock (_persistLock)
        {
            epoch = _epoch;
            if (_active && !AllSet(_durable, first, last))
            {
                // Another epoch began while this writer queued: its pending bits went with it; record them again.
                lock (_pendingLock) SetRange(_pending, first, last);
                PersistPendingLocked();
                recorded = true;
            }
        }
        if (recorded) RegionRecorded?.Invoke();
        return epoch;
    }

    /// <summary>Writes the pending regions (with what the record on disk must keep) and marks them durable. Caller
    /// holds the persist lock.</summary>
    private void PersistPendingLocked()
    {
        ulong[] adding;
        lock (_pendingLock)
        {
            adding = _pending;
            _pending = new ulong[_durable.Length];
        }
        var next = (ulong[])_durable.Clone();
        int added = 0;
        for (int i = 0; i < next.Length; i++)
        {
            added += System.Numerics.BitOperations.PopCount(adding[i] & ~next[i]);
            next[i] |= adding[i];
        }
        if (added == 0) return;
        _persist(ToBytes(next, _carried));
        Persists++;
        Volatile.Write(ref _durable, next);
        Interlocked.Add(ref _markedCount, added);
    }

    /// <summary>
    /// Starts a new epoch: the caller snapshots the bits in the same step (holding the lock writers take to set
    /// them). <paramref name="active"/> says whether any persistent bitmap records writes in the new epoch; when none
    /// does, writes need no record.
    /// </summary>
    public void BeginEpoch(bool active)
    {
        lock (_persistLock)
        {
            _carried = _carried is null ? _durable : Or(_carried, _durable);
            // Regions written in this epoch and the one before stay recorded (they are hot: likely to be written
            // again). A write racing with this swap may be missed from `touched`, which only costs it a record write.
            var touched = Volatile.Read(ref _touched);
            Volatile.Write(ref _touched, new ulong[_durable.Length]);
            var stillWritten = new ulong[_durable.Length];
            for (int i = 0; i < stillWritten.Length; i++) stillWritten[i] = touched[i] & _touchedBefore[i] & _carried[i];
            _touchedBefore = touched;
            Volatile.Write(ref _durable, active ? stillWritten : new ulong[_durable.Length]);
            lock (_pendingLock) _pending = new ulong[_durable.Length];
            Volatile.Write(ref _markedCount, 0);
            _active = active;
            Interlocked.Increment(ref _epoch);
        }
    }

    /// <summary>
    /// The checkpoint's snapshot is stored: <paramref name="switchRecord"/> writes the header that names it together
    /// with a record holding this epoch's regions (given as bytes), and from then on the old epoch's regions are no
    /// longer needed. Runs under the persist lock so no record write interleaves.
    /// </summary>
    public void Commit(Action<byte[]> switchRecord)
    {
        lock (_persistLock)
        {
            switchRecord(ToBytes(_durable, null));
            _carried = null;
        }
    }

    /// <summary>Runs <paramref name="action"/> while no record write is in flight (for rewrites of the bytes that
    /// hold the record); the current record's bytes are passed in.</summary>
    public void WhileQuiet(Action<byte[]> action)
    {
        lock (_persistLock) action(ToBytes(_durable, _carried));
    }

    private static byte[] ToBytes(ulong[] words, ulong[]? also)
    {
        var bytes = new byte[words.Length * 8];
        for (int i = 0; i < words.Length; i++)
            System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(bytes.AsSpan(i * 8), words[i] | (also?[i] ?? 0));
        return bytes;
    }

    private static ulong[] Or(ulong[] a, ulong[] b)
    {
        var r = (ulong[])a.Clone();
        for (int i = 0; i < r.Length; i++) r[i] |= b[i];
        return r;
    }

    private static void SetRange(ulong[] words, long first, long last)
    {
        for (long r = first; r <= last; r++) words[r >> 6] |= 1UL << (int)(r & 63);
    }

    private static bool AllSet(ulong[] words, long first, long last)
    {
        for (long r = first; r <= last; r++)
            if ((words[r >> 6] & (1UL << (int)(r & 63))) == 0) return false;
        return true;
    }
}
