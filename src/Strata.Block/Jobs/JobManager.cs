using Strata.Formats.Json;

namespace Strata.Block.Jobs;

/// <summary>A refused job command; <see cref="DeviceNotActive"/> for the block-job-* family's unknown ids.</summary>
public sealed class JobException(string message, bool deviceNotActive = false) : BlockException(message)
{
    public bool DeviceNotActive { get; } = deviceNotActive;
}

/// <summary>
/// Runs jobs through QEMU's state machine, reporting every change (<see cref="JobStatusChanged"/>) and what
/// happens to a job along the way (<see cref="JobEvent"/>), finalizing groups together (a failure in one aborts the others).
/// </summary>
public sealed class JobManager
{
    private readonly object _lock = new();
    private readonly Dictionary<string, Job> _jobs = new(StringComparer.Ordinal);
    private readonly Action<JobEvent> _report;

    /// <param name="report">Called with every event, synchronously and under the manager's lock: it must not call back.</param>
    public JobManager(Action<JobEvent> report) => _report = report;

    public IReadOnlyList<Job> All
    {
        get { lock (_lock) return _jobs.Values.ToList(); }
    }

    /// <summary>Registers jobs (one group) in state created, then starts them all.</summary>
    public void Start(IReadOnlyList<Job> jobs)
    {
        var group = new JobGroup();
        lock (_lock)
        {
            foreach (var j in jobs)
            {
                if (string.IsNullOrEmpty(j.Id)) throw new JobException("Invalid job ID ''");
                if (_jobs.ContainsKey(j.Id) || jobs.Count(x => x.Id == j.Id) > 1) throw new JobException($"Job ID '{j.Id}' already in use");
            }
            foreach (var j in jobs)
            {
                var job = j;
                j.ReportIoError = (operation, action) => IoErrorStop(job, operation, action);
                j.ReportReady = () => Ready(job);
                j.Group = group;
                group.Jobs.Add(j);
                _jobs[j.Id] = j;
                Transition(j, JobStatus.Created);
            }
        }
        foreach (var j in jobs) Launch(j);
    }

    private void Launch(Job job)
    {
        lock (_lock)
        {
            if (job.Status != JobStatus.Created) return;
            job.Started = true;
            Transition(job, JobStatus.Running);
        }
        _ = Task.Run(async () =>
        {
            Exception? failure = null;
            try
            {
                await job.RunAsync(job.Cancellation.Token);
            }
            catch (Exception e)
            {
                failure = e;
            }
            Completed(job, failure);
        });
    }

    private void Completed(Job job, Exception? failure)
    {
        lock (_lock)
        {
            if (job.IsCancelled && failure is null or OperationCanceledException) job.Error = "Operation canceled";
            else if (failure is not null and not OperationCanceledException) job.Error = failure.Message;
            else if (failure is OperationCanceledException) job.Error = "Operation canceled";
            var group = job.Group!;
            if (failure is BlockIOException io) _report(new JobIoError(job, io.Operation ?? "read", "report"));
            if (job.Error is not null)
            {
                group.Failed = true;
                Transition(job, JobStatus.Aborting);
                // One failure cancels the rest of the group.
                foreach (var other in group.Jobs.Where(o => o != job && o.Status is JobStatus.Running or JobStatus.Paused or JobStatus.Ready or JobStatus.Standby or JobStatus.Created))
                    other.Cancellation.Cancel();
            }
            else
            {
                Transition(job, JobStatus.Waiting);
            }
            TryFinalizeGroup(group);
        }
    }

    /// <summary>Once every job of the group stopped running: pending, then (auto) finalize. Caller holds the lock.</summary>
    private void TryFinalizeGroup(JobGroup group)
    {
        if (group.Jobs.Any(j => j.Status is JobStatus.Created or JobStatus.Running or JobStatus.Paused or JobStatus.Ready or JobStatus.Standby)) return;
        foreach (var j in group.Jobs)
        {
            if (group.Failed && j.Status == JobStatus.Waiting)
            {
                // Finished its work, but the group failed: it is cancelled (reported cancelled, offset == len).
                j.Cancellation.Cancel();
                j.Error ??= "Operation canceled";
                Transition(j, JobStatus.Aborting);
            }
            if (j.Status == JobStatus.Waiting)
            {
                Transition(j, JobStatus.Pending);
                if (!j.AutoFinalize) _report(new JobPending(j));
            }
        }
        if (group.Jobs.All(j => j.AutoFinalize) || group.Failed) Finalize(group);
    }

