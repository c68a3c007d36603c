using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Backup;

/// <summary>
/// The bitmap rotation every run does on a QMP source, whatever kind of repository it writes to. Bitmaps are named
/// after the point they start at (a repository's prefix + the point id): a new one is added at every point, the old
/// one is removed only after the new point is committed, and any failure merges the new bitmap back into the old —
/// so the next incremental is always complete.
/// </summary>
internal static class SourceBitmaps
{
    /// <summary>
    /// One transaction action, typed as a <see cref="JsonNode"/> so that <c>JsonArray.Add</c> takes it as a node:
    /// the generic overload a <see cref="JsonObject"/> would pick goes through reflection-based serialisation,
    /// which native AOT cannot compile.
    /// </summary>
    public static JsonNode Action(string type, JsonObject data) => new JsonObject { ["type"] = type, ["data"] = data };

    /// <summary>Adds a run's new bitmap: persistent where the image can store it, so that the chain survives a clean
    /// restart of the source.</summary>
    public static JsonNode AddAction(string disk, string bitmap, SourceNode node) =>
        Action("block-dirty-bitmap-add", new JsonObject { ["node"] = disk, ["name"] = bitmap, ["persistent"] = node.Driver == "qcow2" });

    public static async Task TransactionAsync(QmpSource source, JsonArray actions)
    {
        // Not completion-mode=grouped: QEMU refuses it next to bitmap actions. A run is all disks or nothing anyway,
        // since any failed job discards every file of the run and leaves every old bitmap whole.
        var args = new JsonObject { ["actions"] = actions };
        try
        {
            await source.ExecuteAsync("transaction", args);
        }
        catch (QmpException e)
        {
            throw new BackupException($"the source refused the backup transaction: {e.Message} ({e.ErrorClass})", "nothing was started; check the disk names and bitmaps with query-named-block-nodes", BackupExitCodes.Source);
        }
    }

