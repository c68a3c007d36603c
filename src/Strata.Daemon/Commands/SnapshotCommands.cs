using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>blockdev-snapshot-sync (QAPI block-core): a new qcow2 overlay becomes the active layer above a node.</summary>
internal sealed class SnapshotCommands(BlockGraph graph, ExportManager exports)
{
    public static readonly ArgSpec[] SnapshotSyncArgs =
    [
        new("device", ArgType.Str, true), new("node-name", ArgType.Str, true), new("snapshot-file", ArgType.Str),
        new("snapshot-node-name", ArgType.Str, true), new("format", ArgType.Str, true), new("mode", ArgType.Enum, true, ["existing", "absolute-paths"]),
    ];

    public void Register(QmpDispatcher q)
    {
        q.Add("blockdev-snapshot-sync", SnapshotSyncArgs, "any", a =>
        {
            TakeSnapshot(a).Commit();
            return new QDict();
        });
    }

    /// <summary>Creates the overlay and puts it on top at once (so later actions of a transaction see the new node);
    /// returns how to undo that if the transaction fails, and what QEMU does once it succeeds: the old top is
    /// reopened read-only.</summary>
    public (Action Undo, Action Commit) TakeSnapshot(JsonObject a)
    {
        string? device = ArgSchema.OptStr(a, "device"), nodeName = ArgSchema.OptStr(a, "node-name");
        if ((device is null) == (nodeName is null)) throw QmpException.Generic("Exactly one of device and node-name must be specified");
        string target = device ?? nodeName!;
        var node = graph.Find(target) ?? throw QmpException.Generic($"Cannot find device='{device ?? ""}' nor node-name='{nodeName ?? ""}'");
        // QEMU blocks a mirror's source for the job's whole life; here only its switch-over, whose held exports
        // a snapshot would otherwise let go.
        if (exports.IsSwitchingOver(node)) throw QmpException.Generic($"Node '{node.Name}' is busy: block device is in use by block job: mirror");
        string file = ArgSchema.Str(a, "snapshot-file");
        string format = ArgSchema.OptStr(a, "format") ?? "qcow2";
        if (format != "qcow2") throw QmpException.Generic($"Unknown file format '{format}'");
        string? snapshotNode = ArgSchema.OptStr(a, "snapshot-node-name");
        // Addressed by node name, the overlay must be named too (a device's overlay may stay anonymous).
        if (nodeName is not null && snapshotNode is null) throw QmpException.Generic("New overlay node-name missing");
        if (snapshotNode is not null && graph.Find(snapshotNode) is not null) throw QmpException.Generic("New overlay node-name already in use");
        // Taken drained, as QEMU does: no write to the old top is half-way while the overlay goes on top of it.
        using var drained = node.Image.Drain();
        if ((ArgSchema.OptStr(a, "mode") ?? "absolute-paths") == "absolute-paths")
        {
            if (File.Exists(file)) File.Delete(file);
            Qcow2Image.Create(file, new Qcow2CreateOptions
            {
                Size = node.Image.Size,
                BackingFile = Path.GetFullPath(node.FileName),
                BackingFormat = node.Driver,
            }).Dispose();
        }
        else if (!File.Exists(file)) throw QmpException.Generic($"Could not open '{file}': No such file or directory");
        BlockNode overlay;
        try
        {
            overlay = graph.AddOverlay(snapshotNode, file, node);
        }
        catch (BlockException e)
        {
            throw QmpException.Generic(e.Message);
        }
        // The node's users (its exports) move up to the overlay; the node stays below as its backing.
        exports.MoveAsync(node, overlay).GetAwaiter().GetResult();
        return (Undo: () =>
        {
            exports.MoveAsync(overlay, node).GetAwaiter().GetResult();
            try { graph.DeleteForce(overlay); } catch (BlockException) { }
        }, Commit: () =>
        {
            // As QEMU: best effort, a node that cannot be reopened stays as it is.
            try { graph.SwitchToReadOnly(node); } catch (BlockException) { }
        });
    }
}
