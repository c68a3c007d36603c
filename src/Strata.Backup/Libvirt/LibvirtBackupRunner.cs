using Strata.Formats.Backup;
using System.Runtime.InteropServices;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Backup.Libvirt;

/// <summary>What `strata backup run --domain` is asked to do.</summary>
public sealed record LibvirtRunOptions
{
    public required string Domain { get; init; }
    /// <summary>The libvirt URI (virsh's --connect).</summary>
    public string Connect { get; init; } = "qemu:///system";
    /// <summary>The disk targets (vda, vdb…) to back up; empty for every disk of the domain.</summary>
    public IReadOnlyList<string> Disks { get; init; } = [];
    /// <summary>"auto", "full" or "inc".</summary>
    public string Level { get; init; } = "auto";
    /// <summary>Testing hook: once libvirt's job runs and before anything is read, wait this long (a signal ends the
    /// wait), so that a test can kill the run while it holds a job and a new checkpoint.</summary>
    public TimeSpan? HoldAfterBegin { get; init; }
}

/// <summary>Opens images no VM runs under the given node names as a QMP source for an offline run; disposing it
/// closes the images (storing their bitmaps).</summary>
public delegate Task<(string QmpSocket, IAsyncDisposable Source)> OfflineOpener(IReadOnlyList<string> images, IReadOnlyList<string> nodes);

/// <summary>
/// Backups of libvirt domains. A running domain is backed up through libvirt's backup API in pull mode: one
/// <c>virDomainBackupBegin</c> freezes every disk at one point and creates the checkpoint that the next incremental
/// starts from; each disk is read over NBD (the dirty bitmap libvirt exports for an incremental) into the same
/// repository files as any QMP source. A shut-off domain's images are backed up offline from the checkpoint's
/// bitmap in the qcow2, and libvirt is told about the new checkpoint, so the chain carries on when it runs again.
/// Checkpoints are named like the repository's bitmaps (<c>strata-TAG-ID</c>); each point's checkpoint XML and
/// the domain's XML are kept in the repository, under <c>.libvirt/DOMAIN/</c>.
/// </summary>
public sealed class LibvirtBackupRunner(Repository repo, LibvirtRunOptions options, IBackupProgress progress, OfflineOpener offline)
{
    /// <summary>The repository's name for a domain's disk: the domain's name and the disk's target.</summary>
    public static string DiskKey(string domain, string target) => $"{domain}.{target}";

    public static string MetadataDir(Repository repo, string domain) => Path.Combine(repo.Root, ".libvirt", domain);

    public static string CheckpointFile(Repository repo, string domain, string checkpoint) => Path.Combine(MetadataDir(repo, domain), checkpoint + ".checkpoint.xml");

    public static string DomainFile(Repository repo, string domain, string id) => Path.Combine(MetadataDir(repo, domain), id + ".domain.xml");

    private const string SocketPrefix = ".libvirt-nbd-", FallbackSocketTag = "libvirt-nbd";

    private sealed class DiskPlan
    {
        public required DomainDisk Disk;
        public required string Key;
        public BackupManifest? Head;
        public GranuleDigests? HeadDigests;
        public string? HeadDigestsProblem;
        public string? Note;
        public required string PartialPath;
        public required string ScratchPath;
        public long Size, Copied;
        public bool Incremental => Head is not null;
    }

    public async Task<IReadOnlyList<BackupManifest>> RunAsync()
    {
        if (options.Level is not ("auto" or "full" or "inc")) throw new BackupException($"unknown level '{options.Level}'", "use full, inc or auto", BackupExitCodes.Usage);
        if (options.Disks.Distinct().Count() != options.Disks.Count) throw new BackupException("a disk is named twice", exitCode: BackupExitCodes.Usage);
        if (!IsWellFormed(options.Domain))
            throw new BackupException($"domain name '{options.Domain}' cannot name the repository's disks", "a name of letters, digits, '-', '_' and '.' starting with a letter", BackupExitCodes.Usage);
        using var conn = LibvirtConnection.Open(options.Connect);
        using var dom = conn.Domain(options.Domain);
        try
        {
            return dom.State() switch
            {
                DomainState.Running or DomainState.Paused => await OnlineAsync(dom),
                DomainState.ShutOff => await OfflineAsync(dom),
                _ => throw new BackupException($"domain '{options.Domain}' is neither running nor shut off", "back it up once it runs, or once it is shut off", BackupExitCodes.Source),
            };
        }
        catch (LibvirtException e)
        {
            throw new BackupException(e.Message, exitCode: BackupExitCodes.Source);
        }
    }

