using Strata.Block;
using Strata.Block.Operations;

namespace Strata.Backup;

/// <summary>
/// Removes the points a retention policy does not keep without breaking a chain: a removed point's data is
/// merged into its successor (which then names the removed point's parent as its backing file), so that every
/// remaining point still reads exactly as it did.
/// </summary>
public static class Pruner
{
    public static List<BackupManifest> Prune(Repository repo, RetentionPolicy policy, Action<string>? log = null, bool dryRun = false)
    {
        var removed = new List<BackupManifest>();
        foreach (string disk in repo.Disks())
        {
            var keep = policy.Keep(repo.Points(disk).Select(p => (p.Id, p.Time)));
            // Oldest first, so that a run of removed points folds forward one at a time.
            foreach (var doomed in repo.Points(disk).Where(p => !keep.Contains(p.Id)).ToList())
            {
                var current = repo.Points(disk);
                var point = current.First(p => p.Id == doomed.Id);
                var child = current.FirstOrDefault(p => p.Parent == point.Id);
                log?.Invoke(child is null ? $"{disk}@{point.Id}: remove" : $"{disk}@{point.Id}: merge into {child.Id} and remove");
                removed.Add(point);
                if (dryRun) continue;
                if (child is null) repo.DeletePoint(point);
                else
                {
                    repo.BeginMerge(point, child);
                    Merge(repo, point, child);
                }
            }
        }
        return removed;
    }

    /// <summary>
    /// Folds <paramref name="removed"/> into <paramref name="successor"/>. Idempotent, so that a prune killed half way
    /// is finished by running this again: the successor only gains clusters it read through to anyway.
    /// </summary>
    internal static void Merge(Repository repo, BackupManifest removed, BackupManifest successor)
    {
        string succPath = repo.FilePath(successor);
        BackupManifest? grandparent = removed.Parent is null ? null : repo.Points(removed.Disk).FirstOrDefault(p => p.Id == removed.Parent);
        using (var image = ImageOpener.Open(succPath, "qcow2", readOnly: false, openBacking: false))
        {
            // Not yet rebased (an earlier, interrupted attempt may have done it: then only the bookkeeping is left).
            if (image.BackingFileName == removed.File)
            {
                using var oldBacking = ImageOpener.Open(repo.FilePath(removed), "qcow2", readOnly: true);
                using var newBacking = grandparent is null ? null : ImageOpener.Open(repo.FilePath(grandparent), "qcow2", readOnly: true);
                ChainOperations.Rebase(image, oldBacking, newBacking, grandparent?.File, grandparent is null ? null : "qcow2");
            }
            image.Flush();
        }
        repo.WriteManifest(ImageDigest.Describe(successor with { Parent = removed.Parent, Level = removed.Parent is null ? "full" : successor.Level }, succPath));
        if (File.Exists(Path.Combine(repo.DiskDir(removed.Disk), removed.Id + ".json")) || File.Exists(repo.FilePath(removed)))
            repo.DeletePoint(removed);
        repo.EndMerge();
    }
}
