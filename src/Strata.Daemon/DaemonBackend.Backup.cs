using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>blockdev-backup, drive-backup and transaction.</summary>
public sealed partial class DaemonBackend
{
    private static readonly ArgSpec[] BackupCommon =
    [
        new("job-id", ArgType.Str, true), new("device", ArgType.Str), new("sync", ArgType.Enum, false, ["top", "full", "none", "incremental", "bitmap"]),
        new("speed", ArgType.Int, true), new("bitmap", ArgType.Str, true), new("bitmap-mode", ArgType.Enum, true, ["on-success", "never", "always"]),
        new("compress", ArgType.Bool, true), new("on-source-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]),
        new("on-target-error", ArgType.Enum, true, ["report", "ignore", "enospc", "stop", "auto"]), new("auto-finalize", ArgType.Bool, true),
        new("auto-dismiss", ArgType.Bool, true), new("filter-node-name", ArgType.Str, true), new("x-perf", ArgType.Object, true),
    ];

    private static readonly ArgSpec[] BlockdevBackupArgs = [.. BackupCommon, new("target", ArgType.Str)];

    private static readonly ArgSpec[] DriveBackupArgs =
        [.. BackupCommon, new("target", ArgType.Str), new("format", ArgType.Str, true), new("mode", ArgType.Enum, true, ["existing", "absolute-paths"])];

    /// <summary>A validated backup, ready to start: the job, and how to undo what validation set up.</summary>
    private sealed record PreparedBackup(BackupJob Job, BlockNode Source, Action Undo, string? FilterName)
    {
        /// <summary>The filter node listed while the job runs.</summary>
        public BlockNode? FilterNode { get; set; }
    }

    private void RegisterBackup()
    {
        Add("blockdev-backup", BlockdevBackupArgs, "any", a =>
        {
            var p = PrepareBackup(a, drive: false);
            StartBackups([p], grouped: false);
            return new QDict();
        });
        Add("drive-backup", DriveBackupArgs, "any", a =>
        {
            var p = PrepareBackup(a, drive: true);
            StartBackups([p], grouped: false);
            return new QDict();
        });
        Add("transaction", [new("actions", ArgType.Any), new("properties", ArgType.Object, true)], "any", Transaction);
    }

    private void StartBackups(IReadOnlyList<PreparedBackup> backups, bool grouped)
    {
        // Freeze every job at the same point in time before any of them copies, with the sources drained: a write
        // that has marked the bitmap but not yet landed would otherwise be in neither the backup nor the successor.
        using var drained = DrainedSection.Begin(backups.Select(b => b.Source.Image));
        foreach (var b in backups)
        {
            b.Job.Prepare(b.Source.Image.Bitmaps);
            b.FilterNode = Graph.AddJobFilter(b.FilterName, b.Job.Filter!, b.Source);
        }
        if (grouped) Jobs.Start(backups.Select(b => (Job)b.Job).ToList());
        else foreach (var b in backups) Jobs.Start([b.Job]);
    }

    private static readonly ArgSpec[] XPerfArgs = [new("use-copy-range", ArgType.Bool, true), new("max-workers", ArgType.Int, true), new("max-chunk", ArgType.Int, true)];

    /// <summary>The nested members of a backup's arguments, checked before anything else as QEMU's visitor does.</summary>
    private static void CheckBackupMembers(JsonObject a, string prefix)
    {
        if (a["x-perf"] is JsonObject perf) ArgSchema.Validate(perf, XPerfArgs, prefix + "x-perf.");
    }

    /// <summary>Every action's type and data, checked before any action is prepared: QEMU's visitor reads the whole
    /// request first, naming members by their path ('actions[1].data.node').</summary>
    private void CheckActions(JsonArray actions)
    {
        for (int i = 0; i < actions.Count; i++)
        {
            string prefix = $"actions[{i}].";
            if (actions[i] is not JsonObject action) throw QmpException.Generic($"Invalid parameter type for 'actions[{i}]', expected: object");
            ArgSchema.Validate(action, [new("type", ArgType.Enum, false, [.. BitmapActions, "abort", "blockdev-backup", "drive-backup", "blockdev-snapshot-sync"]), new("data", ArgType.Object)], prefix);
            string type = ArgSchema.Str(action, "type");
            var data = action["data"]!.AsObject();
            prefix += "data.";
            switch (type)
            {
                case "abort":
                    ArgSchema.Validate(data, [], prefix);
                    break;
                case "blockdev-backup":
                case "drive-backup":
                    ArgSchema.Validate(data, type == "drive-backup" ? DriveBackupArgs : BlockdevBackupArgs, prefix);
                    CheckBackupMembers(data, prefix);
                    break;
                case "blockdev-snapshot-sync":
                    ArgSchema.Validate(data, SnapshotSyncArgs, prefix);
                    break;
                default:
                    ArgSchema.Validate(data, _commands[type].Args, prefix);
                    if (type == "block-dirty-bitmap-merge") ArgSchema.CheckBitmapList(data["bitmaps"], prefix + "bitmaps");
                    break;
            }
        }
    }

    private static bool IsValidJobId(string id) =>
        id.Length > 0 && char.IsAsciiLetter(id[0]) && id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_');

    /// <summary>Checks a backup request in QEMU's order (qemu-spec §3.2) and builds its job.</summary>
    private PreparedBackup PrepareBackup(JsonObject a, bool drive)
    {
        CheckBackupMembers(a, "");
        string deviceName = ArgSchema.Str(a, "device");
        string sync = ArgSchema.Str(a, "sync");
        string? bitmapName = ArgSchema.OptStr(a, "bitmap");
        string? mode = ArgSchema.OptStr(a, "bitmap-mode");
        var source = Graph.Find(deviceName) ?? throw QmpException.Generic($"Cannot find device='{deviceName}' nor node-name='{deviceName}'");
        // A VM's QEMU names the job after the device; a storage daemon has no devices, so qemu-storage-daemon
        // refuses a missing job-id. Strata names it after the node, so QMP written for VMs (the seed talk's
        // examples) works unchanged.
        string jobId = ArgSchema.OptStr(a, "job-id") ?? deviceName;
        if (!IsValidJobId(jobId)) throw QmpException.Generic($"Invalid job ID '{jobId}'");
        if (Jobs.All.Any(j => j.Id == jobId)) throw QmpException.Generic($"Job ID '{jobId}' already in use");
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
            var targetNode = Graph.Find(targetName) ?? throw QmpException.Generic($"Cannot find device='{targetName}' nor node-name='{targetName}'");
            if (targetNode == source) throw QmpException.Generic("Source and target cannot be the same");
            if (Jobs.All.OfType<BackupJob>().Any(j => j.TargetImage == targetNode.Image && j.Status is not (JobStatus.Concluded or JobStatus.Null)))
                throw QmpException.Generic($"Node '{targetName}' is busy: block device is in use by block job: backup");
            target = targetNode.Image;
            Graph.AddUser(targetNode, NodeUser.JobTarget, LockClaim.BackupTarget);
            release = () => Graph.RemoveUser(targetNode, NodeUser.JobTarget, LockClaim.BackupTarget);
        }
        else
        {
            target = OpenDriveTarget(source, targetName, sync, ArgSchema.OptStr(a, "format"), ArgSchema.OptStr(a, "mode") ?? "absolute-paths");
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
        release = ClaimSource(source, LockClaim.BackupSource, release);
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
            Graph.CheckNewNodeName(filterName);
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
                    if (prepared?.FilterNode is { } f) Graph.RemoveJobFilter(f);
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

    /// <summary>Takes a job's lock claim on its source; returns <paramref name="release"/> extended to give it back.
    /// When the claim is refused, <paramref name="release"/> runs at once (the target is let go) and the error stands.</summary>
    private Action ClaimSource(BlockNode source, LockClaim claim, Action release)
    {
        try
        {
            Graph.AddUser(source, NodeUser.JobSource, claim);
        }
        catch
        {
            release();
            throw;
        }
        return () =>
        {
            Graph.RemoveUser(source, NodeUser.JobSource, claim);
            release();
        };
    }

    /// <summary>drive-backup's target: created (absolute-paths) or opened (existing).</summary>
    private static BlockImage OpenDriveTarget(BlockNode source, string path, string sync, string? format, string mode)
    {
        if (mode == "existing")
            return ImageOpener.Open(path, format, readOnly: false, openBacking: true);
        format ??= source.Driver is "qcow2" ? "qcow2" : "raw";
        long size = source.Image.Size;
        if (format == "raw")
        {
            RawImage.Create(path, size).Dispose();
            return ImageOpener.Open(path, "raw", readOnly: false);
        }
        if (format != "qcow2") throw QmpException.Generic($"Unknown file format '{format}'");
        string? backing = null, backingFormat = null;
        if (sync == "top" && source.Image.BackingFileName is { } b)
        {
            backing = ImageOpener.ResolveBackingPath(source.FileName, b);
            backingFormat = source.Image.BackingFormat;
        }
        else if (sync == "none")
        {
            backing = Path.GetFullPath(source.FileName);
            backingFormat = source.Driver;
        }
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, BackingFile = backing, BackingFormat = backingFormat }).Dispose();
        return ImageOpener.Open(path, "qcow2", readOnly: false, openBacking: backing is not null);
    }

