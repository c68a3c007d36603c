namespace Strata.Backup.Libvirt;

/// <summary>One restored disk of a domain.</summary>
public sealed record RestoredDisk(string Target, BackupManifest Point, string File);

/// <summary>
/// Restores a domain: every disk the repository holds for it, at one point, into a folder, plus a domain XML that
/// points at the restored files (from the domain XML saved with the point), optionally defined in libvirt.
/// </summary>
public static class LibvirtRestorer
{
    public static (IReadOnlyList<RestoredDisk> Disks, string XmlFile) Restore(Repository repo, string domain, string at, string dir, string format, string? newName, Action<string, long, long>? progress = null)
    {
        string prefix = domain + ".";
        var keys = repo.Disks().Where(k => k.StartsWith(prefix, StringComparison.Ordinal) && repo.Points(k).Count > 0).ToList();
        if (keys.Count == 0) throw new BackupException($"the repository holds no disk of domain '{domain}'", "see `strata backup list`", BackupExitCodes.Usage);
        var points = keys.Select(k => repo.Find(k, at)).ToList();
        // The domain as it was defined at the newest of the points.
        var newest = points.OrderBy(p => p.Time).Last();
        string saved = LibvirtBackupRunner.DomainFile(repo, domain, newest.Id);
        if (!File.Exists(saved)) throw new BackupException($"the repository holds no domain XML for {domain}@{newest.Id}", "restore the disks one by one with --disk");
        string name = newName ?? domain;
        string xmlFile = Path.Combine(Path.GetFullPath(dir), name + ".xml");
        var restored = points.Select(p => new RestoredDisk(p.Disk[prefix.Length..], p, Path.Combine(Path.GetFullPath(dir), $"{name}-{p.Disk[prefix.Length..]}.{format}"))).ToList();
        foreach (var file in restored.Select(r => r.File).Append(xmlFile).Where(File.Exists))
            throw new BackupException($"'{file}' already exists", "restore into a new or empty folder; a restore never overwrites", BackupExitCodes.Usage);
        foreach (var p in points) repo.ChainOf(p); // a broken chain fails before anything is written
        Directory.CreateDirectory(dir);
        foreach (var r in restored)
            Restorer.Restore(repo, r.Point, r.File, format, progress is null ? null : (done, total) => progress(r.Target, done, total));
        string xml = LibvirtXml.RestoredDomain(File.ReadAllText(saved), name, restored.ToDictionary(r => r.Target, r => r.File), format);
        Repository.WriteAtomically(xmlFile, System.Text.Encoding.UTF8.GetBytes(xml + "\n"));
        return (restored, xmlFile);
    }
}
