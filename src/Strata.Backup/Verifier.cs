using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Backup;

/// <summary>One thing verify found wrong.</summary>
public sealed record VerifyProblem(string Disk, string? Id, string What);

/// <summary>
/// Re-checks a repository against its manifests: every chain link (parent present, the file's backing name and
/// format are the parent's file), every file (size, SHA-256, qcow2 metadata, virtual size) and, where a file's
/// hash differs, every stored extent, to say where the damage is.
/// </summary>
public static class Verifier
{
    public static List<VerifyProblem> Verify(Repository repo, string? disk = null, string? at = null, Action<string>? onPoint = null)
    {
        var problems = new List<VerifyProblem>();
        foreach (string d in disk is null ? repo.Disks() : [disk])
        {
            var points = repo.Points(d);
            var byId = points.ToDictionary(p => p.Id);
            IEnumerable<BackupManifest> selected = points;
            if (at is not null) selected = repo.ChainOf(repo.Find(d, at));
            var manifestFiles = points.Select(p => p.File).ToHashSet();
            // Files of an interrupted run (.partial, .fleece-) are not backups and never taken for one; the next run
            // removes them. Any other qcow2 without a manifest is suspicious.
            foreach (var stray in Directory.EnumerateFiles(repo.DiskDir(d), "*.qcow2").Select(Path.GetFileName)
                         .Where(f => !manifestFiles.Contains(f!) && !f!.StartsWith(Repository.FleecePrefix, StringComparison.Ordinal)))
                problems.Add(new VerifyProblem(d, null, $"{stray} has no manifest (not a backup; a leftover?)"));
            foreach (var p in selected)
            {
                onPoint?.Invoke($"{d}@{p.Id}");
                problems.AddRange(VerifyPoint(repo, p, byId).Select(what => new VerifyProblem(d, p.Id, what)));
            }
        }
        return problems;
    }

    private static IEnumerable<string> VerifyPoint(Repository repo, BackupManifest p, Dictionary<string, BackupManifest> byId)
    {
        var problems = new List<string>();
        string path = repo.FilePath(p);
        BackupManifest? parent = null;
        if (p.Parent is not null && !byId.TryGetValue(p.Parent, out parent))
            problems.Add($"its parent point {p.Parent} is missing: the chain is broken");
        if (p.Level == "full" && p.Parent is not null) problems.Add("a full with a parent");
        if (!File.Exists(path))
        {
            problems.Add($"the backup file {p.File} is missing");
            return problems;
        }
        long size = new FileInfo(path).Length;
        if (size != p.FileSize) problems.Add($"{p.File} is {size} bytes, the manifest says {p.FileSize}");
        var wholeFile = Task.Run(() => ImageDigest.FileSha256(path));
        BlockImage image;
        try
        {
            image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true);
        }
        catch (BlockException e)
        {
            if (wholeFile.GetAwaiter().GetResult() != p.FileSha256) problems.Add(HashMismatch(p));
            problems.Add($"{p.File} cannot be opened: {e.Message}");
            return problems;
        }
        using (image)
        {
            if (image.Size != p.VirtualSize) problems.Add($"{p.File} has virtual size {image.Size}, the manifest says {p.VirtualSize}");
            string? expectBacking = parent?.File ?? (p.Parent is null ? null : "?");
            if (p.Parent is null && image.BackingFileName is not null)
                problems.Add($"{p.File} is a full but names a backing file '{image.BackingFileName}'");
            else if (parent is not null && image.BackingFileName != expectBacking)
                problems.Add($"{p.File} is backed by '{image.BackingFileName ?? "nothing"}', but its parent is {parent.File}: the chain link is wrong");
            else if (parent is not null && image.BackingFormat is not (null or "qcow2"))
                problems.Add($"{p.File} names backing format '{image.BackingFormat}', expected qcow2");
            if (image is Qcow2Image q)
            {
                var report = q.Check(RepairMode.None);
                if (report.Corruptions > 0 || report.CheckErrors > 0) problems.Add($"{p.File} has {report.Corruptions} corruption(s) and {report.CheckErrors} check error(s) in its qcow2 metadata");
            }
            // Every stored extent re-read against its checksum (beside the whole-file hash): this says where damage is.
            var now = ImageDigest.TopLayer(image);
            if (wholeFile.GetAwaiter().GetResult() != p.FileSha256) problems.Insert(0, HashMismatch(p));
            {
                var expected = p.Extents.ToHashSet();
                foreach (var e in now.Where(e => !expected.Contains(e)).Take(5))
                    problems.Add($"range {e.Offset}+{e.Length} ({e.Kind}) differs from the manifest");
                var found = now.ToHashSet();
                foreach (var e in p.Extents.Where(e => !found.Contains(e)).Take(5))
                    problems.Add($"range {e.Offset}+{e.Length} ({e.Kind}) recorded in the manifest is not in the file as recorded");
            }
        }
        return problems;
    }

    private static string HashMismatch(BackupManifest p) => $"{p.File} does not match its SHA-256 (changed or damaged since it was written)";
}