    /// <summary>QEMU's rule for node names, which the disk keys also are on the offline path.</summary>
    private static bool IsWellFormed(string name) =>
        name.Length is > 0 and < 100 && char.IsAsciiLetter(name[0]) && name.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.');

    private IReadOnlyList<DomainDisk> Selected(string domainXml)
    {
        var all = LibvirtXml.Disks(domainXml);
        if (all.Count == 0) throw new BackupException($"domain '{options.Domain}' has no disk", exitCode: BackupExitCodes.Usage);
        if (options.Disks.Count == 0) return all;
        foreach (var t in options.Disks.Where(t => all.All(d => d.Target != t)))
            throw new BackupException($"domain '{options.Domain}' has no disk '{t}'", $"its disks: {string.Join(", ", all.Select(d => d.Target))}", BackupExitCodes.Usage);
        return all.Where(d => options.Disks.Contains(d.Target)).ToList();
    }

    /// <summary>The checkpoints the repository's points still start from: the newest point of each disk.</summary>
    private HashSet<string> HeadCheckpoints(IEnumerable<DomainDisk> disks) =>
        disks.Select(d => repo.Points(DiskKey(options.Domain, d.Target)).LastOrDefault()?.Bitmap).OfType<string>().ToHashSet();

    // ------------------------------------------------------------------ online

