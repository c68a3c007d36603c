using System.Text.Json.Nodes;
using Strata.Block.Qcow2;

namespace Strata.Backup;

/// <summary>
/// The disks of one pull run frozen at one point in time and exported read-only over NBD: in one QMP transaction,
/// each disk gets its new bitmap, a fleecing overlay (a backup job with sync=none copies the old data there before
/// the guest overwrites it) and, for an incremental, its old bitmap stopped at the freeze so that the export can
/// offer it as a <c>qemu:dirty-bitmap</c> context. Disposing takes it all down again on the source: exports, jobs,
/// overlay nodes and files, and the NBD server when the run started it. The bitmaps are the caller's: it commits the
/// point and drops the old ones, or rolls the new ones back (<see cref="SourceBitmaps"/>).
/// </summary>
internal sealed class FrozenSource : IAsyncDisposable
{
    /// <summary>One disk to freeze. <paramref name="ExportBitmap"/>: the old bitmap the export offers (and that stops
    /// at the freeze), null for a full or a differential.</summary>
    public sealed record Disk(string Name, SourceNode Node, string NewBitmap, string? ExportBitmap, string FleecePath);

    private readonly QmpSource _source;
    private readonly List<Disk> _disks;
    private readonly List<Disk> _started = [];
    private string? _ownSocket;

    public string NbdAddress { get; private set; } = "";

    public static string JobId(string disk) => "strata-job-" + disk;
    public static string TargetNode(string disk) => "strata-tgt-" + disk;
    public static string ExportId(string disk) => "strata-exp-" + disk;
    public static string ExportName(string disk) => "strata-" + disk;
    /// <summary>The dirty-bitmap context a disk's export offers, or null.</summary>
    public string? DirtyContext(string disk) => _disks.First(d => d.Name == disk).ExportBitmap is { } b ? "qemu:dirty-bitmap:" + b : null;

    private FrozenSource(QmpSource source, IEnumerable<Disk> disks)
    {
        _source = source;
        _disks = disks.ToList();
    }

    /// <param name="nbd">The NBD server the source already runs (unix path or HOST:PORT), or null to start one on
    /// <paramref name="ownSocket"/> for the run.</param>
    /// <param name="noServerHint">What to tell the user when the source cannot start an NBD server.</param>
    public static async Task<FrozenSource> FreezeAsync(QmpSource source, IReadOnlyList<Disk> disks, string? nbd, string ownSocket, string noServerHint)
    {
        var frozen = new FrozenSource(source, disks);
        try
        {
            await frozen.StartAsync(nbd, ownSocket, noServerHint);
            return frozen;
        }
        catch
        {
            await frozen.DisposeAsync();
            throw;
        }
    }

    private async Task StartAsync(string? nbd, string ownSocket, string noServerHint)
    {
        if (nbd is null)
        {
            try
            {
                await _source.ExecuteAsync("nbd-server-start", new JsonObject { ["addr"] = new JsonObject { ["type"] = "unix", ["data"] = new JsonObject { ["path"] = ownSocket } } });
            }
            catch (Protocol.Qmp.QmpException e)
            {
                throw new BackupException($"cannot start an NBD server on the source: {e.Message}", noServerHint, BackupExitCodes.Source);
            }
            _ownSocket = ownSocket;
        }
        NbdAddress = nbd ?? ownSocket;
        var actions = new JsonArray();
        foreach (var d in _disks)
        {
            // Scratch for the run's length, deleted after it (or by the next run's clean-up): nothing to make durable.
            Qcow2Image.Create(d.FleecePath, new Qcow2CreateOptions { Size = d.Node.VirtualSize, ClusterSize = BackupRunner.PointClusterSize, Durable = false }).Dispose();
            await _source.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = TargetNode(d.Name),
                ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = d.FleecePath },
                ["backing"] = d.Name,
            });
            actions.Add(SourceBitmaps.AddAction(d.Name, d.NewBitmap, d.Node));
            // The old bitmap stops at the freeze point, so that it can be exported read-only; on failure the new one
            // is merged back into it.
            if (d.ExportBitmap is { } old) actions.Add(SourceBitmaps.Action("block-dirty-bitmap-disable", new JsonObject { ["node"] = d.Name, ["name"] = old }));
            actions.Add(SourceBitmaps.Action("blockdev-backup", new JsonObject { ["job-id"] = JobId(d.Name), ["device"] = d.Name, ["target"] = TargetNode(d.Name), ["sync"] = "none" }));
        }
        await SourceBitmaps.TransactionAsync(_source, actions);
        _started.AddRange(_disks);
        foreach (var d in _disks)
        {
            var export = new JsonObject { ["type"] = "nbd", ["id"] = ExportId(d.Name), ["node-name"] = TargetNode(d.Name), ["name"] = ExportName(d.Name), ["writable"] = false };
            if (d.ExportBitmap is { } old) export["bitmaps"] = new JsonArray(new JsonObject { ["node"] = d.Name, ["name"] = old });
            await _source.ExecuteAsync("block-export-add", export);
        }
    }

    public async ValueTask DisposeAsync()
    {
        int mark = _source.EventMark;
        foreach (var d in _started)
        {
            try { await _source.ExecuteAsync("block-export-del", new JsonObject { ["id"] = ExportId(d.Name), ["mode"] = "hard" }); } catch (Protocol.Qmp.QmpException) { }
            await _source.WaitEventAsync("BLOCK_EXPORT_DELETED", e => e["data"]?["id"]?.GetValue<string>() == ExportId(d.Name), TimeSpan.FromSeconds(5), mark);
            try { await _source.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = JobId(d.Name), ["force"] = true }); } catch (Protocol.Qmp.QmpException) { }
        }
        if (_started.Count > 0) await _source.WaitJobsAsync(_started.Select(d => JobId(d.Name)), mark, timeout: TimeSpan.FromMinutes(1));
        foreach (var d in _disks) await SourceBitmaps.DeleteNodeAsync(_source, TargetNode(d.Name));
        foreach (var d in _disks) File.Delete(d.FleecePath);
        if (_ownSocket is not null)
        {
            try { await _source.ExecuteAsync("nbd-server-stop"); } catch (Protocol.Qmp.QmpException) { }
            File.Delete(_ownSocket);
        }
    }
}
