using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Daemon.Commands;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Transactions;

/// <summary>QAPI's transaction: a list of actions that all happen or none does, each one a
/// <see cref="TransactionAction"/>; the backups among them may complete as one group.</summary>
internal sealed class TransactionCommand(QmpDispatcher dispatcher, BlockGraph graph, BitmapCommands bitmaps, BackupCommands backups, SnapshotCommands snapshots)
{
    private static readonly string[] ActionTypes = [.. BitmapCommands.TransactionActions, "abort", "blockdev-backup", "drive-backup", "blockdev-snapshot-sync"];

    public void Register(QmpDispatcher q) =>
        q.Add("transaction", [new("actions", ArgType.Any), new("properties", ArgType.Object, true)], "any", Run);

    /// <summary>Prepares every action in order; on the first failure aborts those prepared (newest first) and
    /// reports that failure; otherwise commits all and starts the backups together (grouped: one job group).</summary>
    private object? Run(JsonObject a)
    {
        if (a["actions"] is not JsonArray actions) throw QmpException.Generic("Invalid parameter type for 'actions', expected: array");
        CheckActions(actions);
        bool grouped = false;
        if (a["properties"] is JsonObject props)
        {
            ArgSchema.Validate(props, [new("completion-mode", ArgType.Enum, true, ["individual", "grouped"])], "properties.");
            grouped = ArgSchema.OptStr(props, "completion-mode") == "grouped";
        }
        var prepared = new List<TransactionAction>();
        var backupActions = new List<BackupAction>();
        // As QEMU's qmp_transaction: nothing is in flight anywhere while the actions prepare and commit, so bitmaps
        // created, cleared or frozen together all see the same writes.
        using var drained = graph.DrainAll();
        try
        {
            try
            {
                for (int i = 0; i < actions.Count; i++)
                {
                    var action = Build(actions[i], i, grouped, backupActions);
                    action.Prepare();
                    prepared.Add(action);
                    if (action is BackupAction b) backupActions.Add(b);
                }
            }
            catch (Exception e) when (e is QmpException or BlockException)
            {
                for (int i = prepared.Count - 1; i >= 0; i--) prepared[i].Abort();
                if (e is QmpException) throw;
                throw QmpException.Generic(e.Message);
            }
            foreach (var action in prepared) action.Commit();
            if (backupActions.Count > 0) backups.Start(backupActions.Select(b => b.Prepared!).ToList(), grouped);
        }
        finally
        {
            foreach (var action in prepared) action.Clean();
        }
        return new QDict();
    }

    /// <summary>The action for one list item (its members were checked by <see cref="CheckActions"/>).</summary>
    private TransactionAction Build(JsonNode? item, int index, bool grouped, IReadOnlyList<BackupAction> earlierBackups)
    {
        if (item is not JsonObject action) throw QmpException.Generic($"Invalid parameter type for 'actions[{index}]', expected: object");
        ArgSchema.Validate(action, [new("type", ArgType.Enum, false, ActionTypes), new("data", ArgType.Object)], $"actions[{index}].");
        string type = ArgSchema.Str(action, "type");
        var data = action["data"]!.AsObject();
        if (grouped && type is not ("blockdev-backup" or "drive-backup"))
            throw QmpException.Generic($"Action '{type}' does not support Transaction property completion-mode = grouped");
        switch (type)
        {
            case "abort":
                ArgSchema.Validate(data, []);
                return new AbortAction();
            case "blockdev-backup":
            case "drive-backup":
                return new BackupAction(backups, data, type == "drive-backup", earlierBackups);
            case "blockdev-snapshot-sync":
                return new SnapshotSyncAction(snapshots, data);
        }
        var command = dispatcher[type];
        ArgSchema.Validate(data, command.Args);
        var set = bitmaps.NodeOf(data).Image.Bitmaps;
        return type switch
        {
            "block-dirty-bitmap-add" => new BitmapAddAction(command, set, data),
            "block-dirty-bitmap-remove" => new BitmapRemoveAction(set, data),
            "block-dirty-bitmap-clear" or "block-dirty-bitmap-merge" => new BitmapContentAction(command, set, data),
            _ => new BitmapRecordingAction(command, set, data),
        };
    }

    /// <summary>Every action's type and data, checked before any action is prepared: QEMU's visitor reads the whole
    /// request first, naming members by their path ('actions[1].data.node').</summary>
    private void CheckActions(JsonArray actions)
    {
        for (int i = 0; i < actions.Count; i++)
        {
            string prefix = $"actions[{i}].";
            if (actions[i] is not JsonObject action) throw QmpException.Generic($"Invalid parameter type for 'actions[{i}]', expected: object");
            ArgSchema.Validate(action, [new("type", ArgType.Enum, false, ActionTypes), new("data", ArgType.Object)], prefix);
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
                    ArgSchema.Validate(data, type == "drive-backup" ? BackupCommands.DriveBackupArgs : BackupCommands.BlockdevBackupArgs, prefix);
                    BackupCommands.CheckMembers(data, prefix);
                    break;
                case "blockdev-snapshot-sync":
                    ArgSchema.Validate(data, SnapshotCommands.SnapshotSyncArgs, prefix);
                    break;
                default:
                    ArgSchema.Validate(data, dispatcher[type].Args, prefix);
                    if (type == "block-dirty-bitmap-merge") ArgSchema.CheckBitmapList(data["bitmaps"], prefix + "bitmaps");
                    break;
            }
        }
    }
}