    private async Task<IReadOnlyList<BackupManifest>> OnlineAsync(LibvirtDomain dom)
    {
        using var held = repo.Lock();
        string domainXml = dom.XmlDesc();
        var allDisks = LibvirtXml.Disks(domainXml);
        var disks = Selected(domainXml);
        Recover(dom, allDisks);
        foreach (var leftover in repo.CleanLeftovers()) progress.Message($"removed {leftover}, left by an interrupted run");

        var now = DateTimeOffset.UtcNow;
        string id = repo.NewId(now);
        string checkpoint = repo.BitmapPrefix + id;
        var known = dom.Checkpoints().ToHashSet();
        var plans = disks.Select(d => Plan(dom, d, id, known)).ToList();
        foreach (var p in plans)
            progress.Message($"{p.Key}: {(p.Incremental ? $"incremental on {p.Head!.Id}" : "full")} (libvirt pull){(p.Note is null ? "" : " — " + p.Note)}");

        string socket = SocketPaths.ForRun(Path.Combine(repo.Root, $"{SocketPrefix}{Environment.ProcessId}.sock"), FallbackSocketTag);
        string backupXml = LibvirtXml.PullBackup(socket, plans.Select(p => new BackupDiskSpec(p.Disk.Target, p.Head?.Bitmap, p.ScratchPath)).ToList(), allDisks.Select(d => d.Target));
        // Only qcow2 keeps a bitmap: a raw disk is in the backup but not in the checkpoint (its next backup is a full).
        var tracked = plans.Where(p => p.Disk.Format == "qcow2").Select(p => p.Disk.Target).ToList();
        string? checkpointXml = tracked.Count == 0 ? null : LibvirtXml.NewCheckpoint(checkpoint, tracked, allDisks.Select(d => d.Target));
        try
        {
            dom.BackupBegin(backupXml, checkpointXml);
        }
        catch (LibvirtException e)
        {
            throw new BackupException(e.Message, "nothing was started; `virsh domjobinfo` shows whether another job runs", BackupExitCodes.Source);
        }

        bool ok = false;
        // SIGTERM or Ctrl-C ends libvirt's job: the reads fail, and the cleanup below runs as for any failure.
        using var interrupted = new CancellationTokenSource();
        void Interrupt(PosixSignalContext c)
        {
            c.Cancel = true;
            interrupted.Cancel();
            AbortQuietly(dom);
        }
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, Interrupt);
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, Interrupt);
        try
        {
            var exports = LibvirtXml.Exports(dom.BackupXml() ?? throw new BackupException("libvirt's backup job ended before it could be read", exitCode: BackupExitCodes.Source));
            string? savedCheckpoint = checkpointXml is null ? null
                : dom.CheckpointXml(checkpoint) ?? throw new BackupException($"libvirt did not create checkpoint '{checkpoint}'", exitCode: BackupExitCodes.Source);
            if (options.HoldAfterBegin is { } hold)
            {
                progress.Message($"holding libvirt's backup job for {hold.TotalSeconds:F0} s");
                try { await Task.Delay(hold, interrupted.Token); } catch (OperationCanceledException) { }
            }
            if (interrupted.IsCancellationRequested) throw new BackupException("interrupted: libvirt's backup job was ended and nothing was committed");
            await Task.WhenAll(plans.Select(p => CopyAsync(p, socket, exports.FirstOrDefault(e => e.Target == p.Disk.Target)
                ?? throw new BackupException($"libvirt exports no disk '{p.Disk.Target}'", exitCode: BackupExitCodes.Source))));
            Directory.CreateDirectory(MetadataDir(repo, options.Domain));
            if (savedCheckpoint is not null) Repository.WriteAtomically(CheckpointFile(repo, options.Domain, checkpoint), System.Text.Encoding.UTF8.GetBytes(savedCheckpoint));
            Repository.WriteAtomically(DomainFile(repo, options.Domain, id), System.Text.Encoding.UTF8.GetBytes(dom.XmlDesc(inactive: true)));
            ok = true;
        }
        finally
        {
            AbortQuietly(dom);
            if (!ok)
            {
                // Deleting the new checkpoint merges its bitmap into its parent's: the head keeps every write.
                try { dom.DeleteCheckpoint(checkpoint); }
                catch (LibvirtException e) { progress.Message($"could not delete checkpoint {checkpoint} ({e.Message}); the next run will"); }
                foreach (var p in plans) File.Delete(p.PartialPath);
            }
            foreach (var p in plans) File.Delete(p.ScratchPath);
            File.Delete(socket);
        }

        var manifests = plans.Select(p => Commit(p, id, now, checkpoint, "pull")).ToList();
        // Only now that the new points are on disk may the older checkpoints go.
        DropStaleCheckpoints(dom, allDisks, metadataOnly: false);
        return manifests;
    }

    private DiskPlan Plan(LibvirtDomain dom, DomainDisk disk, string id, HashSet<string> known)
    {
        string key = DiskKey(options.Domain, disk.Target);
        var head = repo.Points(key).LastOrDefault();
        string? why = null;
        if (head is null) why = "no earlier backup of this disk";
        else if (options.Level == "full") why = "";
        else if (disk.Format != "qcow2") why = $"the disk is {disk.Format ?? "of unknown format"}: only qcow2 keeps a checkpoint's bitmap";
        else if (!File.Exists(repo.FilePath(head))) why = $"the previous backup file {head.File} is missing";
        else if (!known.Contains(head.Bitmap))
        {
            why = Redefine(dom, head.Bitmap);
            if (why is null) known.Add(head.Bitmap);
        }
        if (why is null && dom.CheckpointXml(head!.Bitmap) is { } xml && !LibvirtXml.CheckpointDisks(xml).Contains(disk.Target))
            why = $"checkpoint {head.Bitmap} has no bitmap for {disk.Target}";
        if (options.Level == "inc" && why is not null)
            throw new BackupException($"{key}: cannot take an incremental: {why}", "run with --level full (or auto) to start a new chain", BackupExitCodes.Failed);
        string dir = repo.DiskDir(key);
        Directory.CreateDirectory(dir);
        var (headDigests, digestsProblem) = PointCommit.HeadDigests(repo, why is null ? head : null);
        return new DiskPlan
        {
            Disk = disk,
            Key = key,
            Head = why is null ? head : null,
            HeadDigests = headDigests,
            HeadDigestsProblem = digestsProblem,
            Note = options.Level == "auto" && why is { Length: > 0 } && head is not null ? "full because " + why : null,
            PartialPath = Path.Combine(dir, id + ".qcow2" + Repository.PartialSuffix),
            ScratchPath = Path.Combine(dir, $"{Repository.FleecePrefix}{id}.scratch.qcow2"),
        };
    }

    /// <summary>Gives libvirt back a checkpoint it lost (metadata wiped, transient domain redefined) from the XML
    /// saved with the point, validated against the bitmaps in the images. Null when that worked, otherwise why a
    /// full is needed.</summary>
    private string? Redefine(LibvirtDomain dom, string checkpoint)
    {
        string saved = CheckpointFile(repo, options.Domain, checkpoint);
        if (!File.Exists(saved)) return $"libvirt has no checkpoint {checkpoint} and the repository holds no copy of it";
        try
        {
            dom.RedefineCheckpoint(LibvirtXml.WithoutParent(File.ReadAllText(saved)), validate: true);
            progress.Message($"redefined checkpoint {checkpoint}, which libvirt had lost, from the repository (its bitmaps are intact)");
            return null;
        }
        catch (LibvirtException e)
        {
            return $"libvirt lost checkpoint {checkpoint} and it cannot be redefined ({e.Message})";
        }
    }

    private async Task CopyAsync(DiskPlan p, string socket, BackupExport export)
    {
        using (var probe = Protocol.Nbd.NbdImage.Connect(socket, null, 0, export.ExportName, readOnly: true)) p.Size = probe.Size;
        if (p.Incremental && p.Size != p.Head!.VirtualSize)
            throw new BackupException($"{p.Key}: the disk changed size ({p.Head.VirtualSize} -> {p.Size} bytes)", "run with --level full to start a new chain");
        if (p.Incremental && export.ExportBitmap is null) throw new BackupException($"libvirt exports no dirty bitmap for the incremental of {p.Disk.Target}", exitCode: BackupExitCodes.Source);
        Qcow2Image.Create(p.PartialPath, new Qcow2CreateOptions
        {
            Size = p.Size,
            BackingFile = p.Head?.File,
            BackingFormat = p.Incremental ? "qcow2" : null,
        }).Dispose();
        using var target = ImageOpener.Open(p.PartialPath, "qcow2", readOnly: false);
        // The partial file is thrown away if anything fails, so only the final flush needs to reach the disk.
        if (target is Qcow2Image q) q.File.FlushEnabled = false;
        progress.Start(p.Key, 0);
        string? context = export.ExportBitmap is null || !p.Incremental ? null : "qemu:dirty-bitmap:" + export.ExportBitmap;
        p.Copied = await new PullCopier(socket, export.ExportName, context).CopyAsync(target, (done, total) =>
        {
            progress.Start(p.Key, total);
            progress.Advance(p.Key, done);
        });
        if (target is Qcow2Image q2) q2.File.FlushEnabled = true;
        target.Flush();
        progress.Finish(p.Key);
    }

    private BackupManifest Commit(DiskPlan p, string id, DateTimeOffset time, string checkpoint, string mode) =>
        PointCommit.Commit(repo, progress,
            new PointFacts(id, p.Key, time, p.Incremental, p.Head?.Id, id + ".qcow2", mode, $"libvirt:{options.Connect}#{options.Domain}",
                p.Disk.Target, checkpoint, p.Size, p.Note),
            p.PartialPath, Path.Combine(repo.DiskDir(p.Key), id + ".qcow2"), p.HeadDigests, p.HeadDigestsProblem);

    private static void AbortQuietly(LibvirtDomain dom)
    {
        try
        {
            if (dom.BackupXml() is not null) dom.EndBackupJob(TimeSpan.FromSeconds(30));
        }
        catch (LibvirtException) { }
    }

    /// <summary>
    /// Undoes what a killed run left: its backup job is ended, and every checkpoint of this repository that no
    /// point starts from is deleted (libvirt merges its bitmap into its parent's, so the head keeps every write).
    /// Another tool's backup job is left alone and refused.
    /// </summary>
    private void Recover(LibvirtDomain dom, IReadOnlyList<DomainDisk> allDisks)
    {
        if (dom.BackupXml() is { } running)
        {
            string? socket = LibvirtXml.BackupSocket(running);
            string name = socket is null ? "" : Path.GetFileName(socket);
            bool ours = name.StartsWith(SocketPrefix, StringComparison.Ordinal) && Path.GetDirectoryName(socket) == repo.Root
                        || name.StartsWith($"strata-{FallbackSocketTag}-", StringComparison.Ordinal);
            if (!ours)
                throw new BackupException($"domain '{options.Domain}' already runs a backup job (NBD at {socket ?? "TCP"})",
                    "wait for it, or end it with: virsh domjobabort " + options.Domain, BackupExitCodes.Source);
            progress.Message($"ending the backup job left running by an interrupted run (NBD at {socket})");
            if (!dom.EndBackupJob(TimeSpan.FromSeconds(30)))
                throw new BackupException($"domain '{options.Domain}' still runs the backup job left by an interrupted run, 30 s after it was ended",
                    "end it with: virsh domjobabort " + options.Domain, BackupExitCodes.Source);
        }
        DropStaleCheckpoints(dom, allDisks, metadataOnly: false);
    }

    /// <summary>Deletes this repository's checkpoints that no disk's newest point starts from.</summary>
    private void DropStaleCheckpoints(LibvirtDomain dom, IReadOnlyList<DomainDisk> allDisks, bool metadataOnly)
    {
        var heads = HeadCheckpoints(allDisks);
        foreach (string cp in dom.Checkpoints().Where(c => c.StartsWith(repo.BitmapPrefix, StringComparison.Ordinal) && !heads.Contains(c)))
        {
            try
            {
                dom.DeleteCheckpoint(cp, metadataOnly);
            }
            catch (LibvirtException e)
            {
                progress.Message($"could not delete checkpoint {cp}: {e.Message}");
            }
        }
    }

    // ------------------------------------------------------------------ offline

    /// <summary>
    /// A shut-off domain: its images are opened offline and backed up like any offline image (the checkpoint's
    /// bitmap, which libvirt stores in the qcow2 under the checkpoint's name, is the head's bitmap). The run leaves
    /// one new bitmap per image; libvirt is then told about it as a checkpoint, and forgets the ones whose
    /// bitmaps the run folded away.
    /// </summary>
    private async Task<IReadOnlyList<BackupManifest>> OfflineAsync(LibvirtDomain dom)
    {
        string domainXml = dom.XmlDesc(inactive: true);
        var allDisks = LibvirtXml.Disks(domainXml);
        var disks = Selected(domainXml);
        foreach (var d in disks.Where(d => d.SourceFile is null))
            throw new BackupException($"disk {d.Target} of '{options.Domain}' has no source file", exitCode: BackupExitCodes.Usage);
        var keys = disks.Select(d => DiskKey(options.Domain, d.Target)).ToList();
        // A checkpoint libvirt lost is no obstacle offline: the bitmap in the image is what the run reads.
        IReadOnlyList<BackupManifest> manifests;
        var (qmp, source) = await offline(disks.Select(d => d.SourceFile!).ToList(), keys);
        await using (source)
        {
            var run = new BackupRunOptions { Socket = qmp, Disks = keys, Level = options.Level, Mode = "push" };
            manifests = await new BackupRunner(repo, run, progress).RunAsync();
        }
        using var held = repo.Lock();
        string id = manifests[0].Id, checkpoint = manifests[0].Bitmap;
        // Only a qcow2 image stores the new bitmap; a raw disk's next backup is a full anyway.
        var withBitmap = disks.Where(d => d.Format == "qcow2").Select(d => d.Target).ToList();
        string xml = LibvirtXml.ExistingCheckpoint(checkpoint, manifests[0].Time, withBitmap);
        // The bitmaps of older checkpoints of ours are gone from these images: libvirt must forget them first.
        DropStaleCheckpoints(dom, allDisks, metadataOnly: true);
        Directory.CreateDirectory(MetadataDir(repo, options.Domain));
        Repository.WriteAtomically(DomainFile(repo, options.Domain, id), System.Text.Encoding.UTF8.GetBytes(domainXml));
        if (withBitmap.Count == 0) return manifests;
        // Saved before libvirt hears of it: should the redefine fail, the next online run redefines it from here.
        string saved = CheckpointFile(repo, options.Domain, checkpoint);
        Repository.WriteAtomically(saved, System.Text.Encoding.UTF8.GetBytes(xml));
        dom.RedefineCheckpoint(xml, validate: false);
        if (dom.CheckpointXml(checkpoint) is { } defined) Repository.WriteAtomically(saved, System.Text.Encoding.UTF8.GetBytes(defined));
        progress.Message($"checkpoint {checkpoint} defined in libvirt for the offline point: the next online run continues the chain");
        return manifests;
    }
}
