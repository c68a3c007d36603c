using System.Globalization;
using System.Text;
using System.Text.Json;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>
/// A backup repository on a local folder: <c>strata-repository.json</c>, a lock file, and one folder per disk
/// holding <c>ID.qcow2</c> (backed by the previous point, by relative name), <c>ID.digests</c> (the disk's granule
/// digests as of the point) and <c>ID.json</c> (its manifest, naming the other two).
/// Files still being written end in <c>.partial</c>; a qcow2 without a manifest is not a backup.
/// </summary>
public sealed class Repository
{
    public const string MarkerFile = "strata-repository.json";
    public const string PartialSuffix = ".partial";
    public const string FleecePrefix = ".fleece-";
    public const string DigestsSuffix = ".digests";
    private const string PruneJournal = "prune.journal";

    public string Root { get; }

    /// <summary>A short random tag of this repository, part of every bitmap name it owns on a source, so that two
    /// repositories backing up the same disk never take each other's bitmaps.</summary>
    public string Tag { get; }

    /// <summary>The prefix of the names of every bitmap this repository owns.</summary>
    public string BitmapPrefix => $"strata-{Tag}-";

    /// <summary>The manifests read per disk while this process holds the lock: nobody else writes them then, and this
    /// process's own writes (<see cref="CommitPoint"/>, <see cref="DeletePoint"/>) drop the disk's entry. A run asks
    /// for the same points several times (recovery, clean-up, the new id, the plan); each read parses every manifest.</summary>
    private readonly Dictionary<string, IReadOnlyList<BackupManifest>> _pointsWhileLocked = [];
    private bool _locked;

    private Repository(string root, string tag)
    {
        Root = root;
        Tag = tag;
    }