    public static async Task DeleteNodeAsync(QmpSource source, string node)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                await source.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = node });
                return;
            }
            catch (QmpException e) when (e.ErrorClass == "DeviceNotFound" || e.ErrorClass == "GenericError" &&
                                         (e.Message.StartsWith("Failed to find node", StringComparison.Ordinal) || e.Message.Contains("not found", StringComparison.OrdinalIgnoreCase)))
            {
                return; // already gone (QEMU and strata daemon both say "Failed to find node with node-name=…")
            }
            catch (QmpException) when (attempt < 40)
            {
                // A job that just ended may hold the node for a moment longer.
                await Task.Delay(50);
            }
        }
    }

    /// <summary>After the new point is committed: every bitmap of the repository on the disk but the new one goes.</summary>
    /// <param name="known">The disk's bitmaps as the run's plan saw them (after recovery, before the new one was added),
    /// which spares a query; null asks the source.</param>
    public static async Task DropOldAsync(QmpSource source, string disk, string prefix, string keep, IReadOnlyList<SourceBitmap>? known = null)
    {
        foreach (var b in (known ?? (await source.NodeAsync(disk)).Bitmaps).Where(b => b.Name.StartsWith(prefix, StringComparison.Ordinal) && b.Name != keep))
            await source.ExecuteAsync("block-dirty-bitmap-remove", new JsonObject { ["node"] = disk, ["name"] = b.Name });
    }

    /// <summary>On failure: the new bitmap goes; the old one (<paramref name="mergeInto"/>, when the run read from it)
    /// gets back every write (merged) and records again.</summary>
    public static async Task RollBackAsync(QmpSource source, string disk, string newBitmap, string? mergeInto, IBackupProgress progress)
    {
        try
        {
            var node = await source.NodeAsync(disk);
            if (node.Bitmaps.All(b => b.Name != newBitmap)) return;
            var actions = new JsonArray();
            if (mergeInto is not null && node.Bitmaps.Any(b => b.Name == mergeInto))
            {
                actions.Add(Action("block-dirty-bitmap-merge", new JsonObject { ["node"] = disk, ["target"] = mergeInto, ["bitmaps"] = new JsonArray(newBitmap) }));
                actions.Add(Action("block-dirty-bitmap-enable", new JsonObject { ["node"] = disk, ["name"] = mergeInto }));
            }
            actions.Add(Action("block-dirty-bitmap-remove", new JsonObject { ["node"] = disk, ["name"] = newBitmap }));
            await source.ExecuteAsync("transaction", new JsonObject { ["actions"] = actions });
        }
        catch (Exception e) when (e is QmpException or BackupException)
        {
            progress.Message($"{disk}: could not tidy the bitmaps ({e.Message}); the next run will");
        }
    }

    /// <summary>
    /// Undoes what a killed run left on the source for these disks: our jobs are cancelled, our exports and nodes
    /// removed, and every bitmap of the repository other than the head's is merged into the head's (which records
    /// again). Extra bits only make the next incremental larger, never wrong.
    /// </summary>
    /// <param name="headBitmaps">Per disk, the bitmap of the repository's newest point (absent: no point).</param>
    /// <returns>The source's nodes when there was nothing to undo (as they still are: a plan can use them without asking
    /// again); null when something was undone.</returns>
    public static async Task<IReadOnlyList<SourceNode>?> RecoverAsync(QmpSource source, IReadOnlyDictionary<string, string?> headBitmaps, string prefix, IBackupProgress progress) =>
        await RecoverAsync(source, Query(source), headBitmaps, prefix, progress);

    /// <summary>What recovery reads of the source: its jobs, exports and nodes, and the events' mark from before.</summary>
    public sealed record SourceState(int Mark, Task<IReadOnlyList<(string Id, string Status, long Offset, long Length)>> Jobs,
        Task<IReadOnlyList<string>> Exports, Task<IReadOnlyList<SourceNode>> Nodes);

    /// <summary>Sends recovery's three queries at once (QMP answers them in order): a run with nothing to recover from,
    /// the usual case, waits one round trip for them instead of three, and a caller can send them before it has read
    /// what recovery also needs from its repository.</summary>
    public static SourceState Query(QmpSource source)
    {
        int mark = source.EventMark;
        return new SourceState(mark, source.JobsAsync(), source.ExportsAsync(), source.NodesAsync());
    }

    /// <param name="state">The source as <see cref="Query"/> asked it.</param>
    public static async Task<IReadOnlyList<SourceNode>?> RecoverAsync(QmpSource source, SourceState state, IReadOnlyDictionary<string, string?> headBitmaps, string prefix, IBackupProgress progress)
    {
        bool undone = false;
        var disks = headBitmaps.Keys.ToHashSet();
        int mark = state.Mark;
        await Task.WhenAll(state.Jobs, state.Exports, state.Nodes);
        var ours = (await state.Jobs).Where(j => j.Id.StartsWith("strata-job-", StringComparison.Ordinal) && disks.Contains(j.Id["strata-job-".Length..])).Select(j => j.Id).ToList();
        foreach (var job in ours)
        {
            progress.Message($"cancelling {job}, left running by an interrupted run");
            try { await source.ExecuteAsync("block-job-cancel", new JsonObject { ["device"] = job, ["force"] = true }); } catch (QmpException) { }
        }
        if (ours.Count > 0)
        {
            undone = true;
            await source.WaitJobsAsync(ours, mark, timeout: TimeSpan.FromMinutes(1));
        }
        foreach (var export in (await state.Exports).Where(e => e.StartsWith("strata-exp-", StringComparison.Ordinal) && disks.Contains(e["strata-exp-".Length..])))
        {
            undone = true;
            int exportMark = source.EventMark;
            try { await source.ExecuteAsync("block-export-del", new JsonObject { ["id"] = export, ["mode"] = "hard" }); } catch (QmpException) { }
            await source.WaitEventAsync("BLOCK_EXPORT_DELETED", e => e["data"]?["id"]?.GetValue<string>() == export, TimeSpan.FromSeconds(5), exportMark);
        }
        // Cancelled jobs and deleted exports change the nodes: asked again after them.
        var nodes = undone ? await source.NodesAsync() : await state.Nodes;
        foreach (var n in nodes.Where(n => n.Name.StartsWith("strata-tgt-", StringComparison.Ordinal) && disks.Contains(n.Name["strata-tgt-".Length..])))
        {
            undone = true;
            await DeleteNodeAsync(source, n.Name);
        }
        foreach (string disk in disks)
        {
            if (nodes.FirstOrDefault(n => n.Name == disk) is not { } node) continue;
            string? headBitmap = headBitmaps[disk];
            bool headPresent = node.Bitmaps.Any(b => b.Name == headBitmap && !b.Inconsistent);
            var actions = new JsonArray();
            foreach (var stray in node.Bitmaps.Where(b => b.Name.StartsWith(prefix, StringComparison.Ordinal) && b.Name != headBitmap))
            {
                if (headPresent && !stray.Inconsistent)
                    actions.Add(Action("block-dirty-bitmap-merge", new JsonObject { ["node"] = disk, ["target"] = headBitmap, ["bitmaps"] = new JsonArray(stray.Name) }));
                actions.Add(Action("block-dirty-bitmap-remove", new JsonObject { ["node"] = disk, ["name"] = stray.Name }));
            }
            // A head bitmap stopped by our own pull (a stray was merged into it) records again; one disabled by
            // someone else stays so, and the plan takes a full.
            if (actions.Count > 0 && headPresent && node.Bitmaps.First(b => b.Name == headBitmap) is { Recording: false })
                actions.Add(Action("block-dirty-bitmap-enable", new JsonObject { ["node"] = disk, ["name"] = headBitmap }));
            if (actions.Count == 0) continue;
            progress.Message($"{disk}: folding bitmaps left by an interrupted run into {headBitmap ?? "nothing (a full follows)"}");
            undone = true;
            await source.ExecuteAsync("transaction", new JsonObject { ["actions"] = actions });
        }
        return undone ? null : nodes;
    }

    /// <summary>Why the head point's bitmap cannot drive an incremental, or null when it can.</summary>
    public static string? WhyUnusable(SourceNode node, string bitmap) =>
        node.Bitmaps.FirstOrDefault(b => b.Name == bitmap) is not { } found ? $"bitmap '{bitmap}' is missing on the source (daemon restarted without it, or removed)"
        : found.Inconsistent ? $"bitmap '{bitmap}' is inconsistent (the source was not shut down cleanly)"
        : !found.Recording ? $"bitmap '{bitmap}' is disabled, so it missed writes"
        : null;
}