    // ------------------------------------------------------------------ transaction

    private static readonly string[] BitmapActions =
        ["block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"];

    /// <summary>transaction: prepare every action in order; on the first failure undo what was prepared and report
    /// that failure; otherwise commit all, starting the backup jobs together (grouped: one job group).</summary>
    private object? Transaction(JsonObject a)
    {
        if (a["actions"] is not JsonArray actions) throw QmpException.Generic("Invalid parameter type for 'actions', expected: array");
        CheckActions(actions);
        bool grouped = false;
        if (a["properties"] is JsonObject props)
        {
            ArgSchema.Validate(props, [new("completion-mode", ArgType.Enum, true, ["individual", "grouped"])], "properties.");
            grouped = ArgSchema.OptStr(props, "completion-mode") == "grouped";
        }
        var undo = new Stack<Action>();
        var commits = new List<Action>();
        var backups = new List<PreparedBackup>();
        // As QEMU's qmp_transaction: nothing is in flight anywhere while the actions prepare and commit, so bitmaps
        // created, cleared or frozen together all see the same writes.
        using var drained = Graph.DrainAll();
        try
        {
            int i = 0;
            foreach (var item in actions)
            {
                if (item is not JsonObject action) throw QmpException.Generic($"Invalid parameter type for 'actions[{i}]', expected: object");
                ArgSchema.Validate(action, [new("type", ArgType.Enum, false, [.. BitmapActions, "abort", "blockdev-backup", "drive-backup", "blockdev-snapshot-sync"]), new("data", ArgType.Object)], $"actions[{i}].");
                string type = ArgSchema.Str(action, "type");
                var data = action["data"]!.AsObject();
                if (grouped && type is not ("blockdev-backup" or "drive-backup"))
                    throw QmpException.Generic($"Action '{type}' does not support Transaction property completion-mode = grouped");
                switch (type)
                {
                    case "abort":
                        ArgSchema.Validate(data, []);
                        throw QmpException.Generic("Transaction aborted using Abort action");
                    case "blockdev-backup":
                    case "drive-backup":
                    {
                        ArgSchema.Validate(data, type == "drive-backup" ? DriveBackupArgs : BlockdevBackupArgs);
                        if (backups.Any(b => b.Job.Id == ArgSchema.OptStr(data, "job-id"))) throw QmpException.Generic($"Job ID '{ArgSchema.OptStr(data, "job-id")}' already in use");
                        var p = PrepareBackup(data, type == "drive-backup");
                        backups.Add(p);
                        undo.Push(p.Undo);
                        break;
                    }
                    case "blockdev-snapshot-sync":
                        ArgSchema.Validate(data, SnapshotSyncArgs);
                        undo.Push(TakeSnapshot(data, commits));
                        break;
                    default:
                        PrepareBitmapAction(type, data, undo, commits);
                        break;
                }
                i++;
            }
        }
        catch (Exception e) when (e is QmpException or BlockException)
        {
            while (undo.Count > 0) undo.Pop()();
            if (e is QmpException) throw;
            throw QmpException.Generic(e.Message);
        }
        foreach (var c in commits) c();
        if (backups.Count > 0) StartBackups(backups, grouped);
        return new QDict();
    }

