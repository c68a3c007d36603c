using Microsoft.Win32.SafeHandles;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>What a runner knows of a point before its file is described: the manifest's members that do not come from
/// the file.</summary>
public sealed record PointFacts(string Id, string Disk, DateTimeOffset Time, bool Incremental, string? Parent, string File, string Mode,
    string Source, string Node, string Bitmap, long VirtualSize, string? Note);

/// <summary>
/// The last step of every point, whatever its source (QMP, libvirt, offline): the finished file takes its final
/// name, its manifest is filled from the file (sizes, SHA-256s), its granule digests are computed (read from the disk
/// by a differential, or built from the file's own layer over the last point's), and the digests and manifest are
/// written and fsynced beside the file's own fsync, then renamed into place once the file is durable — the point
/// exists from the manifest's rename on.
/// </summary>
public static class PointCommit
{
    /// <param name="facts">The point as the runner knows it; the file-derived members are filled here.</param>
    /// <param name="headDigests">The last point's digests (incrementals), null when it has none.</param>
    /// <param name="headDigestsProblem">Why the last point has none, for the message.</param>
    /// <param name="diskDigests">The digests a differential computed from the disk itself, if any.</param>
    /// <param name="syncThrough">Null when the writer fsynced the file. Otherwise a descriptor on it, opened before
    /// anything was written to it and held since (a push target added with cache.no-flush, this tool's own pull): the
    /// file is fsynced through it here, beside the hashing, before the manifest names it. A descriptor opened only now
    /// could miss a write-back error: the kernel keeps one only while the file's inode is in memory.</param>
    public static BackupManifest Commit(Repository repo, IBackupProgress progress, PointFacts facts, string partialPath, string finalPath,
        GranuleDigests? headDigests, string? headDigestsProblem, GranuleDigests? diskDigests = null, SafeFileHandle? syncThrough = null)
    {
        var point = new BackupManifest
        {
            Id = facts.Id, Disk = facts.Disk, Time = facts.Time, Level = facts.Incremental ? "inc" : "full", Parent = facts.Parent,
            File = facts.File, Mode = facts.Mode, Source = facts.Source, Node = facts.Node, Bitmap = facts.Bitmap,
            VirtualSize = facts.VirtualSize, Note = facts.Note,
            CopiedBytes = 0, FileSize = 0, FileSha256 = "", Extents = [],
        };
        File.Move(partialPath, finalPath, overwrite: false);
        try
        {
            // The disk works on the fsync while both cores hash what is already in the page cache. A thread of its own:
            // on the pool, the blocked fsync would hold the worker the whole-file hash is queued for.
            var synced = syncThrough is null ? Task.CompletedTask
                : Task.Factory.StartNew(() => Durability.SyncFile(syncThrough, finalPath), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
            BackupManifest manifest;
            GranuleDigests? digests;
            try
            {
                bool incremental = point.Level == "inc";
                // Carried over from the last point; none when the last point has none (its granules are unknown).
                GranuleDigestBuilder? builder = diskDigests is null && (!incremental || headDigests is not null)
                    ? new GranuleDigestBuilder(point.VirtualSize, headDigests?.Granularity ?? BackupRunner.DigestGranularityFor(point.VirtualSize), headDigests)
                    : null;
                manifest = ImageDigest.Describe(point, finalPath, builder);
                digests = diskDigests ?? (builder is null ? null : ImageDigest.FinishGranules(builder, finalPath));
            }
            catch
            {
                // No fsync left running behind the error (its own failure, if any, is the lesser news).
                try { synced.Wait(); } catch (AggregateException) { }
                throw;
            }
            if (digests is null) progress.Message($"{point.Disk}: this point records no digests: {headDigestsProblem}; the next full or differential by comparison records them again");
            try
            {
                // The file is durable before the manifest that makes it a point: the manifest and digests are written and
                // fsynced beside the file's fsync, and renamed into place once it is done.
                return repo.CommitPoint(manifest, digests, fileDurable: synced);
            }
            catch
            {
                try { synced.Wait(); } catch (AggregateException) { }
                throw;
            }
        }
        catch when (!File.Exists(Path.ChangeExtension(finalPath, ".json")))
        {
            // Not a point: back to its partial name, which the next run removes (a file under a point's name without
            // a manifest would be reported by every verify).
            try { File.Move(finalPath, partialPath, overwrite: true); } catch (IOException) { }
            throw;
        }
    }

    /// <summary>Reads the last point's digests for an incremental on it, with the reason when there are none (as
    /// verify words it: "the last point's …").</summary>
    public static (GranuleDigests? Digests, string? Problem) HeadDigests(Repository repo, BackupManifest? head)
    {
        if (head is null) return (null, null);
        var (digests, problem) = repo.ReadDigests(head);
        if (digests is null)
            problem = problem is null ? "the last point has no digests (taken before they were recorded)" : "the last point's " + problem["its ".Length..];
        return (digests, problem);
    }
}
