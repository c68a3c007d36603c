using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>blockdev-mirror and drive-mirror (QAPI block-core): copy a live node elsewhere, stay in step, switch the
/// writers over (the exports' side of the switch is <see cref="ExportManager.SwitchOverAsync"/>).</summary>
internal sealed class MirrorCommands(BlockGraph graph, JobManager jobs, ExportManager exports)
{
    private static readonly ArgSpec[] MirrorCommon =
    [
        new("job-id", ArgType.Str, true), new("device", ArgType.Str), new("target", ArgType.Str), new("replaces", ArgType.Str, true),
        new("sync", ArgType.Enum, false, ["top", "full", "none"]), new("speed", ArgType.Int, true), new("granularity", ArgType.UInt32, true),
        new("buf-size", ArgType.Int, true), new("on-source-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]),
        new("on-target-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]), new("filter-node-name", ArgType.Str, true),
        new("copy-mode", ArgType.Enum, true, ["background", "write-blocking"]), new("auto-finalize", ArgType.Bool, true), new("auto-dismiss", ArgType.Bool, true),
    ];

    /// <summary>drive-mirror has no filter-node-name in QEMU 7.2.</summary>
    private static readonly ArgSpec[] DriveMirrorArgs =
    [
        .. MirrorCommon.Where(s => s.Name != "filter-node-name"), new("format", ArgType.Str, true), new("node-name", ArgType.Str, true),
        new("mode", ArgType.Enum, true, ["existing", "absolute-paths"]), new("unmap", ArgType.Bool, true),
    ];

    public void Register(QmpDispatcher q)
    {
        q.Add("blockdev-mirror", MirrorCommon, "any", a =>
        {
            StartMirror(a, drive: false);
            return new QDict();
        });
        q.Add("drive-mirror", DriveMirrorArgs, "any", a =>
        {
            StartMirror(a, drive: true);
            return new QDict();
        });
    }

    private void StartMirror(JsonObject a, bool drive)
    {
        string deviceName = ArgSchema.Str(a, "device");
        var source = graph.Find(deviceName) ?? throw QmpException.Generic($"Cannot find device='{deviceName}' nor node-name='{deviceName}'");
        string jobId = ArgSchema.OptStr(a, "job-id") ?? deviceName;
        if (!JobCommands.IsValidJobId(jobId)) throw QmpException.Generic($"Invalid job ID '{jobId}'");
        if (jobs.All.Any(j => j.Id == jobId)) throw QmpException.Generic($"Job ID '{jobId}' already in use");
        if (a["speed"] is JsonValue sp && sp.GetValue<long>() < 0) throw QmpException.Generic("Parameter 'speed' expects a non-negative value");
        if (ArgSchema.OptStr(a, "replaces") is not null) throw QmpException.Generic("Parameter 'replaces' is not supported");
        long? granularity = ArgSchema.OptLong(a, "granularity");
        if (granularity is { } g && (g < 512 || g > 64L << 20)) throw QmpException.Generic("Parameter 'granularity' expects a value in range [512B, 64MB]");
        if (granularity is { } p2 && (p2 & (p2 - 1)) != 0) throw QmpException.Generic("Parameter 'granularity' expects a power of 2");
        string sync = ArgSchema.Str(a, "sync");
        string targetName = ArgSchema.Str(a, "target");
        BlockImage target;
        BlockNode? targetNode = null;
        Action release;
        if (!drive)
        {
            targetNode = graph.Find(targetName) ?? throw QmpException.Generic($"Cannot find device='{targetName}' nor node-name='{targetName}'");
            if (targetNode == source) throw QmpException.Generic("Can't mirror node into itself");
            if (jobs.All.OfType<MirrorJob>().Any(j => j.TargetImage == targetNode.Image && j.Status is not (JobStatus.Concluded or JobStatus.Null)))
                throw QmpException.Generic($"Node '{targetName}' is busy: block device is in use by block job: mirror");
            target = targetNode.Image;
            var held = targetNode;
            graph.AddUser(held, NodeUser.JobTarget, LockClaim.MirrorTarget);
            release = () => graph.RemoveUser(held, NodeUser.JobTarget, LockClaim.MirrorTarget);
        }
        else
        {
            // drive-mirror: the new image becomes a node (node-name, or automatic) so that job-complete can switch
            // to it; it goes away again unless the switch happened.
            string? nodeName = ArgSchema.OptStr(a, "node-name");
            if (nodeName is not null && graph.Find(nodeName) is not null) throw QmpException.Generic($"Duplicate nodes with node-name='{nodeName}'");
            JobNodes.OpenDriveTarget(source, targetName, sync, ArgSchema.OptStr(a, "format"), ArgSchema.OptStr(a, "mode") ?? "absolute-paths").Dispose();
            string format = ArgSchema.OptStr(a, "format") ?? (source.Driver is "qcow2" ? "qcow2" : "raw");
            try
            {
                targetNode = graph.AddOverlay(nodeName, targetName, sync == "none" ? source : null, format);
            }
            catch (BlockException e)
            {
                throw QmpException.Generic(e.Message);
            }
            target = targetNode.Image;
            var created = targetNode;
            graph.AddUser(created, NodeUser.JobTarget, LockClaim.MirrorTarget);
            release = () =>
            {
                graph.RemoveUser(created, NodeUser.JobTarget, LockClaim.MirrorTarget);
                if (!jobs.All.OfType<MirrorJob>().Any(j => j.TargetImage == created.Image && j.Pivoted))
                    try { graph.DeleteForce(created); } catch (BlockException) { }
            };
        }
        release = JobNodes.ClaimSource(graph, source, LockClaim.MirrorSource, release);
        try
        {
            var job = new MirrorJob(jobId, new MirrorOptions
            {
                Source = source.Image,
                Target = target,
                Sync = sync switch { "full" => MirrorSync.Full, "top" => MirrorSync.Top, _ => MirrorSync.None },
                Granularity = granularity ?? Math.Clamp(target.ClusterSize > 0 ? target.ClusterSize : 65536, 4096, 65536),
                Speed = a["speed"] is JsonValue s ? s.GetValue<long>() : 0,
                WriteBlocking = ArgSchema.OptStr(a, "copy-mode") == "write-blocking",
                OnSourceError = ArgSchema.OptStr(a, "on-source-error") ?? "report",
                OnTargetError = ArgSchema.OptStr(a, "on-target-error") ?? "report",
                Pivot = targetNode is null ? null : finalSync => exports.SwitchOverAsync(source, targetNode, finalSync),
                Release = release,
            }, ArgSchema.Bool(a, "auto-finalize", true), ArgSchema.Bool(a, "auto-dismiss", true));
            job.Prepare();
            jobs.Start([job]);
        }
        catch
        {
            release();
            throw;
        }
    }
}
