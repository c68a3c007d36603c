using Strata.Block.Bitmaps;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Crash-safe tracking of the persistent bitmaps. QEMU's rule stays on disk: while the image is open read-write every
/// bitmap entry is in_use, so QEMU (or a Strata without the record) sees an image we crashed with as inconsistent,
/// never as clean. Beside it lives Strata's write-intent record (<see cref="WriteIntentRecord"/>, in cluster 0, made
/// valid by a private autoclear bit that QEMU clears when it writes to the image). Checkpoints store the bitmaps
/// (still in_use) and an empty record; the first write to a region since then records the region durably before the
/// write is issued. Opening after a crash, the bitmaps are the checkpoint's bits ∪ the record's regions.
///
/// Checkpoints run when a bitmap changes (add, remove, enable, merge, a job's end…), when the regions newly recorded
/// pass a budget (at most every <see cref="MinCheckpointGapMs"/>: the over-copy after a crash is about that many
/// regions beyond those still being written), after a short idle time, and at the latest every
/// <see cref="MaxCheckpointIntervalMs"/>. A clean close stores the bitmaps as QEMU does and drops the record.
/// </summary>
public sealed partial class Qcow2Image
{
    /// <summary>Regions are at least 1 MiB; a larger disk gets larger regions so the record stays this small.</summary>
    private const int MinRegionBits = 20;
    private const int MaxRecordRegionBytes = 2048;
    private const int IdleCheckpointMs = 1000;
    /// <summary>Checkpoints for the budget come at most this often: each one costs a few fsyncs with the image's
    /// metadata held, and a workload spread over the whole disk would otherwise checkpoint nonstop.</summary>
    private const int MinCheckpointGapMs = 50;
    private const int MaxCheckpointIntervalMs = 30_000;

    private readonly bool _crashSafeRequested;
    private readonly bool _scheduledCheckpoints;
    private WriteIntentLog? _intents;
    private int _intentRecordOffset;
    private ulong _recordGeneration;
    /// <summary>The bitmap directory the record on disk belongs to (changes with the header that names it).</summary>
    private long _recordDirOffset;
    private readonly object _checkpointLock = new();
    private int _checkpointQueued;
    private long _lastCheckpointTicks;
    private Timer? _checkpointTimer;

    /// <summary>Persistent bitmaps are tracked crash-safely (the write-intent record is kept).</summary>
    public override bool BitmapsCrashSafe => _intents is not null;

    /// <summary>The bitmaps were completed from a write-intent record at open (Strata crashed with the image).</summary>
    public bool BitmapsRecoveredFromIntents { get; private set; }

    /// <summary>The write-intent log, for tests and figures (null when tracking is off).</summary>
    public WriteIntentLog? WriteIntents => _intents;

    private bool IntentRecordOnDisk => (_header.AutoclearFeatures & WriteIntentRecord.ValidBit) != 0;

    /// <summary>The record of the header, when it may be trusted for the bitmap directory at
    /// <paramref name="directoryOffset"/>: the autoclear bit is still set (nobody else wrote), the record is whole and
    /// belongs to that directory and to this disk size. Only a read-write open recovers: it stores what it recovered.</summary>
    private WriteIntentRecord? ValidIntentRecord(ulong directoryOffset)
    {
        if (!_writable || !IntentRecordOnDisk) return null;
        if (_extras.Find(WriteIntentRecord.ExtensionType) is not { } ext) return null;
        var record = WriteIntentRecord.TryParse(ext.Data);
        if (record is null || record.BitmapDirectoryOffset != directoryOffset) return null;
        if (record.Regions.Length != WriteIntentRecord.RegionBytesFor(Size, record.RegionBits)) return null;
        return record;
    }

    /// <summary>Adds the record's regions to every bitmap that was recording at the checkpoint.</summary>
    private void ApplyIntents(WriteIntentRecord record)
    {
        foreach (var b in Bitmaps.All.Where(b => b.Persistent && b.Enabled && !b.Inconsistent))
            foreach (var (offset, length) in record.MarkedRanges(Size))
                b.MarkDirty(offset, length);
        BitmapsRecoveredFromIntents = true;
        _bitmapsChanged = true;
    }

