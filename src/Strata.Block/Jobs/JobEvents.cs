namespace Strata.Block.Jobs;

/// <summary>
/// What a <see cref="JobManager"/> reports about a job, raised in the order it happens (under the manager's lock, so
/// one job's events never interleave out of order). The daemon turns them into QMP events at its edge; the block
/// layer knows no event names.
/// </summary>
public abstract record JobEvent(Job Job);

/// <summary>The job moved to <paramref name="Status"/> (every transition of the state machine).</summary>
public sealed record JobStatusChanged(Job Job, JobStatus Status) : JobEvent(Job);

/// <summary>A copy met an I/O error on <paramref name="Operation"/>'s side ("read" or "write"); <paramref name="Action"/>
/// is what follows: "report" (the job fails), "stop" (paused until resumed) or "ignore" (retried at once).</summary>
public sealed record JobIoError(Job Job, string Operation, string Action) : JobEvent(Job);

/// <summary>A job without auto-finalize finished its work and waits for a finalize.</summary>
public sealed record JobPending(Job Job) : JobEvent(Job);

/// <summary>The job's copy caught up (mirror): it now keeps source and target in step. Progress as of the moment.</summary>
public sealed record JobReady(Job Job, long Length, long Offset, long Speed) : JobEvent(Job);

/// <summary>A started job concluded after it ran: successfully (<paramref name="Error"/> null) or failed.</summary>
public sealed record JobCompleted(Job Job, long Length, long Offset, long Speed, string? Error) : JobEvent(Job);

/// <summary>A started job concluded because it was cancelled (by a user, or by its group's failure).</summary>
public sealed record JobCancelled(Job Job, long Length, long Offset, long Speed) : JobEvent(Job);
