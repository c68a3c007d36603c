using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>blockdev-backup and drive-backup (QAPI block-core); a transaction prepares and starts them here too.</summary>
internal sealed class BackupCommands(BlockGraph graph, JobManager jobs)
{
    private static readonly ArgSpec[] BackupCommon =
    [
        new("job-id", ArgType.Str, true), new("device", ArgType.Str), new("sync", ArgType.Enum, false, ["top", "full", "none", "incremental", "bitmap"]),
        new("speed", ArgType.Int, true), new("bitmap", ArgType.Str, true), new("bitmap-mode", ArgType.Enum, true, ["on-success", "never", "always"]),
        new("compress", ArgType.Bool, true), new("on-source-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]),
        new("on-target-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]), new("auto-finalize", ArgType.Bool, true),
        new("auto-dismiss", ArgType.Bool, true), new("filter-node-name", ArgType.Str, true), new("x-perf", ArgType.Object, true),
    ];

    public static readonly ArgSpec[] BlockdevBackupArgs = [.. BackupCommon, new("target", ArgType.Str)];

    public static readonly ArgSpec[] DriveBackupArgs =
        [.. BackupCommon, new("target", ArgType.Str), new("format", ArgType.Str, true), new("mode", ArgType.Enum, true, ["existing", "absolute-paths"])];

    /// <summary>A validated backup, ready to start: the job, and how to undo what validation set up.</summary>
    public sealed record PreparedBackup(BackupJob Job, BlockNode Source, Action Undo, string? FilterName)
    {
        /// <summary>The filter node listed while the job runs.</summary>
        public BlockNode? FilterNode { get; set; }
    }

    public void Register(QmpDispatcher q)
    {
        q.Add("blockdev-backup", BlockdevBackupArgs, "any", a =>
        {
            Start([Prepare(a, drive: false)], grouped: false);
            return new QDict();
        });
        q.Add("drive-backup", DriveBackupArgs, "any", a =>
        {
            Start([Prepare(a, drive: true)], grouped: false);
            return new QDict();
        });
    }

    public void Start(IReadOnlyList<PreparedBackup> backups, bool grouped)
    {
        // Freeze every job at the same point in time before any of them copies, with the sources drained: a write
        // that has marked the bitmap but not yet landed would otherwise be in neither the backup nor the successor.
        using var drained = DrainedSection.Begin(backups.Select(b => b.Source.Image));
        foreach (var b in backups)
        {
            b.Job.Prepare(b.Source.Image.Bitmaps);
            b.FilterNode = graph.AddJobFilter(b.FilterName, b.Job.Filter!, b.Source);
        }
        if (grouped) jobs.Start(backups.Select(b => (Job)b.Job).ToList());
        else foreach (var b in backups) jobs.Start([b.Job]);
    }

    private static readonly ArgSpec[] XPerfArgs = [new("use-copy-range", ArgType.Bool, true), new("max-workers", ArgType.Int, true), new("max-chunk", ArgType.Int, true)];

    /// <summary>The nested members of a backup's arguments, checked before anything else as QEMU's visitor does.</summary>
    public static void CheckMembers(JsonObject a, string prefix)
    {
        if (a["x-perf"] is JsonObject perf) ArgSchema.Validate(perf, XPerfArgs, prefix + "x-perf.");
    }

    /// <summary>Checks a backup request in QEMU's order (qemu-spec §3.2) and builds its job.</summary>
    public PreparedBackup Prepare(JsonObject a, bool drive)
    {
        CheckMembers(a, "");
        string deviceName = ArgSchema.Str(a, "device");
        string sync = ArgSchema.Str(a, "sync");
        string? bitmapName = ArgSchema.OptStr(a, "bitmap");
        string? mode = ArgSchema.OptStr(a, "bitmap-mode");
        var source = graph.Find(deviceName) ?? throw QmpException.Generic($"Cannot find device='{deviceName}' nor node-name='{deviceName}'");
        // A VM's QEMU names the job after the device; a storage daemon has no devices, so qemu-storage-daemon
        // refuses a missing job-id. Strata names it after the node, so QMP written for VMs (the seed talk's
        // examples) works unchanged.
        string jobId = ArgSchema.OptStr(a, "job-id") ?? deviceName;
        if (!JobCommands.IsValidJobId(jobId)) throw QmpException.Generic($"Invalid job ID '{jobId}'");
        if (jobs.All.Any(j => j.Id == jobId)) throw QmpException.Generic($"Job ID '{jobId}' already in use");
        if (a["speed"] is JsonValue sp && sp.GetValue<long>() < 0) throw QmpException.Generic("Parameter 'speed' expects a non-negative value");

        if (sync is "bitmap" or "incremental" && bitmapName is null) throw QmpException.Generic($"must provide a valid bitmap name for '{sync}' sync mode");
        if (sync == "incremental")
        {
            if (mode is not null and not "on-success") throw QmpException.Generic("Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
            sync = "bitmap";
            mode = "on-success";
        }
        DirtyBitmap? bitmap = null;
        if (bitmapName is not null)
        {
            bitmap = source.Image.Bitmaps.Find(bitmapName) ?? throw QmpException.Generic($"Bitmap '{bitmapName}' could not be found");
            if (mode is null) throw QmpException.Generic("Bitmap sync mode must be given when providing a bitmap");
            if (bitmap.Busy || bitmap.Successor is not null) throw QmpException.Generic($"Bitmap '{bitmapName}' is currently in use by another operation and cannot be used");
            if (bitmap.Inconsistent) throw QmpException.Generic($"Bitmap '{bitmapName}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk");
            if (sync == "none") throw QmpException.Generic("sync mode 'none' does not produce meaningful bitmap outputs");
            if (mode == "never" && sync != "bitmap") throw QmpException.Generic($"Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '{sync}'");
            if (mode != "never" && bitmap.ReadOnly) throw QmpException.Generic($"Bitmap '{bitmapName}' is readonly and cannot be modified");
        }
        else if (mode is not null)
        {
            throw QmpException.Generic("Cannot specify bitmap sync mode without a bitmap");
        }

        BlockImage target;
        Action release;
        string targetName = ArgSchema.Str(a, "target");
        if (!drive)
        {
            var targetNode = graph.Find(targetName) ?? throw QmpException.Generic($"Cannot find device='{targetName}' nor node-name='{targetName}'");
            if (targetNode == source) throw QmpException.Generic("Source and target cannot be the same");
            if (jobs.All.OfType<BackupJob>().Any(j => j.TargetImage == targetNode.Image && j.Status is not (JobStatus.Concluded or JobStatus.Null)))
                throw QmpException.Generic($"Node '{targetName}' is busy: block device is in use by block job: backup");
            target = targetNode.Image;
            graph.AddUser(targetNode, NodeUser.JobTarget, LockClaim.BackupTarget);
            release = () => graph.RemoveUser(targetNode, NodeUser.JobTarget, LockClaim.BackupTarget);
        }
        else
        {
            target = JobNodes.OpenDriveTarget(source, targetName, sync, ArgSchema.OptStr(a, "format"), ArgSchema.OptStr(a, "mode") ?? "absolute-paths");
            try
            {
                // The target's own file is locked as QEMU's target node would be; its backing chain (which for sync=none
                // is the source's own image, open here already) is read through without a second claim.
                if (target is Qcow2Image q) q.File.SetLockClaim(LockClaim.Qcow2(readOnly: false));
                else if (target is RawImage r) r.File.SetLockClaim(LockClaim.BackupTarget);
            }
            catch
            {
                target.Dispose();
                throw;
            }
            release = target.Dispose;
        }
        release = JobNodes.ClaimSource(graph, source, LockClaim.BackupSource, release);
        try
        {
            if (ArgSchema.Bool(a, "compress") && !target.SupportsCompression) throw QmpException.Generic("Compression is not supported for this drive ");
            if (a["x-perf"] is JsonObject perf)
            {
                ArgSchema.Validate(perf, XPerfArgs, "x-perf.");
                if (perf["max-workers"] is JsonValue mw && mw.GetValue<long>() is < 1 or > int.MaxValue) throw QmpException.Generic("max-workers must be between 1 and 2147483647");
                long cluster = Math.Max(65536, target.ClusterSize);
                if (perf["max-chunk"] is JsonValue mc && mc.GetValue<long>() is var chunk && chunk != 0 && chunk < cluster)
                    throw QmpException.Generic($"Required max-chunk ({chunk}) is less than backup cluster size ({cluster})");
            }
            if (target.Size != source.Image.Size) throw QmpException.Generic("Source and target image have different sizes");
            string? filterName = ArgSchema.OptStr(a, "filter-node-name");
            graph.CheckNewNodeName(filterName);
            PreparedBackup? prepared = null;
            var options = new BackupOptions
            {
                Source = source.Image,
                Target = target,
                Sync = sync switch { "full" => BackupSync.Full, "top" => BackupSync.Top, "none" => BackupSync.None, _ => BackupSync.Bitmap },
                Bitmap = bitmap,
                Mode = mode switch { "always" => BitmapMode.Always, "never" => BitmapMode.Never, _ => BitmapMode.OnSuccess },
                Compress = ArgSchema.Bool(a, "compress"),
                Speed = a["speed"] is JsonValue s ? s.GetValue<long>() : 0,
                Workers = a["x-perf"]?["max-workers"] is JsonValue w ? (int)Math.Min(w.GetValue<long>(), 64) : 4,
                OnSourceError = ArgSchema.OptStr(a, "on-source-error") ?? "report",
                OnTargetError = ArgSchema.OptStr(a, "on-target-error") ?? "report",
                // The filter node goes with the job, before its completion is announced.
                Release = () =>
                {
                    if (prepared?.FilterNode is { } f) graph.RemoveJobFilter(f);
                    release();
                },
            };
            var job = new BackupJob(jobId, options, ArgSchema.Bool(a, "auto-finalize", true), ArgSchema.Bool(a, "auto-dismiss", true));
            return prepared = new PreparedBackup(job, source, release, filterName);
        }
        catch
        {
            release();
            throw;
        }
    }
}
