using System.Text.Json.Nodes;
using Strata.Daemon.Commands;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Transactions;

/// <summary>blockdev-backup and drive-backup: checked and built at prepare (target opened, nodes claimed); the
/// transaction starts every committed backup together, frozen at one point in time.</summary>
internal sealed class BackupAction(BackupCommands backups, JsonObject data, bool drive, IReadOnlyList<BackupAction> earlier) : TransactionAction
{
    public BackupCommands.PreparedBackup? Prepared { get; private set; }

    public override void Prepare()
    {
        ArgSchema.Validate(data, drive ? BackupCommands.DriveBackupArgs : BackupCommands.BlockdevBackupArgs);
        string? jobId = ArgSchema.OptStr(data, "job-id");
        if (earlier.Any(b => b.Prepared?.Job.Id == jobId)) throw QmpException.Generic($"Job ID '{jobId}' already in use");
        Prepared = backups.Prepare(data, drive);
    }

    public override void Abort() => Prepared!.Undo();
}

/// <summary>blockdev-snapshot-sync: the overlay goes on top at prepare (later actions see it); commit reopens the old
/// top read-only; abort takes the overlay away again.</summary>
internal sealed class SnapshotSyncAction(SnapshotCommands snapshots, JsonObject data) : TransactionAction
{
    private (Action Undo, Action Commit) _taken;

    public override void Prepare()
    {
        ArgSchema.Validate(data, SnapshotCommands.SnapshotSyncArgs);
        _taken = snapshots.TakeSnapshot(data);
    }

    public override void Commit() => _taken.Commit();

    public override void Abort() => _taken.Undo();
}
