using System.Text.Json.Nodes;
using Strata.Block.Qcow2;
using Strata.Protocol.Qmp;

namespace Strata.Backup;

/// <summary>What `strata migrate` moves, from where to where.</summary>
public sealed record MigrationOptions
{
    /// <summary>QMP of the daemon that has the disk now, and of the one that gets it.</summary>
    public required string From { get; init; }
    public required string To { get; init; }
    public required string Disk { get; init; }
    /// <summary>The qcow2 file the destination keeps the disk in (created here, empty, the disk's size).</summary>
    public required string Image { get; init; }
    /// <summary>NBD servers the daemons already run (unix socket paths); null starts one on each for the move.</summary>
    public string? FromNbd { get; init; }
    public string? ToNbd { get; init; }
}

/// <summary>
/// Moves a live disk and its dirty bitmaps from one `strata daemon` to another with QMP and NBD only:
/// the destination exports a new image, the source mirrors into it (through an nbd node) until ready, the
/// destination starts recording each bitmap (busy), the mirror switches the source's writers over, then the
/// destination reads the source's frozen bitmaps from a read-only export and merges them in. A failure before
/// the switch leaves the source as it was; after it, the destination says which bitmaps are inconsistent.
/// </summary>
public sealed class DiskMigrator(MigrationOptions o, Action<string> log)
{
    private const string JobId = "strata-migrate";
    private const string TargetNode = "strata-migrate-target";
    private const string BitmapExport = "strata-migrate-bitmaps";

