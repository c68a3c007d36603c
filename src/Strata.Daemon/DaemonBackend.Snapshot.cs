using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>blockdev-snapshot-sync: a new qcow2 overlay becomes the active layer above a node.</summary>
public sealed partial class DaemonBackend
{
    private static readonly ArgSpec[] SnapshotSyncArgs =
    [
        new("device", ArgType.Str, true), new("node-name", ArgType.Str, true), new("snapshot-file", ArgType.Str),
        new("snapshot-node-name", ArgType.Str, true), new("format", ArgType.Str, true), new("mode", ArgType.Enum, true, ["existing", "absolute-paths"]),
    ];

    private void RegisterSnapshot()
    {
        Add("blockdev-snapshot-sync", SnapshotSyncArgs, "any", a =>
        {
            var commits = new List<Action>();
            TakeSnapshot(a, commits);
            foreach (var commit in commits) commit();
            return new QDict();
        });
    }

    /// <summary>Creates the overlay and puts it on top at once (so later actions of a transaction see the new node);
    /// returns how to undo that if the transaction fails, and adds to <paramref name="commits"/> what QEMU does once
    /// it succeeds: the old top is reopened read-only.</summary>
    private Action TakeSnapshot(JsonObject a, List<Action> commits)
    {
        string? device = ArgSchema.OptStr(a, "device"), nodeName = ArgSchema.OptStr(a, "node-name");
        if ((device is null) == (nodeName is null)) throw QmpException.Generic("Exactly one of device and node-name must be specified");
        string target = device ?? nodeName!;
        var node = Graph.Find(target) ?? throw QmpException.Generic($"Cannot find device='{device ?? ""}' nor node-name='{nodeName ?? ""}'");
        // QEMU blocks a mirror's source for the job's whole life; here only its switch-over, whose held exports
        // a snapshot would otherwise let go.
        if (_switchingOver.ContainsKey(node)) throw QmpException.Generic($"Node '{node.Name}' is busy: block device is in use by block job: mirror");
        string file = ArgSchema.Str(a, "snapshot-file");
        string format = ArgSchema.OptStr(a, "format") ?? "qcow2";
        if (format != "qcow2") throw QmpException.Generic($"Unknown file format '{format}'");
        string? snapshotNode = ArgSchema.OptStr(a, "snapshot-node-name");
        // Addressed by node name, the overlay must be named too (a device's overlay may stay anonymous).
        if (nodeName is not null && snapshotNode is null) throw QmpException.Generic("New overlay node-name missing");
        if (snapshotNode is not null && Graph.Find(snapshotNode) is not null) throw QmpException.Generic("New overlay node-name already in use");
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
            overlay = Graph.AddOverlay(snapshotNode, file, node);
        }
        catch (BlockException e)
        {
            throw QmpException.Generic(e.Message);
        }
        // The node's users (its exports) move up to the overlay; the node stays below as its backing.
        MoveExportsAsync(node, overlay).GetAwaiter().GetResult();
        commits.Add(() =>
        {
            // As QEMU: best effort, a node that cannot be reopened stays as it is.
            try { Graph.SwitchToReadOnly(node); } catch (BlockException) { }
        });
        return () =>
        {
            MoveExportsAsync(overlay, node).GetAwaiter().GetResult();
            try { Graph.DeleteForce(overlay); } catch (BlockException) { }
        };
    }

    /// <summary>Holds the node's exports, lets in-flight requests finish, points them at <paramref name="to"/> and
    /// lets them go: no client sees an error. Runs inside a QMP command (under the dispatcher's lock).</summary>
    private async Task MoveExportsAsync(BlockNode from, BlockNode to)
    {
        var moving = _exports.Values.Where(e => e.Node == from).Select(e => e.Export).ToList();
        try
        {
            await Task.WhenAll(moving.Select(e => e.DrainAsync()));
            RetargetExports(from, to);
        }
        finally
        {
            foreach (var e in moving) e.Resume();
        }
    }

    /// <summary>Points every export of <paramref name="from"/> at <paramref name="to"/>, with its use of the node
    /// and its lock claim. Changes the export table: the caller holds the dispatcher's lock.</summary>
    private void RetargetExports(BlockNode from, BlockNode to)
    {
        foreach (var (id, (export, _)) in _exports.Where(e => e.Value.Node == from).ToList())
        {
            export.Retarget(to.Image);
            Graph.RemoveUser(from, NodeUser.Export, LockClaim.Export(export.Writable));
            Graph.AddUser(to, NodeUser.Export, LockClaim.Export(export.Writable));
            _exports[id] = (export, to);
        }
    }
}