    private void Finalize(JobGroup group)
    {
        foreach (var j in group.Jobs)
        {
            if (j.Status is JobStatus.Concluded or JobStatus.Null) continue;
            bool failed = group.Failed || j.Error is not null;
            try
            {
                if (failed) j.Abort();
                else j.Commit();
            }
            catch (Exception e)
            {
                j.Error ??= e.Message;
            }
            finally
            {
                try { j.Clean(); } catch (Exception) { }
            }
            if (failed && j.Status != JobStatus.Aborting) Transition(j, JobStatus.Aborting);
            if (j.Started)
            {
                // A cancelled job that failed for another reason than the cancel itself completed with that error.
                if (j.Error is { } error && !(j.IsCancelled && error == "Operation canceled"))
                    _report(new JobCompleted(j, j.Total, j.Progress, j.Speed, error));
                else if (j.IsCancelled) _report(new JobCancelled(j, j.Total, j.Progress, j.Speed));
                else _report(new JobCompleted(j, j.Total, j.Progress, j.Speed, null));
            }
            Transition(j, JobStatus.Concluded);
            if (j.AutoDismiss) Dismiss(j);
        }
    }

    private void Dismiss(Job j)
    {
        Transition(j, JobStatus.Null);
        _jobs.Remove(j.Id);
    }

    /// <summary>Changes state if the table allows it, and reports it. Caller holds the lock.</summary>
    private void Transition(Job job, JobStatus to)
    {
        if (job.Status == to) return;
        if (!JobTables.CanTransition(job.Status, to))
            throw new InvalidOperationException($"job {job.Id}: illegal transition {job.Status} -> {to}");
        job.Status = to;
        _report(new JobStatusChanged(job, to));
    }

    /// <summary>The job caught up: ready (the status change, then <see cref="JobReady"/>).</summary>
    private void Ready(Job job)
    {
        lock (_lock)
        {
            if (job.Status != JobStatus.Running) return;
            Transition(job, JobStatus.Ready);
            _report(new JobReady(job, job.Total, job.Progress, job.Speed));
        }
    }

    /// <summary>An I/O error under on-*-error=stop or ignore: report it; with stop, pause until job-resume.</summary>
    private void IoErrorStop(Job job, string operation, string action)
    {
        lock (_lock)
        {
            // A cancelled job does not retry (QEMU's backup loop checks for cancel before it does): copies that were
            // still failing when the cancel came neither report nor pause it again.
            if (job.IsCancelled) return;
            _report(new JobIoError(job, operation, action));
            if (action != "stop" || job.Status is not (JobStatus.Running or JobStatus.Ready)) return;
            job.IoFailed = true;
            job.UserPauses = 1;
            if (job.ResumeSignal.Task.IsCompleted) job.ResumeSignal = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            // A ready job (mirror) stops into standby, as a paused ready job does.
            Transition(job, job.Status == JobStatus.Ready ? JobStatus.Standby : JobStatus.Paused);
        }
    }

    // ------------------------------------------------------------------ verbs

    private Job Find(string id, bool blockFamily)
    {
        if (_jobs.TryGetValue(id, out var job) && (!blockFamily || job.IsBlockJob)) return job;
        throw blockFamily ? new JobException($"Block job '{id}' not found", deviceNotActive: true) : new JobException("Job not found");
    }

    private static void Allow(Job job, JobVerb verb)
    {
        if (!JobTables.Allows(verb, job.Status))
            throw new JobException($"Job '{job.Id}' in state '{JobTables.Name(job.Status)}' cannot accept command verb '{JobTables.Name(verb)}'");
    }

