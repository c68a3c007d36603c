using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>The dirty-bitmap commands (QAPI's block-dirty-bitmap-*, and x-debug-block-dirty-bitmap-sha256).</summary>
internal sealed class BitmapCommands(BlockGraph graph)
{
    public static readonly ArgSpec Node = new("node", ArgType.Str);
    public static readonly ArgSpec Name = new("name", ArgType.Str);

    /// <summary>The bitmap commands a transaction may hold as actions.</summary>
    public static readonly string[] TransactionActions =
        ["block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge"];

    public void Register(QmpDispatcher q)
    {
        q.Add("block-dirty-bitmap-add", [Node, Name, new("granularity", ArgType.UInt32, true), new("persistent", ArgType.Bool, true), new("disabled", ArgType.Bool, true)], "any", a =>
        {
            var set = NodeOf(a).Image.Bitmaps;
            long? g = ArgSchema.OptLong(a, "granularity");
            set.Add(ArgSchema.Str(a, "name"), g, ArgSchema.Bool(a, "persistent"), ArgSchema.Bool(a, "disabled"));
            return new QDict();
        });
        q.Add("block-dirty-bitmap-remove", [Node, Name], "any", a => Op(a, (s, n) => s.Remove(n)));
        q.Add("block-dirty-bitmap-clear", [Node, Name], "any", a => Op(a, (s, n) => s.Clear(n)));
        q.Add("block-dirty-bitmap-enable", [Node, Name], "any", a => Op(a, (s, n) => s.Enable(n)));
        q.Add("block-dirty-bitmap-disable", [Node, Name], "any", a => Op(a, (s, n) => s.Disable(n)));
        q.Add("block-dirty-bitmap-merge", [Node, new("target", ArgType.Str), new("bitmaps", ArgType.Any)], "any", Merge);
        q.Add("x-debug-block-dirty-bitmap-sha256", [Node, Name], "BlockDirtyBitmapSha256", a =>
        {
            string node = ArgSchema.Str(a, "node");
            var n = graph.Find(node) ?? throw QmpException.Generic($"Node '{node}' not found");
            var b = n.Image.Bitmaps.Get(ArgSchema.Str(a, "name"));
            return new QDict().Add("sha256", b.Bits.Sha256());
        });
    }

    /// <summary>The node a bitmap command's "node" names.</summary>
    public BlockNode NodeOf(JsonObject a)
    {
        string node = ArgSchema.Str(a, "node");
        return graph.Find(node) ?? throw QmpException.Generic($"Cannot find device='{node}' nor node-name='{node}'");
    }

    private object? Op(JsonObject a, Action<BitmapSet, string> op)
    {
        op(NodeOf(a).Image.Bitmaps, ArgSchema.Str(a, "name"));
        return new QDict();
    }

    private object? Merge(JsonObject a)
    {
        ArgSchema.CheckBitmapList(a["bitmaps"], "bitmaps");
        var node = NodeOf(a);
        var list = a["bitmaps"]!.AsArray();
        // QEMU 7.2 crashes on an empty list; we refuse it.
        if (list.Count == 0) throw QmpException.Generic("Parameter 'bitmaps' must name at least one source bitmap");
        var sources = new List<DirtyBitmap>();
        int i = 0;
        foreach (var item in list)
        {
            switch (item)
            {
                case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                    sources.Add(node.Image.Bitmaps.Get(v.GetValue<string>()));
                    break;
                case JsonObject o:
                    ArgSchema.Validate(o, [Node, Name], $"bitmaps[{i}].");
                    string other = ArgSchema.Str(o, "node");
                    var otherNode = graph.Find(other) ?? throw QmpException.Generic($"Cannot find device='{other}' nor node-name='{other}'");
                    sources.Add(otherNode.Image.Bitmaps.Get(ArgSchema.Str(o, "name")));
                    break;
                default:
                    throw ArgSchema.AlternateError(null, "BlockDirtyBitmapOrStr");
            }
            i++;
        }
        node.Image.Bitmaps.Merge(ArgSchema.Str(a, "target"), sources);
        return new QDict();
    }
}