    public static Repository Init(string path)
    {
        string root = Path.GetFullPath(path);
        if (File.Exists(Path.Combine(root, MarkerFile)))
            throw new BackupException($"'{root}' is already a Strata repository", exitCode: BackupExitCodes.Usage);
        if (Directory.Exists(root) && Directory.EnumerateFileSystemEntries(root).Any())
            throw new BackupException($"'{root}' exists and is not empty", "choose a new or empty folder", BackupExitCodes.Usage);
        Directory.CreateDirectory(root);
        string tag = Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(4));
        var config = new RepositoryConfig { Format = 1, Tag = tag, Created = DateTimeOffset.UtcNow };
        WriteAtomically(Path.Combine(root, MarkerFile), [.. JsonSerializer.SerializeToUtf8Bytes(config, BackupJson.Default.RepositoryConfig), (byte)'\n']);
        return new Repository(root, tag);
    }

    public static Repository Open(string path)
    {
        string root = Path.GetFullPath(path);
        if (!File.Exists(Path.Combine(root, MarkerFile)))
            throw new BackupException($"'{root}' is not a Strata repository", $"create one with: strata backup init {path}", BackupExitCodes.Usage);
        try
        {
            var config = JsonSerializer.Deserialize(File.ReadAllBytes(Path.Combine(root, MarkerFile)), BackupJson.Default.RepositoryConfig)
                ?? throw new JsonException("the file holds null");
            return new Repository(root, config.Tag);
        }
        catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException)
        {
            throw new BackupException($"'{Path.Combine(root, MarkerFile)}' is damaged: {e.Message}", "it must hold the repository's format and tag");
        }
    }

    /// <summary>The lock file's pid field: wider than any Linux pid (at most 4 194 304).</summary>
    private const int PidWidth = 10;

    /// <summary>Takes the repository's exclusive lock (an advisory flock, released when the process dies).</summary>
    public RepositoryLock Lock()
    {
        string path = Path.Combine(Root, "lock");
        FileStream stream;
        try
        {
            stream = new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
        }
        catch (IOException)
        {
            string holder = UnlockedRead.Text(path)?.Split('\n')[0].Trim() ?? "";
            throw new BackupException($"the repository is locked by another run{(holder.Length > 0 ? " (pid " + holder + ")" : "")}",
                "wait for it to finish; the lock goes away by itself when that process ends", BackupExitCodes.Locked);
        }
        // The holder's pid, for the message of a run that finds the lock taken. Written over the old one in place, padded
        // to one width, not after a truncation: freeing the file's block is a journal update that cost a third of a
        // millisecond of every run, and waits behind any commit of the journal under way.
        RandomAccess.Write(stream.SafeFileHandle, Encoding.ASCII.GetBytes(Environment.ProcessId.ToString(CultureInfo.InvariantCulture).PadRight(PidWidth) + "\n"), 0);
        var held = new RepositoryLock(stream, this);
        _locked = true;
        try
        {
            FinishInterruptedPrune();
        }
        catch
        {
            held.Dispose(); // or the lock stays held by this process until its stream is collected
            throw;
        }
        return held;
    }

    public string DiskDir(string disk) => Path.Combine(Root, disk);

    public string FilePath(BackupManifest m) => Path.Combine(DiskDir(m.Disk), m.File);

    public IReadOnlyList<string> Disks() =>
        Directory.Exists(Root)
            ? Directory.EnumerateDirectories(Root).Select(d => Path.GetFileName(d)).Where(d => !d.StartsWith('.')).Order(StringComparer.Ordinal).ToList()
            : [];

    /// <summary>Every committed point of a disk, oldest first.</summary>
    public IReadOnlyList<BackupManifest> Points(string disk)
    {
        if (_locked && _pointsWhileLocked.TryGetValue(disk, out var known)) return known;
        var points = ReadPoints(disk);
        if (_locked) _pointsWhileLocked[disk] = points;
        return points;
    }

    private IReadOnlyList<BackupManifest> ReadPoints(string disk)
    {
        string dir = DiskDir(disk);
        if (!Directory.Exists(dir)) return [];
        var list = new List<BackupManifest>();
        foreach (var file in Directory.EnumerateFiles(dir, "*.json"))
        {
            try
            {
                list.Add(BackupManifest.ParseDeferringExtents(File.ReadAllBytes(file)));
            }
            catch (JsonException e)
            {
                throw new BackupException($"manifest '{file}' is unreadable: {e.Message}", "run `strata backup verify` to see what else is damaged");
            }
        }
        return list.OrderBy(m => m.Time).ThenBy(m => m.Id, StringComparer.Ordinal).ToList();
    }

    /// <summary>Every point of every disk, oldest first.</summary>
    public IReadOnlyList<BackupManifest> AllPoints() => Disks().SelectMany(Points).OrderBy(m => m.Time).ThenBy(m => m.Disk, StringComparer.Ordinal).ToList();

    /// <summary>The points from the chain's full up to <paramref name="point"/>.</summary>
    public IReadOnlyList<BackupManifest> ChainOf(BackupManifest point)
    {
        var byId = Points(point.Disk).ToDictionary(m => m.Id);
        var chain = new List<BackupManifest> { point };
        for (var m = point; m.Parent is { } parent;)
        {
            if (!byId.TryGetValue(parent, out m!))
                throw new BackupException($"the chain of {point.Disk}@{point.Id} is broken: point {parent} is missing", "run `strata backup verify`");
            if (chain.Count > byId.Count) throw new BackupException($"the chain of {point.Disk}@{point.Id} loops");
            chain.Add(m);
        }
        chain.Reverse();
        return chain;
    }

    /// <summary>A point by id, or the newest at or before a time (ISO 8601, or "latest").</summary>
    public BackupManifest Find(string disk, string at) => PointSelection.Find(Points(disk), disk, at, p => p.Id, p => p.Time, Disks);

    /// <summary>A fresh run id from the time: sortable, unique within the repository. An id is taken when any disk has a
    /// manifest or a backup file of that name (looked up by name: the other disks' manifests are not read for it).</summary>
    public string NewId(DateTimeOffset now)
    {
        string baseId = now.UtcDateTime.ToString("yyyyMMdd'T'HHmmss'Z'", CultureInfo.InvariantCulture);
        var disks = Disks();
        bool Taken(string id) => disks.Any(d => File.Exists(Path.Combine(DiskDir(d), id + ".json")) || File.Exists(Path.Combine(DiskDir(d), id + ".qcow2")));
        string id = baseId;
        for (int n = 2; Taken(id); n++) id = $"{baseId}-{n}";
        return id;
    }

    public void WriteManifest(BackupManifest m) => CommitPoint(m, digests: null);

    /// <summary>
    /// Writes a point's digests file (when it has digests) and its manifest, which names it; the point exists from the
    /// manifest's rename on. Both files are written to temporaries and fsynced side by side (one wait for the disk, not
    /// two in a row), then renamed digests first — so the manifest never names digests that are not on disk.
    /// </summary>
    /// <param name="fileDurable">The backup file's own fsync, when it still runs: the two files are written and fsynced
    /// beside it (the disk takes all three at once), and renamed only once it is done — a manifest never names a file
    /// that is not on disk. Its failure is thrown as itself, and nothing is renamed.</param>
    /// <returns>The manifest as written: with its <see cref="BackupManifest.Digests"/> reference when digests were given.</returns>
    public BackupManifest CommitPoint(BackupManifest m, GranuleDigests? digests, Task? fileDurable = null)
    {
        string dir = DiskDir(m.Disk);
        Directory.CreateDirectory(dir);
        var files = new List<(string Path, byte[] Content)>(2);
        if (digests is not null)
        {
            byte[] content = GranuleDigestsFile.Serialize(digests);
            string name = m.Id + DigestsSuffix;
            m = m with { Digests = new DigestsReference(name, digests.Granularity, Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(content))) };
            files.Add((Path.Combine(dir, name), content));
        }
        files.Add((Path.Combine(dir, m.Id + ".json"), m.Serialize()));
        _pointsWhileLocked.Remove(m.Disk);
        WriteAtomically(files, fileDurable);
        return m;
    }

    public void DeletePoint(BackupManifest m)
    {
        _pointsWhileLocked.Remove(m.Disk);
        // The manifest goes first: a crash in between leaves an unreferenced file, never a manifest without data.
        File.Delete(Path.Combine(DiskDir(m.Disk), m.Id + ".json"));
        File.Delete(FilePath(m));
        if (m.Digests is not null) File.Delete(Path.Combine(DiskDir(m.Disk), m.Digests.File));
    }

    /// <summary>A point's digests, checked against the manifest (SHA-256, disk size, granularity): null without a
    /// problem when the point has none (taken before they were recorded), null with the problem when they are
    /// missing or damaged.</summary>
    public (GranuleDigests? Digests, string? Problem) ReadDigests(BackupManifest m)
    {
        if (m.Digests is not { } reference) return (null, null);
        string path = Path.Combine(DiskDir(m.Disk), reference.File);
        byte[] content;
        try
        {
            content = File.ReadAllBytes(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            return (null, $"its digests file {reference.File} cannot be read: {e.Message}");
        }
        if (Convert.ToHexStringLower(System.Security.Cryptography.SHA256.HashData(content)) != reference.Sha256)
            return (null, $"its digests file {reference.File} does not match its SHA-256 (changed or damaged since it was written)");
        GranuleDigests digests;
        try
        {
            digests = GranuleDigestsFile.Parse(content);
        }
        catch (GranuleDigestsFormatException e)
        {
            return (null, $"its digests file {reference.File} is unreadable: {e.Message}");
        }
        if (digests.DiskSize != m.VirtualSize || digests.Granularity != reference.Granularity)
            return (null, $"its digests file {reference.File} covers {digests.DiskSize} bytes at {digests.Granularity}, the manifest says {m.VirtualSize} at {reference.Granularity}");
        return (digests, null);
    }

    /// <summary>Removes what an interrupted run left: partial backup files, fleecing images, half-written files and
    /// digests files that no manifest names (the run died before its manifest was written).</summary>
    /// <param name="keep">Files (full paths) the calling run has made already, which are not leftovers.</param>
    public IReadOnlyList<string> CleanLeftovers(IReadOnlySet<string>? keep = null)
    {
        var removed = new List<string>();
        foreach (var disk in Disks())
        {
            var named = Points(disk).Select(p => p.Digests?.File).OfType<string>().ToHashSet();
            foreach (var f in Directory.EnumerateFiles(DiskDir(disk)))
            {
                string name = Path.GetFileName(f);
                if (keep is not null && keep.Contains(f)) continue;
                if (name.EndsWith(PartialSuffix, StringComparison.Ordinal) || name.StartsWith(FleecePrefix, StringComparison.Ordinal) || name.EndsWith(".tmp", StringComparison.Ordinal)
                    || name.EndsWith(DigestsSuffix, StringComparison.Ordinal) && !named.Contains(name))
                {
                    File.Delete(f);
                    removed.Add(Path.Combine(disk, name));
                }
            }
        }
        return removed;
    }

    // ------------------------------------------------------------------ prune journal

    /// <summary>Records a merge of <paramref name="removed"/> into <paramref name="successor"/> before it starts.</summary>
    internal void BeginMerge(BackupManifest removed, BackupManifest successor) =>
        WriteAtomically(Path.Combine(Root, PruneJournal), JsonSerializer.SerializeToUtf8Bytes([removed, successor], BackupJson.Default.BackupManifestArray));

    internal void EndMerge() => File.Delete(Path.Combine(Root, PruneJournal));

    /// <summary>
    /// A prune killed in the middle of a merge is finished: the merge is idempotent (it only fills the successor
    /// with what it read through to anyway), so it is simply run again.
    /// </summary>
    private void FinishInterruptedPrune()
    {
        string path = Path.Combine(Root, PruneJournal);
        if (!File.Exists(path)) return;
        BackupManifest[]? pair;
        try
        {
            pair = JsonSerializer.Deserialize(File.ReadAllBytes(path), BackupJson.Default.BackupManifestArray);
        }
        catch (JsonException e)
        {
            throw new BackupException($"'{path}' (the journal of an interrupted prune) is damaged: {e.Message}",
                "run `strata backup verify`; with no prune running, removing the journal lets runs go on");
        }
        if (pair is not { Length: 2 }) { File.Delete(path); return; }
        Pruner.Merge(this, pair[0], pair[1]);
    }

    /// <summary>Writes a file so that readers see the old or the new content, never a mix: temp, fsync, rename.</summary>
    public static void WriteAtomically(string path, byte[] content) => WriteAtomically([(path, content)]);

    /// <summary>Writes files so that each is seen whole or not at all, and none is renamed into place before all are
    /// on disk: every temporary is written, all are fsynced at once (the waits overlap), then they are renamed in the
    /// order given, and their folders are fsynced.</summary>
    /// <param name="beforeRename">Waited for once the temporaries are on disk, before the first rename (another file's
    /// fsync that the renamed files must not be seen without); its failure leaves no temporary behind.</param>
    private static void WriteAtomically(IReadOnlyList<(string Path, byte[] Content)> files, Task? beforeRename = null)
    {
        var streams = new FileStream[files.Count];
        bool durable = false;
        try
        {
            for (int i = 0; i < files.Count; i++)
            {
                streams[i] = new FileStream(files[i].Path + ".tmp", FileMode.Create, FileAccess.Write, FileShare.None);
                streams[i].Write(files[i].Content);
            }
            if (streams.Length == 1) streams[0].Flush(flushToDisk: true);
            else
            {
                // Each on a thread of its own: a pool thread can come late on a busy machine, and then the fsyncs run
                // one after the other again. Every one is waited for (none still running when the streams close), and
                // the first failure is thrown as itself.
                var flushes = streams.Select(s => Task.Factory.StartNew(() => s.Flush(flushToDisk: true), CancellationToken.None,
                    TaskCreationOptions.LongRunning, TaskScheduler.Default)).ToArray();
                Task.WhenAll(flushes).GetAwaiter().GetResult();
            }
            beforeRename?.GetAwaiter().GetResult();
            durable = true;
        }
        finally
        {
            foreach (var s in streams) s?.Dispose();
            if (!durable)
                foreach (var (path, _) in files)
                    try { File.Delete(path + ".tmp"); } catch (IOException) { }
        }
        foreach (var (path, _) in files) File.Move(path + ".tmp", path, overwrite: true);
        // The renames themselves: a point exists for a reader at its manifest's rename, after a power cut only once
        // its folder is on disk too.
        foreach (string dir in files.Select(f => Path.GetDirectoryName(Path.GetFullPath(f.Path))!).Distinct(StringComparer.Ordinal))
            Durability.SyncDirectory(dir);
    }

    internal void Unlocked()
    {
        _locked = false;
        _pointsWhileLocked.Clear();
    }
}

/// <summary>The held repository lock.</summary>
public sealed class RepositoryLock(FileStream stream, Repository repository) : IDisposable
{
    public void Dispose()
    {
        repository.Unlocked();
        stream.Dispose();
    }
}