    private void PrepareBitmapAction(string type, JsonObject data, Stack<Action> undo, List<Action> commits)
    {
        var spec = _commands[type];
        ArgSchema.Validate(data, spec.Args);
        var set = BitmapNode(data).Image.Bitmaps;
        switch (type)
        {
            case "block-dirty-bitmap-add":
            {
                spec.Run(data);
                string name = ArgSchema.Str(data, "name");
                undo.Push(() => { try { set.Remove(name); } catch (BitmapException) { } });
                break;
            }
            case "block-dirty-bitmap-remove":
            {
                // Checked now, removed at commit (later actions still see it).
                var b = set.Get(ArgSchema.Str(data, "name"));
                if (b.Busy || b.Successor is not null) throw QmpException.Generic($"Bitmap '{b.Name}' is currently in use by another operation and cannot be used");
                if (b.ReadOnly) throw QmpException.Generic($"Bitmap '{b.Name}' is readonly and cannot be modified");
                commits.Add(() => set.Remove(b.Name!));
                break;
            }
            case "block-dirty-bitmap-clear":
            case "block-dirty-bitmap-merge":
            {
                var target = set.Get(ArgSchema.Str(data, type == "block-dirty-bitmap-clear" ? "name" : "target"));
                var saved = target.Bits.Clone();
                spec.Run(data);
                undo.Push(() => { target.Bits.Clear(); target.Bits.Merge(saved); });
                break;
            }
            case "block-dirty-bitmap-enable":
            case "block-dirty-bitmap-disable":
            {
                var b = set.Get(ArgSchema.Str(data, "name"));
                bool was = b.Enabled;
                spec.Run(data);
                undo.Push(() => { if (was) set.Enable(b.Name!); else set.Disable(b.Name!); });
                break;
            }
        }
    }
}
