using Strata.Block.Jobs;
using Strata.Formats.Json;

namespace Strata.Daemon.Commands;

/// <summary>QAPI's job module (job-*) and the block-job-* forms of the same verbs.</summary>
internal sealed class JobCommands(JobManager jobs)
{
    public void Register(QmpDispatcher q)
    {
        q.Add("query-jobs", [], "[JobInfo]", _ => jobs.QueryJobs());
        q.Add("query-block-jobs", [], "[BlockJobInfo]", _ => jobs.QueryBlockJobs());
        var id = new ArgSpec("id", ArgType.Str);
        var device = new ArgSpec("device", ArgType.Str);
        q.Add("job-pause", [id], "any", a => Ok(() => jobs.Pause(ArgSchema.Str(a, "id"))));
        q.Add("job-resume", [id], "any", a => Ok(() => jobs.Resume(ArgSchema.Str(a, "id"))));
        q.Add("job-cancel", [id], "any", a => Ok(() => jobs.Cancel(ArgSchema.Str(a, "id"))));
        q.Add("job-complete", [id], "any", a => Ok(() => jobs.Complete(ArgSchema.Str(a, "id"))));
        q.Add("job-finalize", [id], "any", a => Ok(() => jobs.FinalizeJob(ArgSchema.Str(a, "id"))));
        q.Add("job-dismiss", [id], "any", a => Ok(() => jobs.DismissJob(ArgSchema.Str(a, "id"))));
        q.Add("block-job-cancel", [device, new("force", ArgType.Bool, true)], "any", a => Ok(() => jobs.Cancel(ArgSchema.Str(a, "device"), blockFamily: true, force: ArgSchema.Bool(a, "force"))));
        q.Add("block-job-pause", [device], "any", a => Ok(() => jobs.Pause(ArgSchema.Str(a, "device"), blockFamily: true)));
        q.Add("block-job-resume", [device], "any", a => Ok(() => jobs.Resume(ArgSchema.Str(a, "device"), blockFamily: true)));
        q.Add("block-job-complete", [device], "any", a => Ok(() => jobs.Complete(ArgSchema.Str(a, "device"), blockFamily: true)));
        q.Add("block-job-set-speed", [device, new("speed", ArgType.Int)], "any", a => Ok(() => jobs.SetSpeed(ArgSchema.Str(a, "device"), a["speed"]!.GetValue<long>())));
        q.Add("block-job-finalize", [id], "any", a => Ok(() => jobs.FinalizeJob(ArgSchema.Str(a, "id"), blockFamily: true)));
        q.Add("block-job-dismiss", [id], "any", a => Ok(() => jobs.DismissJob(ArgSchema.Str(a, "id"), blockFamily: true)));
    }

    private static QDict Ok(Action action)
    {
        action();
        return new QDict();
    }

    /// <summary>QEMU's rule for a job ID: a letter, then letters, digits, '-', '.' or '_'.</summary>
    public static bool IsValidJobId(string id) =>
        id.Length > 0 && char.IsAsciiLetter(id[0]) && id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_');
}
