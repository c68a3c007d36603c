using Strata.Block.Jobs;
using Strata.Formats.Json;

namespace Strata.Daemon;

/// <summary>
/// The job manager's typed events as QEMU's QMP events: JOB_STATUS_CHANGE for every job, and for block jobs the
/// BLOCK_JOB_* family (ERROR, PENDING, READY, COMPLETED, CANCELLED) with QEMU's members in QEMU's order. Each event is
/// sent as it is reported, so their order is the manager's.
/// </summary>
public static class JobEventsToQmp
{
    /// <summary>A report callback for <see cref="JobManager"/> that sends each event through <paramref name="emit"/>.</summary>
    public static Action<JobEvent> To(Action<string, QDict?> emit) => e =>
    {
        if (Map(e) is var (name, data)) emit(name, data);
    };

    /// <summary>The QMP event for a job event, or null when QEMU sends none (block job events of other jobs).</summary>
    public static (string Name, QDict Data)? Map(JobEvent e) => e switch
    {
        JobStatusChanged s => ("JOB_STATUS_CHANGE", new QDict().Add("id", s.Job.Id).Add("status", JobTables.Name(s.Status))),
        _ when !e.Job.IsBlockJob => null,
        JobIoError io => ("BLOCK_JOB_ERROR", new QDict().Add("device", io.Job.Id).Add("operation", io.Operation).Add("action", io.Action)),
        JobPending p => ("BLOCK_JOB_PENDING", new QDict().Add("type", p.Job.Type).Add("id", p.Job.Id)),
        JobReady r => ("BLOCK_JOB_READY", BlockJobData(r.Job, r.Length, r.Offset, r.Speed)),
        JobCancelled c => ("BLOCK_JOB_CANCELLED", BlockJobData(c.Job, c.Length, c.Offset, c.Speed)),
        JobCompleted { Error: null } c => ("BLOCK_JOB_COMPLETED", BlockJobData(c.Job, c.Length, c.Offset, c.Speed)),
        JobCompleted c => ("BLOCK_JOB_COMPLETED", BlockJobData(c.Job, c.Length, c.Offset, c.Speed).Add("error", c.Error)),
        _ => null,
    };

    /// <summary>The members BLOCK_JOB_READY, COMPLETED and CANCELLED share.</summary>
    private static QDict BlockJobData(Job job, long length, long offset, long speed) =>
        new QDict().Add("type", job.Type).Add("device", job.Id).Add("len", length).Add("offset", offset).Add("speed", speed);
}
