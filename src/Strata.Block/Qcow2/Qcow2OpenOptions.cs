namespace Strata.Block.Qcow2;

/// <summary>Options for opening a qcow2 image.</summary>
public sealed record Qcow2OpenOptions
{
    /// <summary>Bytes of L2 tables kept in memory.</summary>
    public long L2CacheBytes { get; init; } = 32L << 20;

    /// <summary>False when the host file belongs to another node (a daemon's "file" node).</summary>
    public bool OwnsFile { get; init; } = true;

    /// <summary>Open read-only even though the host file is writable.</summary>
    public bool ReadOnly { get; init; }

    /// <summary>The external data file to use instead of the one the header names (a data-file child).</summary>
    public HostFile? DataFile { get; init; }

    /// <summary>False when the data file belongs to another node (a daemon's data-file child); the image then
    /// neither closes it nor locks it.</summary>
    public bool OwnsDataFile { get; init; } = true;

    /// <summary>Opens the data file the header names when no <see cref="DataFile"/> is given (a daemon makes it a
    /// node of its graph, as QEMU does); the image does not own what it returns. Null: the image opens it itself.</summary>
    public Func<string, HostFile>? OpenDataFileByName { get; init; }

    /// <summary>The image locks an owned data file takes: what the image's users take, passed through
    /// (<see cref="LockClaim.Qcow2DataFile"/>).</summary>
    public LockClaim DataFileLockClaim { get; init; } = LockClaim.None;

    /// <summary>Do not open the header's data file (qemu-img info: metadata only, no guest I/O).</summary>
    public bool WithoutDataFile { get; init; }

    /// <summary>Opened by <c>check</c> (QEMU's BDRV_O_CHECK): a dirty or corrupt image is opened as it is, for the
    /// check to report and repair, instead of being repaired on open or refused.</summary>
    public bool ForCheck { get; init; }

    /// <summary>Track the persistent bitmaps crash-safely with a write-intent record (a read-write open only): after
    /// a crash the next open loads them as a superset of the truth instead of inconsistent.</summary>
    public bool CrashSafeBitmaps { get; init; }

    /// <summary>With crash-safe tracking, checkpoint on the image's own schedule (region budget, idle, every 30 s).
    /// Off, checkpoints happen only when asked for (<c>CheckpointBitmaps</c>, a bitmap change, close): for tests that
    /// must know exactly which checkpoint a write fell after, however slowly the machine runs.</summary>
    public bool ScheduledCheckpoints { get; init; } = true;

    /// <summary>Looks up the key secret of an encrypted image (encrypt.key-secret), null when none was named; called
    /// only when guest data is first needed.</summary>
    public Func<byte[]>? KeySecret { get; init; }
}