    /// <param name="force">block-job-cancel's force (job-cancel always forces): without it, a ready job
    /// finishes successfully without switching over, as QEMU's mirror does.</param>
    public void Cancel(string id, bool blockFamily = false, bool force = true)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Cancel);
            if (!force && job.SupportsComplete && job.Status is JobStatus.Ready or JobStatus.Standby)
            {
                if (job.UserPauses > 0)
                {
                    job.UserPauses = 0;
                    ResumeLocked(job);
                }
                job.OnComplete(pivot: false);
                return;
            }
            if (job.UserPauses > 0)
            {
                job.UserPauses = 0;
                ResumeLocked(job);
            }
            job.Cancellation.Cancel();
            if (job.Status == JobStatus.Created)
            {
                job.Error = "Operation canceled";
                job.Group!.Failed = true;
                Transition(job, JobStatus.Aborting);
                TryFinalizeGroup(job.Group);
            }
            else if (job.Status == JobStatus.Pending)
            {
                job.Error = "Operation canceled";
                job.Group!.Failed = true;
                foreach (var j in job.Group.Jobs.Where(j => j.Status == JobStatus.Pending)) Transition(j, JobStatus.Aborting);
                Finalize(job.Group);
            }
        }
    }

    public void Pause(string id, bool blockFamily = false)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Pause);
            if (job.UserPauses > 0) throw new JobException("Job is already paused");
            job.UserPauses = 1;
            if (job.ResumeSignal.Task.IsCompleted) job.ResumeSignal = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            if (job.Status == JobStatus.Running) Transition(job, JobStatus.Paused);
            else if (job.Status == JobStatus.Ready) Transition(job, JobStatus.Standby);
        }
    }

    public void Resume(string id, bool blockFamily = false)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Resume);
            if (job.UserPauses == 0) throw new JobException("Can't resume a job that was not paused");
            job.UserPauses = 0;
            ResumeLocked(job);
        }
    }

    private void ResumeLocked(Job job)
    {
        job.IoFailed = false;
        if (job.Status == JobStatus.Paused) Transition(job, JobStatus.Running);
        else if (job.Status == JobStatus.Standby) Transition(job, JobStatus.Ready);
        job.ResumeSignal.TrySetResult();
    }

    public void SetSpeed(string id, long speed, bool blockFamily = true)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.SetSpeed);
            if (speed < 0) throw new JobException("Parameter 'speed' expects a non-negative value");
            job.Speed = speed;
        }
    }

    public void Complete(string id, bool blockFamily = false)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Complete);
            if (!job.SupportsComplete) throw new JobException($"The active block job '{id}' cannot be completed");
            job.OnComplete(pivot: true);
        }
    }

    public void FinalizeJob(string id, bool blockFamily = false)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Finalize);
            if (job.Group!.Jobs.Any(j => j.Status is not (JobStatus.Pending or JobStatus.Concluded or JobStatus.Null))) return;
            Finalize(job.Group);
        }
    }

    public void DismissJob(string id, bool blockFamily = false)
    {
        lock (_lock)
        {
            var job = Find(id, blockFamily);
            Allow(job, JobVerb.Dismiss);
            Dismiss(job);
        }
    }

    // ------------------------------------------------------------------ queries

    public List<object?> QueryJobs()
    {
        lock (_lock)
        {
            return _jobs.Values.Select(j =>
            {
                var d = new QDict().Add("id", j.Id).Add("type", j.Type).Add("status", JobTables.Name(j.Status))
                    .Add("current-progress", j.Progress).Add("total-progress", j.Total);
                if (j.Error is { } e) d.Add("error", e);
                return (object?)d;
            }).ToList();
        }
    }

    public List<object?> QueryBlockJobs()
    {
        lock (_lock)
        {
            return _jobs.Values.Where(j => j.IsBlockJob).Select(j =>
            {
                var d = new QDict().Add("type", j.Type).Add("device", j.Id).Add("len", j.Total).Add("offset", j.Progress)
                    .Add("busy", j.Status == JobStatus.Running && !j.Sleeping).Add("paused", j.UserPauses > 0).Add("speed", j.Speed)
                    .Add("io-status", j.IoFailed ? "failed" : "ok").Add("ready", j.Status is JobStatus.Ready or JobStatus.Standby).Add("status", JobTables.Name(j.Status))
                    .Add("auto-finalize", j.AutoFinalize).Add("auto-dismiss", j.AutoDismiss);
                if (j.Error is { } e) d.Add("error", e);
                return (object?)d;
            }).ToList();
        }
    }
}