    public async Task RunAsync()
    {
        await using var from = await QmpSource.ConnectAsync(o.From);
        await using var to = await QmpSource.ConnectAsync(o.To);
        var node = await from.NodeAsync(o.Disk);
        var bitmaps = node.Bitmaps.Where(b => !b.Inconsistent).ToList();
        foreach (var b in node.Bitmaps.Where(b => b.Inconsistent)) log($"bitmap '{b.Name}' is inconsistent on the source and is not moved");
        if (bitmaps.FirstOrDefault(b => b.Busy) is { } busy)
            throw new BackupException($"bitmap '{busy.Name}' is busy on the source (a backup or export uses it)", "wait for it to finish", BackupExitCodes.Source);
        if (File.Exists(o.Image)) throw new BackupException($"'{o.Image}' already exists", "the destination image must be a new file", BackupExitCodes.Usage);
        // The destination must be a QMP monitor that took the negotiation before its image is created here.
        await to.NegotiatedAsync();

        // The destination: a new image of the disk's size, exported writable for the mirror.
        Qcow2Image.Create(o.Image, new Qcow2CreateOptions { Size = node.VirtualSize }).Dispose();
        string toNbd = o.ToNbd ?? await StartNbdAsync(to, SocketPaths.ForRun(Path.ChangeExtension(o.Image, ".nbd"), "migrate-to"));
        await to.ExecuteAsync("blockdev-add", new JsonObject
        {
            ["driver"] = "qcow2", ["node-name"] = o.Disk,
            ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = Path.GetFullPath(o.Image) },
        });
        await to.ExecuteAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = o.Disk, ["node-name"] = o.Disk, ["name"] = o.Disk, ["writable"] = true });
        log($"destination: {o.Disk} in {o.Image}, exported at nbd+unix:///{o.Disk}?socket={toNbd}");

        bool switched = false;
        try
        {
            await from.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "nbd", ["node-name"] = TargetNode, ["export"] = o.Disk,
                ["server"] = new JsonObject { ["type"] = "unix", ["path"] = toNbd },
            });
            // The mirror tracks and copies at the finest bitmap granularity: once ready, each copy it makes covers only
            // granules the guest wrote, so the destination's bitmaps (recording from then on) never gain a bit the
            // source's would not have.
            long granularity = Math.Min(65536, bitmaps.Count == 0 ? 65536 : bitmaps.Min(b => b.Granularity));
            await from.ExecuteAsync("blockdev-mirror", new JsonObject
            {
                ["job-id"] = JobId, ["device"] = o.Disk, ["target"] = TargetNode, ["sync"] = "full", ["granularity"] = granularity,
            });
            var first = await from.NextEventAsync(e => e["data"]?["device"]?.GetValue<string>() == JobId
                && e["event"]!.GetValue<string>() is "BLOCK_JOB_READY" or "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED", TimeSpan.FromHours(24));
            if (first?["event"]!.GetValue<string>() != "BLOCK_JOB_READY")
                throw new BackupException($"the mirror did not get ready: {first?["data"]?["error"]?.GetValue<string>() ?? "the source went away"}",
                    "the disk stays where it was, bitmaps untouched", BackupExitCodes.Failed);
            log("mirror ready: source and destination in step");

            await to.ExecuteAsync("x-strata-bitmap-import-begin", new JsonObject
            {
                ["node"] = o.Disk,
                // Oldest first, so that the destination lists them in the source's order.
                ["bitmaps"] = new JsonArray(Enumerable.Reverse(bitmaps).Select(b => (JsonNode)new JsonObject
                {
                    ["name"] = b.Name, ["granularity"] = b.Granularity, ["persistent"] = b.Persistent, ["recording"] = b.Recording,
                }).ToArray()),
            });
            await from.ExecuteAsync("job-complete", new JsonObject { ["id"] = JobId });
            var end = await from.NextEventAsync(e => e["data"]?["device"]?.GetValue<string>() == JobId
                && e["event"]!.GetValue<string>() is "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED", TimeSpan.FromHours(1));
            if (end is null || end["event"]!.GetValue<string>() != "BLOCK_JOB_COMPLETED" || end["data"]?["error"] is not null)
                throw new BackupException($"the switch-over failed: {end?["data"]?["error"]?.GetValue<string>() ?? "the source went away"}",
                    "the disk stays on the source", BackupExitCodes.Failed);
            switched = true;
            log("switched over: the source's writers now write to the destination");

            // The source's bitmaps are final now; frozen, they can be exported read-only.
            string fromNbd = o.FromNbd ?? await StartNbdAsync(from, SocketPaths.ForRun(Path.ChangeExtension(o.Image, ".from.nbd"), "migrate-from"));
            var disable = new JsonArray(bitmaps.Where(b => b.Recording).Select(b => (JsonNode)new JsonObject
            {
                ["type"] = "block-dirty-bitmap-disable", ["data"] = new JsonObject { ["node"] = o.Disk, ["name"] = b.Name },
            }).ToArray());
            if (disable.Count > 0) await from.ExecuteAsync("transaction", new JsonObject { ["actions"] = disable });
            await from.ExecuteAsync("block-export-add", new JsonObject
            {
                ["type"] = "nbd", ["id"] = BitmapExport, ["node-name"] = o.Disk, ["name"] = BitmapExport, ["writable"] = false,
                ["bitmaps"] = new JsonArray(bitmaps.Select(b => (JsonNode)JsonValue.Create(b.Name)!).ToArray()),
            });
            await to.ExecuteAsync("x-strata-bitmap-import", new JsonObject
            {
                ["node"] = o.Disk, ["export"] = BitmapExport,
                ["server"] = new JsonObject { ["type"] = "unix", ["path"] = fromNbd },
            });
            try { await from.ExecuteAsync("block-export-del", new JsonObject { ["id"] = BitmapExport }); } catch (QmpException) { }
            log($"bitmaps moved: {string.Join(", ", bitmaps.Select(b => b.Name))}");
        }
        catch (Exception e) when (!switched && e is BackupException or QmpException)
        {
            // Before the switch the source is untouched: drop the destination's half copy.
            try { await to.ExecuteAsync("x-strata-bitmap-import-cancel", new JsonObject { ["node"] = o.Disk }); } catch (QmpException) { }
            try { await to.ExecuteAsync("block-export-del", new JsonObject { ["id"] = o.Disk, ["mode"] = "hard" }); } catch (QmpException) { }
            for (int i = 0; i < 20; i++)
            {
                try { await to.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = o.Disk }); break; }
                catch (QmpException) { await Task.Delay(50); }
            }
            File.Delete(o.Image);
            if (e is QmpException q) throw new BackupException($"migration failed before the switch-over: {q.Message}", "the disk stays on the source, bitmaps untouched", BackupExitCodes.Failed);
            throw;
        }
        catch (QmpException e)
        {
            throw new BackupException($"the disk moved, but: {e.Message}", "the destination's bitmaps named above are inconsistent: take a full backup next", BackupExitCodes.Failed);
        }
    }

    private static async Task<string> StartNbdAsync(QmpSource daemon, string socket)
    {
        File.Delete(socket);
        await daemon.ExecuteAsync("nbd-server-start", new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = socket } } });
        return socket;
    }
}