    /// <summary>Starts crash-safe tracking after a read-write open: the intent log, a first checkpoint when there are
    /// persistent bitmaps, and the timer for idle and periodic checkpoints.</summary>
    private void StartCrashSafeTracking()
    {
        if (!_crashSafeRequested || !_writable || _openedForCheck || _header.Version < 3) return;
        int regionBits = WriteIntentRecord.ChooseRegionBits(Size, MaxRecordRegionBytes, MinRegionBits);
        if (!RecordFitsInCluster0(regionBits)) return;
        _intents = NewIntentLog(regionBits);
        Bitmaps.Intents = _intents;
        if (_storedBitmaps.Count > 0 || Bitmaps.HasPersistent) CheckpointBitmaps();
        if (_scheduledCheckpoints)
            _checkpointTimer = new Timer(_ => OnCheckpointTimer(), null, MinCheckpointGapMs, MinCheckpointGapMs);
    }

    private WriteIntentLog NewIntentLog(int regionBits)
    {
        var log = new WriteIntentLog(Size, regionBits, PersistIntents);
        log.RegionRecorded = () =>
        {
            if (log.MarkedCount >= CheckpointBudget(log) && Environment.TickCount64 - _lastCheckpointTicks >= MinCheckpointGapMs)
                ScheduleCheckpoint();
        };
        return log;
    }

    /// <summary>Regions recorded before a checkpoint is due: 1 % of the disk's regions (at least 8), which bounds
    /// what a crash can make the next backup copy beyond what was written.</summary>
    private static long CheckpointBudget(WriteIntentLog log) => Math.Max(8, log.Regions / 100);

    private bool RecordFitsInCluster0(int regionBits)
    {
        var probe = WriteIntentRecord.Empty(0, Size, regionBits, 0);
        var exts = _extras.Extensions.Where(e => e.Type != WriteIntentRecord.ExtensionType)
            .Append(new Qcow2HeaderExtension(Qcow2ExtensionType.Bitmaps, new byte[24]))
            .Append(new Qcow2HeaderExtension(WriteIntentRecord.ExtensionType, probe.Encode()));
        try
        {
            Qcow2HeaderExtensionCodec.Build(_header, exts, _backingFile);
            return true;
        }
        catch (ImageFormatException)
        {
            return false;
        }
    }

    /// <summary>The intent log's write: the record, rewritten in place in cluster 0, then fsync — before the write
    /// that needed it is issued. Nothing to write while no record is on disk (no checkpoint yet, or a resize):
    /// the in_use entries then say "inconsistent" after a crash, which is safe.</summary>
    private void PersistIntents(byte[] regions)
    {
        if (!IntentRecordOnDisk) return;
        var record = CurrentIntentRecord(regions);
        _file.Write(_intentRecordOffset, record.Encode());
        _file.Flush();
    }

    private WriteIntentRecord CurrentIntentRecord(byte[] regions) =>
        new(_recordGeneration, _intents!.RegionBits, (ulong)_recordDirOffset, regions);

    /// <summary>Runs <paramref name="action"/> with no record write in flight.</summary>
    private void WhileNoIntentWrite(Action action)
    {
        if (_intents is { } intents) intents.WhileQuiet(_ => action());
        else action();
    }

