using System.Xml;
using System.Xml.Linq;

namespace Strata.Backup.Libvirt;

/// <summary>A disk of a domain as its XML defines it.</summary>
public sealed record DomainDisk(string Target, string? SourceFile, string? Format);

/// <summary>One disk of a backup to start: a full (<see cref="Incremental"/> null) or an incremental since a
/// checkpoint, frozen through a scratch file.</summary>
public sealed record BackupDiskSpec(string Target, string? Incremental, string ScratchFile);

/// <summary>What libvirt exports for one disk of a running pull backup.</summary>
public sealed record BackupExport(string Target, string ExportName, string? ExportBitmap);

/// <summary>
/// The XML the libvirt source sends and reads: domain, checkpoint and backup documents. Pure functions over
/// strings; malformed input is a <see cref="BackupException"/> that says which document and why.
/// </summary>
public static class LibvirtXml
{
    private static XElement Root(string xml, string what)
    {
        try
        {
            return XDocument.Parse(xml).Root ?? throw new BackupException($"libvirt's {what} XML is empty");
        }
        catch (XmlException e)
        {
            throw new BackupException($"libvirt's {what} XML is malformed: {e.Message}");
        }
    }

    public static string DomainName(string domainXml) =>
        Root(domainXml, "domain").Element("name")?.Value.Trim() is { Length: > 0 } name ? name : throw new BackupException("the domain XML has no <name>");

    /// <summary>The domain's disks (device='disk'; CD-ROMs and floppies are no backup's business), in XML order.</summary>
    public static IReadOnlyList<DomainDisk> Disks(string domainXml) =>
        (Root(domainXml, "domain").Element("devices")?.Elements("disk") ?? [])
            .Where(d => ((string?)d.Attribute("device") ?? "disk") == "disk")
            .Select(d => new DomainDisk(
                (string?)d.Element("target")?.Attribute("dev") ?? throw new BackupException("a disk of the domain XML has no <target dev>"),
                (string?)d.Element("source")?.Attribute("file") ?? (string?)d.Element("source")?.Attribute("dev"),
                (string?)d.Element("driver")?.Attribute("type")))
            .ToList();

    /// <summary>A pull backup served on a unix socket: the listed disks (full or incremental, each with its own
    /// checkpoint), every other disk of <paramref name="allTargets"/> left out.</summary>
    public static string PullBackup(string socket, IReadOnlyList<BackupDiskSpec> disks, IEnumerable<string> allTargets)
    {
        var list = new XElement("disks");
        foreach (var d in disks)
        {
            var disk = new XElement("disk", new XAttribute("name", d.Target), new XAttribute("backup", "yes"), new XAttribute("type", "file"));
            // Per-disk mode: one run may carry on one disk's chain while it starts a new one for another.
            disk.Add(new XAttribute("backupmode", d.Incremental is null ? "full" : "incremental"));
            if (d.Incremental is not null) disk.Add(new XAttribute("incremental", d.Incremental));
            disk.Add(new XElement("scratch", new XAttribute("file", d.ScratchFile)));
            list.Add(disk);
        }
        foreach (var other in allTargets.Where(t => disks.All(d => d.Target != t)))
            list.Add(new XElement("disk", new XAttribute("name", other), new XAttribute("backup", "no")));
        return new XElement("domainbackup", new XAttribute("mode", "pull"),
            new XElement("server", new XAttribute("transport", "unix"), new XAttribute("socket", socket)),
            list).ToString();
    }

    /// <summary>A new checkpoint with a bitmap (named like the checkpoint) on the listed disks only.</summary>
    public static string NewCheckpoint(string name, IEnumerable<string> targets, IEnumerable<string> allTargets)
    {
        var set = targets.ToHashSet();
        return new XElement("domaincheckpoint", new XElement("name", name),
            new XElement("disks", allTargets.Select(t => new XElement("disk", new XAttribute("name", t), new XAttribute("checkpoint", set.Contains(t) ? "bitmap" : "no"))))).ToString();
    }

