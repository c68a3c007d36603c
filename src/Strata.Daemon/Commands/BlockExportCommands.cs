using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Formats.Json;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>QAPI's block-export module: the NBD server and its exports (block-export-*, and the older nbd-server-*
/// forms).</summary>
internal sealed class BlockExportCommands(BlockGraph graph, ExportManager exports)
{
    private static readonly ArgSpec Node = new("node", ArgType.Str);
    private static readonly ArgSpec Name = new("name", ArgType.Str);

    private static readonly ArgSpec[] ExportArgs =
    [
        new("type", ArgType.Enum, false, ["nbd", "fuse", "vhost-user-blk", "vduse-blk"]), new("id", ArgType.Str), new("node-name", ArgType.Str),
        new("writable", ArgType.Bool, true), new("writethrough", ArgType.Bool, true), new("iothread", ArgType.Str, true),
        new("fixed-iothread", ArgType.Bool, true), new("name", ArgType.Str, true), new("description", ArgType.Str, true),
        new("bitmaps", ArgType.Any, true), new("allocation-depth", ArgType.Bool, true),
    ];

    public void Register(QmpDispatcher q)
    {
        q.Add("nbd-server-start", [new("addr", ArgType.Object), new("tls-creds", ArgType.Str, true), new("tls-authz", ArgType.Str, true), new("max-connections", ArgType.UInt32, true)], "any", a =>
        {
            StartNbdServer((JsonObject)a["addr"]!, legacy: true, ArgSchema.OptLong(a, "max-connections"), a.ContainsKey("tls-creds"));
            return new QDict();
        });
        q.Add("nbd-server-stop", [], "any", _ =>
        {
            exports.StopServer();
            return new QDict();
        });
        q.Add("block-export-add", ExportArgs, "any", a =>
        {
            AddExport(a);
            return new QDict();
        });
        q.Add("block-export-del", [new("id", ArgType.Str), new("mode", ArgType.Enum, true, ["safe", "hard"])], "any", a =>
        {
            exports.Delete(ArgSchema.Str(a, "id"), ArgSchema.OptStr(a, "mode") == "hard");
            return new QDict();
        });
        q.Add("query-block-exports", [], "[BlockExportInfo]", _ => exports.All.Select(e => (object?)new QDict()
            .Add("id", e.Export.Id).Add("type", "nbd").Add("node-name", e.Node.Name).Add("shutting-down", e.Export.ShuttingDown)).ToList());
        q.Add("nbd-server-add", [new("device", ArgType.Str), new("name", ArgType.Str, true), new("description", ArgType.Str, true), new("writable", ArgType.Bool, true), new("bitmap", ArgType.Str, true)], "any", a =>
        {
            var args = new JsonObject { ["type"] = "nbd", ["id"] = ArgSchema.OptStr(a, "name") ?? ArgSchema.Str(a, "device"), ["node-name"] = ArgSchema.Str(a, "device") };
            foreach (var key in new[] { "name", "description", "writable" }) if (a[key] is { } v) args[key] = v.DeepClone();
            if (ArgSchema.OptStr(a, "bitmap") is { } bm) args["bitmaps"] = new JsonArray(bm);
            AddExport(args);
            return new QDict();
        });
        q.Add("nbd-server-remove", [new("name", ArgType.Str), new("mode", ArgType.Enum, true, ["safe", "hard"])], "any", a =>
        {
            string name = ArgSchema.Str(a, "name");
            var match = exports.All.Where(e => e.Export.Name == name).ToList();
            if (match.Count == 0) throw QmpException.Generic($"Export '{name}' is not found");
            exports.Delete(match[0].Export.Id, ArgSchema.OptStr(a, "mode") == "hard");
            return new QDict();
        });
    }

    /// <summary>Starts the NBD server. <paramref name="legacy"/>: QMP's {type, data:{…}} address; otherwise the
    /// command line's flat {type, path | host, port}.</summary>
    public void StartNbdServer(JsonObject addr, bool legacy, long? maxConnections, bool tls = false, bool accept = true)
    {
        // The address is checked first: QEMU's marshaller visits every argument before the command runs.
        var address = legacy ? SocketAddressArg.ParseLegacy(addr, "addr.") : SocketAddressArg.Parse(addr, "addr.");
        if (exports.Server is not null) throw QmpException.Generic("NBD server already running");
        if (tls) throw QmpException.Generic("TLS is not supported by strata daemon");
        exports.StartServer(address, (int)(maxConnections ?? 100), accept);
    }

