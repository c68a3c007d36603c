using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Formats.Json;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>
/// Bitmap migration, post-copy style, on the destination (QEMU has no QMP for this: these are Strata's own
/// x-strata- commands). Before the switch-over, <c>x-strata-bitmap-import-begin</c> creates each bitmap busy and,
/// where the source's was recording, recording here; after it, <c>x-strata-bitmap-import</c> reads the source's
/// frozen bits through an NBD export's qemu:dirty-bitmap contexts and merges them in — or, if the source is gone,
/// marks the bitmaps inconsistent and says so. <c>x-strata-bitmap-import-cancel</c> drops bitmaps still waiting.
/// </summary>
internal sealed class BitmapMigrationCommands(BlockGraph graph, Action<string, Exception> log)
{
    private readonly Dictionary<string, List<DirtyBitmap>> _incomingBitmaps = new(StringComparer.Ordinal);

    public void Register(QmpDispatcher q)
    {
        q.Add("x-strata-bitmap-import-begin", [new("node", ArgType.Str), new("bitmaps", ArgType.Any)], "any", a =>
        {
            var node = graph.Find(ArgSchema.Str(a, "node")) ?? throw QmpException.Generic($"Cannot find device='{a["node"]}' nor node-name='{a["node"]}'");
            if (a["bitmaps"] is not JsonArray list) throw QmpException.Generic("Invalid parameter type for 'bitmaps', expected: array");
            lock (_incomingBitmaps)
                if (_incomingBitmaps.ContainsKey(node.Name)) throw QmpException.Generic($"Node '{node.Name}' is already receiving bitmaps");
            var created = new List<DirtyBitmap>();
            try
            {
                int i = 0;
                foreach (var item in list)
                {
                    if (item is not JsonObject o) throw QmpException.Generic($"Invalid parameter type for 'bitmaps[{i}]', expected: object");
                    ArgSchema.Validate(o, [new("name", ArgType.Str), new("granularity", ArgType.UInt32), new("persistent", ArgType.Bool, true), new("recording", ArgType.Bool, true)], $"bitmaps[{i}].");
                    created.Add(node.Image.Bitmaps.BeginImport(ArgSchema.Str(o, "name"), ArgSchema.OptLong(o, "granularity")!.Value,
                        ArgSchema.Bool(o, "persistent"), ArgSchema.Bool(o, "recording", true)));
                    i++;
                }
            }
            catch (Exception e) when (e is BitmapException or QmpException)
            {
                foreach (var b in created)
                {
                    b.Busy = false;
                    node.Image.Bitmaps.Remove(b.Name!);
                }
                throw e as QmpException ?? QmpException.Generic(e.Message);
            }
            lock (_incomingBitmaps) _incomingBitmaps[node.Name] = created;
            return new QDict();
        });

        q.Add("x-strata-bitmap-import", [new("node", ArgType.Str), new("server", ArgType.Object), new("export", ArgType.Str)], "any", a =>
        {
            var node = graph.Find(ArgSchema.Str(a, "node")) ?? throw QmpException.Generic($"Cannot find device='{a["node"]}' nor node-name='{a["node"]}'");
            // Bad arguments are refused before anything is touched: the bitmaps stay waiting for a good import
            // (or a cancel). Only a failed transfer marks them.
            var server = SocketAddressArg.Parse(a["server"]!.AsObject(), "server.").ForConnect();
            string export = ArgSchema.Str(a, "export");
            List<DirtyBitmap>? incoming;
            lock (_incomingBitmaps)
                if (!_incomingBitmaps.Remove(node.Name, out incoming)) throw QmpException.Generic($"Node '{node.Name}' is not receiving bitmaps");
            var pending = new List<DirtyBitmap>(incoming);
            try
            {
                ImportAsync(server, export, node.Image.Size, pending).GetAwaiter().GetResult();
            }
            catch (Exception e)
            {
                // Whatever went wrong, no bitmap stays busy: each one not yet merged is released as inconsistent
                // (never silently incomplete), and can be removed.
                foreach (var b in pending) node.Image.Bitmaps.FailImport(b);
                if (e is not (IOException or NbdException or System.Net.Sockets.SocketException or InvalidOperationException or QmpException or BlockException))
                    log("x-strata-bitmap-import", e);
                throw QmpException.Generic($"Bitmap migration from export '{export}' failed: {e.Message}; "
                    + $"bitmap(s) {string.Join(", ", pending.Select(b => "'" + b.Name + "'"))} marked inconsistent");
            }
            return new QDict();

            async Task ImportAsync(SocketAddressArg srv, string name, long size, List<DirtyBitmap> todo)
            {
                foreach (var b in todo.ToList())
                {
                    // One connection per bitmap, negotiating only its context: the server answers every block
                    // status request with every negotiated context.
                    string context = NbdExport.DirtyBitmapPrefix + b.Name;
                    await using var client = srv.Path is { } path
                        ? await NbdClient.ConnectUnixAsync(path, name, [context])
                        : await NbdClient.ConnectTcpAsync(srv.Host!, srv.Port, name, [context]);
                    if (client.Size != size) throw new InvalidOperationException($"the source disk is {client.Size} bytes, this one {size}");
                    if (!client.Contexts.ContainsKey(context)) throw new InvalidOperationException($"the source does not export bitmap '{b.Name}'");
                    // The bits merge into what was recorded here since the switch-over.
                    foreach (var (offset, length) in await client.ExtentsWithFlagAsync(context, 1)) b.MarkDirty(offset, length);
                    node.Image.Bitmaps.FinishImport(b);
                    todo.Remove(b);
                }
            }
        });

        q.Add("x-strata-bitmap-import-cancel", [new("node", ArgType.Str)], "any", a =>
        {
            var node = graph.Find(ArgSchema.Str(a, "node")) ?? throw QmpException.Generic($"Cannot find device='{a["node"]}' nor node-name='{a["node"]}'");
            List<DirtyBitmap>? incoming;
            lock (_incomingBitmaps)
                if (!_incomingBitmaps.Remove(node.Name, out incoming)) throw QmpException.Generic($"Node '{node.Name}' is not receiving bitmaps");
            foreach (var b in incoming)
            {
                b.Busy = false;
                node.Image.Bitmaps.Remove(b.Name!);
            }
            return new QDict();
        });
    }
}