    /// <summary>The definition of a checkpoint whose bitmaps exist already (written into the images by an offline
    /// run), for libvirt to redefine: every listed disk has the bitmap <paramref name="name"/>.</summary>
    public static string ExistingCheckpoint(string name, DateTimeOffset created, IEnumerable<string> targets) =>
        new XElement("domaincheckpoint", new XElement("name", name),
            new XElement("creationTime", created.ToUnixTimeSeconds()),
            new XElement("disks", targets.Select(t => new XElement("disk", new XAttribute("name", t), new XAttribute("checkpoint", "bitmap"), new XAttribute("bitmap", name))))).ToString();

    public static string CheckpointName(string checkpointXml) =>
        Root(checkpointXml, "checkpoint").Element("name")?.Value.Trim() is { Length: > 0 } n ? n : throw new BackupException("the checkpoint XML has no <name>");

    /// <summary>The disks for which the checkpoint holds a bitmap.</summary>
    public static IReadOnlyList<string> CheckpointDisks(string checkpointXml) =>
        (Root(checkpointXml, "checkpoint").Element("disks")?.Elements("disk") ?? [])
            .Where(d => (string?)d.Attribute("checkpoint") == "bitmap")
            .Select(d => (string?)d.Attribute("name") ?? "").Where(n => n.Length > 0).ToList();

    /// <summary>A saved checkpoint without its parent link, to redefine it when libvirt no longer knows the parent
    /// (the chain's older points need no libvirt checkpoint: only the newest one's bitmap is read).</summary>
    public static string WithoutParent(string checkpointXml)
    {
        var root = Root(checkpointXml, "checkpoint");
        root.Element("parent")?.Remove();
        root.Element("domain")?.Remove();
        return root.ToString();
    }

    /// <summary>The running backup's export of each disk: libvirt picks the export and bitmap names.</summary>
    public static IReadOnlyList<BackupExport> Exports(string backupXml)
    {
        var root = Root(backupXml, "backup");
        if ((string?)root.Attribute("mode") is { } mode && mode != "pull") throw new BackupException($"the domain's backup job is a {mode} backup, not a pull one");
        return (root.Element("disks")?.Elements("disk") ?? [])
            .Where(d => (string?)d.Attribute("backup") != "no")
            .Select(d => new BackupExport(
                (string?)d.Attribute("name") ?? throw new BackupException("a disk of the backup XML has no name"),
                (string?)d.Attribute("exportname") ?? (string)d.Attribute("name")!,
                (string?)d.Attribute("exportbitmap")))
            .ToList();
    }

    /// <summary>The unix socket a running backup serves on, or null (TCP, or no server).</summary>
    public static string? BackupSocket(string backupXml) => (string?)Root(backupXml, "backup").Element("server")?.Attribute("socket");

    /// <summary>
    /// A domain definition for restored disks: each disk listed in <paramref name="files"/> (by target) points at
    /// its restored file in <paramref name="format"/>, with no backing chain; every other disk is dropped (it was not
    /// backed up, and sharing the original's file would let two domains write one disk). The UUID goes, so that
    /// libvirt gives the copy a new one; the name is <paramref name="name"/>.
    /// </summary>
    public static string RestoredDomain(string domainXml, string name, IReadOnlyDictionary<string, string> files, string format)
    {
        var root = Root(domainXml, "domain");
        root.Element("name")!.Value = name;
        root.Element("uuid")?.Remove();
        var devices = root.Element("devices");
        foreach (var disk in (devices?.Elements("disk") ?? []).ToList())
        {
            if (((string?)disk.Attribute("device") ?? "disk") != "disk") continue;
            string? target = (string?)disk.Element("target")?.Attribute("dev");
            if (target is null || !files.TryGetValue(target, out var file))
            {
                disk.Remove();
                continue;
            }
            disk.SetAttributeValue("type", "file");
            disk.Element("source")?.Remove();
            disk.Element("backingStore")?.Remove();
            var driver = disk.Element("driver");
            if (driver is null) disk.AddFirst(driver = new XElement("driver", new XAttribute("name", "qemu")));
            driver.SetAttributeValue("type", format);
            driver.AddAfterSelf(new XElement("source", new XAttribute("file", file)));
        }
        return root.ToString();
    }
}
