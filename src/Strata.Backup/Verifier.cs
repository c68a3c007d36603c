using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>One thing verify found wrong.</summary>
public sealed record VerifyProblem(string Disk, string? Id, string What);

/// <summary>
/// Re-checks a repository against its manifests: every chain link (parent present, the file's backing name and
/// format are the parent's file), every file (size, SHA-256, qcow2 metadata, virtual size) and, where a file's
/// hash differs, every stored extent, to say where the damage is. A point's granule digests are checked against its
/// data: each point's are built from its own layer over its parent's (as a backup run builds them), in the same
/// read as the extents, so the chain is not read again.
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
            // The digests built so far, kept only while a point still to come is built on them.
            var built = new Dictionary<string, GranuleDigests>();
            var children = selected.Where(p => p.Parent is not null).GroupBy(p => p.Parent!).ToDictionary(g => g.Key, g => g.Count());
            bool anyDigests = points.Any(p => p.Digests is not null);
            // Files of an interrupted run (.partial, .fleece-) are not backups and never taken for one; the next run
            // removes them. Any other qcow2 without a manifest is suspicious.
            foreach (var stray in Directory.EnumerateFiles(repo.DiskDir(d), "*.qcow2").Select(Path.GetFileName)
                         .Where(f => !manifestFiles.Contains(f!) && !f!.StartsWith(Repository.FleecePrefix, StringComparison.Ordinal)))
                problems.Add(new VerifyProblem(d, null, $"{stray} has no manifest (not a backup; a leftover?)"));
            foreach (var p in selected)
            {
                onPoint?.Invoke($"{d}@{p.Id}");
                var digests = new PointDigests(anyDigests, built, children);
                problems.AddRange(VerifyPoint(repo, p, byId, digests).Select(what => new VerifyProblem(d, p.Id, what)));
            }
        }
        return problems;
    }

    /// <summary>The digests built for the points verified so far, and how many children each still has to come.</summary>
    private sealed record PointDigests(bool Wanted, Dictionary<string, GranuleDigests> Built, Dictionary<string, int> Children)
    {
        /// <summary>A builder for <paramref name="p"/>'s digests on its parent's, or null when they cannot be built
        /// from its layer (its parent's were not built: its chain is broken, or the granularity changed).</summary>
        public GranuleDigestBuilder? BuilderFor(BackupManifest p)
        {
            if (!Wanted) return null;
            GranuleDigests? parent = null;
            if (p.Parent is not null)
            {
                if (!Built.TryGetValue(p.Parent, out parent)) return null;
                if (--Children[p.Parent] == 0) Built.Remove(p.Parent);
            }
            long granularity = p.Digests?.Granularity ?? parent?.Granularity ?? BackupRunner.DigestGranularityFor(p.VirtualSize);
            if (parent is not null && (parent.Granularity != granularity || parent.DiskSize != p.VirtualSize)) return null;
            return new GranuleDigestBuilder(p.VirtualSize, granularity, parent);
        }

        public void Keep(BackupManifest p, GranuleDigests digests)
        {
            if (Children.GetValueOrDefault(p.Id) > 0) Built[p.Id] = digests;
        }
    }

    private static IEnumerable<string> VerifyPoint(Repository repo, BackupManifest p, Dictionary<string, BackupManifest> byId, PointDigests digests)
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
        if (p.Format > ImageDigest.ManifestFormat)
        {
            // Its digests are defined in a way this version does not know: checked here, they would all look damaged.
            problems.Add($"its manifest is format {p.Format}, newer than this strata reads (up to {ImageDigest.ManifestFormat}): verify it with a newer strata");
            return problems;
        }
        long size = new FileInfo(path).Length;
        if (size != p.FileSize) problems.Add($"{p.File} is {size} bytes, the manifest says {p.FileSize}");
        // Formats 2 and 3 record the digest of the file's 64 KiB blocks, format 1 the SHA-256 of the whole file.
        bool blocks = p.Format >= 2;
        var wholeFile = Task.Run(() => blocks ? ImageDigest.FileBlockDigest(path) : ImageDigest.FileSha256(path));
        string? recorded = blocks ? p.FileDigest : p.FileSha256;
        BlockImage image;
        try
        {
            image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true);
        }
        catch (BlockException e)
        {
            if (wholeFile.GetAwaiter().GetResult() != recorded) problems.Add(HashMismatch(p));
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
            var builder = image.Size == p.VirtualSize ? digests.BuilderFor(p) : null;
            var now = ImageDigest.TopLayer(image, builder, format: p.Format);
            if (wholeFile.GetAwaiter().GetResult() != recorded) problems.Insert(0, HashMismatch(p));
            HashSet<ExtentDigest>? expected = null;
            try
            {
                expected = p.Extents.ToHashSet();
            }
            catch (UnreadableExtentsException e)
            {
                problems.Add($"its manifest's extent list is unreadable: {e.Detail}");
            }
            if (expected is not null)
            {
                foreach (var e in now.Where(e => !expected.Contains(e)).Take(5))
                    problems.Add($"range {e.Offset}+{e.Length} ({e.Kind}) differs from the manifest");
                var found = now.ToHashSet();
                foreach (var e in p.Extents.Where(e => !found.Contains(e)).Take(5))
                    problems.Add($"range {e.Offset}+{e.Length} ({e.Kind}) recorded in the manifest is not in the file as recorded");
            }
            if (p.Digests is not null || builder is not null) problems.AddRange(CheckDigests(repo, p, path, builder, digests));
        }
        return problems;
    }

    /// <summary>The point's digests file against its manifest (SHA-256, geometry) and against the point's data.</summary>
    private static IEnumerable<string> CheckDigests(Repository repo, BackupManifest p, string path, GranuleDigestBuilder? builder, PointDigests digests)
    {
        var problems = new List<string>();
        GranuleDigests? actual = null;
        try
        {
            if (builder is not null) actual = ImageDigest.FinishGranules(builder, path);
            else if (p.Digests is not null)
                using (var chain = ImageOpener.Open(path, "qcow2", readOnly: true)) actual = ImageDigest.ChainGranules(chain, p.Digests.Granularity);
        }
        catch (BlockException e)
        {
            problems.Add($"its data cannot be read to check its digests: {e.Message}");
        }
        if (actual is not null) digests.Keep(p, actual);
        var (stored, problem) = repo.ReadDigests(p);
        if (problem is not null) problems.Add(problem);
        if (stored is null || actual is null) return problems;
        var differing = stored.Differences(actual).ToList();
        if (differing.Count > 0)
            problems.Add($"its digests file {p.Digests!.File} disagrees with the point's data in {differing.Count} granule(s), the first at offset {stored.OffsetOf(differing[0])}");
        return problems;
    }

    private static string HashMismatch(BackupManifest p) =>
        $"{p.File} does not match its {(p.Format >= 2 ? "digest" : "SHA-256")} (changed or damaged since it was written)";
}