    /// <summary>block-export-add (also --export on the command line), checked in QEMU's order.</summary>
    public void AddExport(JsonObject a)
    {
        ArgSchema.Validate(a, ExportArgs);
        if (a.TryGetPropertyValue("bitmaps", out var bitmapList)) ArgSchema.CheckBitmapList(bitmapList, "bitmaps");
        if (ArgSchema.Str(a, "type") != "nbd") throw QmpException.Generic($"Export type '{ArgSchema.Str(a, "type")}' is not supported");
        var server = exports.Server ?? throw QmpException.Generic("NBD server not running");
        string id = ArgSchema.Str(a, "id");
        if (exports.All.Any(e => e.Export.Id == id)) throw QmpException.Generic($"Block export id '{id}' is already in use");
        string nodeName = ArgSchema.Str(a, "node-name");
        var node = graph.Find(nodeName) ?? throw QmpException.Generic($"Cannot find device='{nodeName}' nor node-name='{nodeName}'");
        string name = ArgSchema.OptStr(a, "name") ?? nodeName;
        if (name.Length > 4096) throw QmpException.Generic($"export name '{name[..32]}...' too long");
        if (server.Find(name) is not null) throw QmpException.Generic($"NBD server already has export named '{name}'");
        string? description = ArgSchema.OptStr(a, "description");
        if (description is { Length: > 4096 }) throw QmpException.Generic("description too long");
        bool writable = ArgSchema.Bool(a, "writable");
        if (writable && node.Image.ReadOnly) throw QmpException.Generic($"Cannot export read-only node '{nodeName}' as writable");
        var bitmaps = bitmapList is JsonArray array ? ExportedBitmaps(array, node, writable) : [];
        var export = new NbdExport(id, name, description, node.Image, writable, bitmaps, ArgSchema.Bool(a, "allocation-depth")) { DiscardUnmap = node.DiscardUnmap };
        exports.Add(export, node);
    }

    /// <summary>The bitmaps an export offers as qemu:dirty-bitmap contexts, found as QEMU finds them.</summary>
    private List<DirtyBitmap> ExportedBitmaps(JsonArray array, BlockNode node, bool writable)
    {
        var bitmaps = new List<DirtyBitmap>();
        int i = 0;
        foreach (var item in array)
        {
            DirtyBitmap b;
            // The node QEMU asks about below: where a plain name was found, the export's node otherwise.
            BlockImage? holder = node.Image;
            if (item is JsonValue v && v.GetValueKind() == JsonValueKind.String)
            {
                // A plain name is looked up on the node and down its backing chain.
                string bn = v.GetValue<string>();
                DirtyBitmap? found = null;
                for (holder = node.Image; holder is not null; holder = holder.Backing)
                    if ((found = holder.Bitmaps.Find(bn)) is not null) break;
                b = found ?? throw QmpException.Generic($"Bitmap '{bn}' is not found");
            }
            else if (item is JsonObject o)
            {
                ArgSchema.Validate(o, [Node, Name], $"bitmaps[{i}].");
                string on = ArgSchema.Str(o, "node");
                var other = graph.Find(on) ?? throw QmpException.Generic($"Cannot find device='{on}' nor node-name='{on}'");
                b = other.Image.Bitmaps.Find(ArgSchema.Str(o, "name")) ?? throw QmpException.Generic($"Bitmap '{ArgSchema.Str(o, "name")}' is not found");
            }
            else throw ArgSchema.AlternateError(null, "BlockDirtyBitmapOrStr");
            // An enabled bitmap on a read-only export may still change under it — unless nothing can write the
            // node at all (QEMU 7.2 refuses only when the node itself is writable).
            if (!writable && b.Enabled && holder is { ReadOnly: false }) throw QmpException.Generic($"Enabled bitmap '{b.Name}' incompatible with readonly export");
            if (bitmaps.Any(x => x.Name == b.Name)) throw QmpException.Generic($"Bitmap '{b.Name}' is listed twice");
            bitmaps.Add(b);
            i++;
        }
        return bitmaps;
    }
}
