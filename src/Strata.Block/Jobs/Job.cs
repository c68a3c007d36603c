namespace Strata.Block.Jobs;

/// <summary>QEMU's JobStatus (wire names in <see cref="JobTables.Name"/>).</summary>
public enum JobStatus { Undefined, Created, Running, Paused, Ready, Standby, Waiting, Pending, Aborting, Concluded, Null }

/// <summary>Job verbs a user may send.</summary>
public enum JobVerb { Cancel, Pause, Resume, SetSpeed, Complete, Finalize, Dismiss }

/// <summary>QEMU's job transition and verb tables (job.c JobSTT / JobVerbTable), as data.</summary>
public static class JobTables
{
    // Rows: from-state; columns: to-state, in the order of JobStatus (U C R P Y S W D X E N, as QEMU's job.c names them).
    private static readonly string[] Transitions =
    [
        ".1.........", // undefined
        "..1.....1.1", // created
        "...11.1.1..", // running
        "..1........", // paused
        ".....11.1..", // ready
        "....1......", // standby
        ".......11..", // waiting
        "........11.", // pending
        "........11.", // aborting
        "..........1", // concluded
        "...........", // null
    ];

    // Rows: verbs in JobVerb order; columns: states.
    private static readonly string[] Verbs =
    [
        ".1111111...", // cancel
        ".11111.....", // pause
        ".11111.....", // resume
        ".11111.....", // set-speed
        "....1......", // complete
        ".......1...", // finalize
        ".........1.", // dismiss
    ];

    public static bool CanTransition(JobStatus from, JobStatus to) => Transitions[(int)from][(int)to] == '1';

    public static bool Allows(JobVerb verb, JobStatus state) => Verbs[(int)verb][(int)state] == '1';

    public static string Name(JobStatus s) => s.ToString().ToLowerInvariant();

    public static string Name(JobVerb v) => v switch
    {
        JobVerb.SetSpeed => "set-speed",
        _ => v.ToString().ToLowerInvariant(),
    };
}

/// <summary>
/// A long-running operation with QEMU's life cycle: created → running ⇄ paused → (ready) → waiting → pending →
/// concluded → null, or → aborting on failure and cancel. Subclasses do the work in <see cref="RunAsync"/> and
/// settle their effects in <see cref="Commit"/> / <see cref="Abort"/>.
/// </summary>
public abstract class Job
{
    protected Job(string id, string type, bool autoFinalize, bool autoDismiss)
    {
        Id = id;
        Type = type;
        AutoFinalize = autoFinalize;
        AutoDismiss = autoDismiss;
    }

    public string Id { get; }
    public string Type { get; }
    public bool AutoFinalize { get; }
    public bool AutoDismiss { get; }
    public JobStatus Status { get; internal set; } = JobStatus.Undefined;
    public string? Error { get; internal set; }
    public long Speed { get; internal set; }
    public bool IsCancelled => Cancellation.IsCancellationRequested;
    /// <summary>A block job (backup, mirror…): the block-job-* commands and query-block-jobs see it, and its events
    /// are reported as block job events too.</summary>
    public virtual bool IsBlockJob => false;

    private long _progress, _total;
    public long Progress => Interlocked.Read(ref _progress);
    public long Total => Interlocked.Read(ref _total);
    protected void SetTotal(long total) => Interlocked.Exchange(ref _total, total);
    protected void AddProgress(long delta) => Interlocked.Add(ref _progress, delta);

    internal CancellationTokenSource Cancellation { get; } = new();
    /// <summary>Set while the job is stopped by an I/O error (on-*-error=stop): query-block-jobs io-status "failed".</summary>
    internal bool IoFailed { get; set; }
    /// <summary>Installed by the manager: report an I/O error, and with "stop" pause the job until it is resumed.</summary>
    internal Action<string, string>? ReportIoError { get; set; }
    internal JobGroup? Group { get; set; }
    internal int UserPauses { get; set; }
    internal TaskCompletionSource ResumeSignal { get; set; } = CompletedSignal();
    internal bool Started { get; set; }
    /// <summary>Waiting for its rate limit (QEMU's job sleeps then, and reports busy: false).</summary>
    internal volatile bool Sleeping;
    /// <summary>Installed by the manager: the job reached the ready state.</summary>
    internal Action? ReportReady { get; set; }

    /// <summary>Jobs with a ready state (mirror) take job-complete, and a soft cancel once ready.</summary>
    protected internal virtual bool SupportsComplete => false;

    /// <summary>job-complete (pivot: true), or block-job-cancel without force once ready (pivot: false): finish
    /// successfully — with or without switching over to the target.</summary>
    protected internal virtual void OnComplete(bool pivot) { }

    /// <summary>The job calls this when its copy has caught up: running becomes ready.</summary>
    protected void BecomeReady() => ReportReady?.Invoke();

    internal static TaskCompletionSource CompletedSignal()
    {
        var t = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        t.SetResult();
        return t;
    }

    /// <summary>The work. Throw (or return after a cancellation) to fail.</summary>
    protected internal abstract Task RunAsync(CancellationToken cancellationToken);

    /// <summary>Threads for the jobs' copies: blocking image I/O off the .NET thread pool, and apart from the guests'
    /// block I/O threads, since a guest write may wait for a copy (copy-before-write) and must never be what a copy
    /// waits for a thread behind. Not capped low: the copies in flight are already bounded (workers per job), and a
    /// backup's copies wait for each other's turn, which a queue behind a full set of threads could never give.</summary>
    private static readonly BlockIoThreads CopyThreads = new("strata-job", minThreads: 0, maxThreads: 1024, TimeSpan.FromSeconds(10));

    /// <summary>Runs one copy of the job on a copy thread, inside the graph (it passes drained gates: it was taken
    /// before the drain, and a guest write the drain waits for may be waiting for it).</summary>
    protected static Task CopyInsideGraphAsync(Action copy) => CopyThreads.RunAsync(() =>
    {
        using var inside = NodeRequests.Internal();
        copy();
    });

    /// <summary>Pause point: jobs call it between units of work.</summary>
    protected Task PausePointAsync() => ResumeSignal.Task;

    /// <summary>Tells the manager about an I/O error the job will retry: <paramref name="action"/> is "stop"
    /// (pause until job-resume) or "ignore" (just report).</summary>
    protected void IoError(string operation, string action) => ReportIoError?.Invoke(operation, action);

    /// <summary>Success of the whole group: make the result permanent.</summary>
    protected internal virtual void Commit() { }

    /// <summary>Failure or cancel of the group: undo, keep nothing half done.</summary>
    protected internal virtual void Abort() { }

    /// <summary>Always, after commit or abort: release nodes and filters.</summary>
    protected internal virtual void Clean() { }
}

/// <summary>Jobs started together by a transaction with completion-mode=grouped (or one job alone).</summary>
public sealed class JobGroup
{
    internal List<Job> Jobs { get; } = new();
    internal bool Failed { get; set; }
}