    /// <summary>
    /// Stores the persistent bitmaps as they are now (in_use kept) with an empty record bound to them: after it a
    /// crash costs at most the regions written since. One at a time; writes go on meanwhile (those after the
    /// snapshot are recorded in the new epoch).
    /// </summary>
    public override void CheckpointBitmaps()
    {
        if (_intents is null) return;
        lock (_checkpointLock)
        lock (_lock)
        {
            if (_disposed || !_writable || _corrupt || _intents is not { } intents) return;
            var snapshot = Bitmaps.SnapshotPersistent(intents.BeginEpoch);
            _lastCheckpointTicks = Environment.TickCount64;
            if (snapshot.Count == 0 && _storedBitmaps.Count == 0 && !IntentRecordOnDisk) return;
            bool inUse = snapshot.Count > 0;
            WriteBitmapsLocked(snapshot, inUse, (exts, dirOffset) => intents.Commit(regions =>
            {
                var autoclear = _header.AutoclearFeatures & ~(Qcow2AutoclearFeatures.Bitmaps | WriteIntentRecord.ValidBit);
                if (dirOffset != 0) autoclear |= Qcow2AutoclearFeatures.Bitmaps | WriteIntentRecord.ValidBit;
                _header = _header with { AutoclearFeatures = autoclear };
                _recordGeneration++;
                _recordDirOffset = dirOffset;
                WriteCluster0(exts, dirOffset != 0 ? CurrentIntentRecord(regions) : null);
            }));
            _bitmapsMarkedInUse = inUse;
        }
    }

    /// <summary>A bitmap change made over QMP is on disk before the command returns (the daemon calls this).</summary>
    public override void PersistBitmapChanges()
    {
        if (_intents is not null && _bitmapsChanged) CheckpointBitmaps();
    }

    private void ScheduleCheckpoint()
    {
        if (_intents is null || !_scheduledCheckpoints || Interlocked.Exchange(ref _checkpointQueued, 1) != 0) return;
        ThreadPool.UnsafeQueueUserWorkItem(_ =>
        {
            Volatile.Write(ref _checkpointQueued, 0);
            try
            {
                CheckpointBitmaps();
            }
            catch (Exception e) when (e is BlockException or IOException)
            {
                // The header still names the previous checkpoint and its record, which keeps covering every write:
                // nothing is lost, the record just grows until a checkpoint succeeds.
                Console.Error.WriteLine($"strata: checkpoint of the bitmaps of '{_file.Path}' failed: {e.Message}");
            }
        }, null);
    }

    private void OnCheckpointTimer()
    {
        if (_intents is not { } intents || intents.MarkedCount == 0) return;
        long now = Environment.TickCount64;
        long sinceCheckpoint = now - _lastCheckpointTicks;
        if (now - intents.LastWriteTicks >= IdleCheckpointMs || sinceCheckpoint >= MaxCheckpointIntervalMs ||
            (intents.MarkedCount >= CheckpointBudget(intents) && sinceCheckpoint >= MinCheckpointGapMs))
            ScheduleCheckpoint();
    }

    /// <summary>Before a resize: the record's regions follow the old size, so it is dropped (in_use alone then says
    /// "inconsistent" after a crash) and a new log starts; a checkpoint re-establishes it. Caller holds the lock.</summary>
    private void SuspendIntentsForResize()
    {
        if (_intents is null) return;
        _intents.WhileQuiet(_ =>
        {
            if (!IntentRecordOnDisk) return;
            _header = _header with { AutoclearFeatures = _header.AutoclearFeatures & ~WriteIntentRecord.ValidBit };
            WriteCluster0(_extras.Extensions.Where(e => e.Type != WriteIntentRecord.ExtensionType).ToList(), null);
        });
    }

    /// <summary>After a resize: a log for the new size, and a checkpoint (not under the image lock).</summary>
    private void ResumeIntentsAfterResize()
    {
        if (_intents is null) return;
        _intents = NewIntentLog(WriteIntentRecord.ChooseRegionBits(Size, MaxRecordRegionBytes, MinRegionBits));
        Bitmaps.Intents = _intents;
        ScheduleCheckpoint();
    }

    /// <summary>At close: no more checkpoints; the close then stores the bitmaps cleanly and drops the record.</summary>
    private void StopCrashSafeTracking()
    {
        _checkpointTimer?.Dispose();
        _checkpointTimer = null;
        lock (_checkpointLock) { }
    }
}
