using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>What a runner knows of a point before its file is described: the manifest's members that do not come from
/// the file.</summary>
public sealed record PointFacts(string Id, string Disk, DateTimeOffset Time, bool Incremental, string? Parent, string File, string Mode,
    string Source, string Node, string Bitmap, long VirtualSize, string? Note);

/// <summary>
/// The last step of every point, whatever its source (QMP, libvirt, offline): the finished file takes its final
/// name, its manifest is filled from the file (sizes, SHA-256s), its granule digests are written (read from the disk
/// by a differential, or built from the file's own layer over the last point's), and only then is the manifest
/// written — the point exists from that write on.
/// </summary>
public static class PointCommit
{
    /// <param name="facts">The point as the runner knows it; the file-derived members are filled here.</param>
    /// <param name="headDigests">The last point's digests (incrementals), null when it has none.</param>
    /// <param name="headDigestsProblem">Why the last point has none, for the message.</param>
    /// <param name="diskDigests">The digests a differential computed from the disk itself, if any.</param>
    /// <param name="fileSynced">False when the writer left the file's data to the page cache (a push target opened
    /// with cache.no-flush, this tool's own pull): it is fsynced here, beside the hashing, before the manifest names it.</param>
    public static BackupManifest Commit(Repository repo, IBackupProgress progress, PointFacts facts, string partialPath, string finalPath,
        GranuleDigests? headDigests, string? headDigestsProblem, GranuleDigests? diskDigests = null, bool fileSynced = true)
    {
        var point = new BackupManifest
        {
            Id = facts.Id, Disk = facts.Disk, Time = facts.Time, Level = facts.Incremental ? "inc" : "full", Parent = facts.Parent,
            File = facts.File, Mode = facts.Mode, Source = facts.Source, Node = facts.Node, Bitmap = facts.Bitmap,
            VirtualSize = facts.VirtualSize, Note = facts.Note,
            CopiedBytes = 0, FileSize = 0, FileSha256 = "", Extents = [],
        };
        File.Move(partialPath, finalPath, overwrite: false);
        // The disk works on the fsync while both cores hash what is already in the page cache. A thread of its own: on
        // the pool, the blocked fsync would hold the worker the whole-file hash is queued for.
        var synced = fileSynced ? Task.CompletedTask : Task.Factory.StartNew(() => SyncFile(finalPath), CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
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
        finally
        {
            // Awaited on every path: a failed describe leaves no fsync running behind the error.
            synced.ContinueWith(_ => { }, TaskScheduler.Default).Wait();
        }
        // The file is durable before the manifest that makes it a point.
        synced.GetAwaiter().GetResult();
        if (digests is null) progress.Message($"{point.Disk}: this point records no digests: {headDigestsProblem}; the next full or differential by comparison records them again");
        return repo.CommitPoint(manifest, digests);
    }

    private static void SyncFile(string path)
    {
        using var file = new FileStream(path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite, bufferSize: 0);
        file.Flush(flushToDisk: true);
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
