using System.Xml.Linq;
using Strata.Backup;
using Strata.Backup.Libvirt;

namespace Strata.Tests.Backup;

/// <summary>The XML the libvirt source sends and reads, checked against documents shaped like libvirt 9.0's own.</summary>
public class LibvirtXmlTests
{
    private const string Domain = """
        <domain type='qemu' id='3'>
          <name>bt1</name>
          <uuid>0a3c6c4e-5a0e-4b8e-9d8a-5c4b0e7f2a11</uuid>
          <devices>
            <emulator>/usr/bin/qemu-system-x86_64</emulator>
            <disk type='file' device='disk'>
              <driver name='qemu' type='qcow2'/>
              <source file='/vm/a.qcow2' index='2'/>
              <backingStore/>
              <target dev='vda' bus='virtio'/>
            </disk>
            <disk type='file' device='cdrom'>
              <driver name='qemu' type='raw'/>
              <source file='/iso/x.iso'/>
              <target dev='sda' bus='sata'/>
            </disk>
            <disk type='block' device='disk'>
              <driver name='qemu' type='raw'/>
              <source dev='/dev/vg/b'/>
              <target dev='vdb' bus='virtio'/>
            </disk>
          </devices>
        </domain>
        """;

    [Fact]
    public void Disks_AreTheDomainsDisksWithSourceAndFormat_NotItsCdroms()
    {
        Assert.Equal(
            [new DomainDisk("vda", "/vm/a.qcow2", "qcow2"), new DomainDisk("vdb", "/dev/vg/b", "raw")],
            LibvirtXml.Disks(Domain));
        Assert.Equal("bt1", LibvirtXml.DomainName(Domain));
    }

    [Fact]
    public void PullBackup_ListsEachDiskWithItsModeAndScratch_AndLeavesTheOthersOut()
    {
        var xml = XElement.Parse(LibvirtXml.PullBackup("/r/.nbd.sock",
            [new BackupDiskSpec("vda", "strata-t-1", "/r/s-a.qcow2")], ["vda", "vdb"]));
        Assert.Equal("pull", (string?)xml.Attribute("mode"));
        var server = xml.Element("server")!;
        Assert.Equal(("unix", "/r/.nbd.sock"), ((string?)server.Attribute("transport"), (string?)server.Attribute("socket")));
        var disks = xml.Element("disks")!.Elements("disk").ToList();
        Assert.Equal(2, disks.Count);
        Assert.Equal("vda", (string?)disks[0].Attribute("name"));
        Assert.Equal("incremental", (string?)disks[0].Attribute("backupmode"));
        Assert.Equal("strata-t-1", (string?)disks[0].Attribute("incremental"));
        Assert.Equal("/r/s-a.qcow2", (string?)disks[0].Element("scratch")!.Attribute("file"));
        Assert.Equal(("vdb", "no"), ((string?)disks[1].Attribute("name"), (string?)disks[1].Attribute("backup")));

        var full = XElement.Parse(LibvirtXml.PullBackup("/s", [new BackupDiskSpec("vda", null, "/x")], ["vda"]));
        var disk = full.Element("disks")!.Element("disk")!;
        Assert.Equal("full", (string?)disk.Attribute("backupmode"));
        Assert.Null(disk.Attribute("incremental"));
    }

    [Fact]
    public void NewCheckpoint_PutsABitmapOnTheChosenDisksOnly()
    {
        string xml = LibvirtXml.NewCheckpoint("strata-t-2", ["vdb"], ["vda", "vdb"]);
        Assert.Equal("strata-t-2", LibvirtXml.CheckpointName(xml));
        Assert.Equal(["vdb"], LibvirtXml.CheckpointDisks(xml));
        var vda = XElement.Parse(xml).Element("disks")!.Elements("disk").Single(d => (string?)d.Attribute("name") == "vda");
        Assert.Equal("no", (string?)vda.Attribute("checkpoint"));
    }

    [Fact]
    public void ExistingCheckpoint_NamesTheBitmapAfterTheCheckpoint_WithItsCreationTime()
    {
        var at = new DateTimeOffset(2026, 12, 6, 10, 0, 0, TimeSpan.Zero);
        var xml = XElement.Parse(LibvirtXml.ExistingCheckpoint("strata-t-3", at, ["vda", "vdb"]));
        Assert.Equal(at.ToUnixTimeSeconds().ToString(System.Globalization.CultureInfo.InvariantCulture), xml.Element("creationTime")!.Value);
        Assert.All(xml.Element("disks")!.Elements("disk"), d =>
        {
            Assert.Equal("bitmap", (string?)d.Attribute("checkpoint"));
            Assert.Equal("strata-t-3", (string?)d.Attribute("bitmap"));
        });
        Assert.Equal(["vda", "vdb"], LibvirtXml.CheckpointDisks(xml.ToString()));
    }

    [Fact]
    public void WithoutParent_DropsTheParentAndDomain_AndKeepsTheRest()
    {
        const string saved = """
            <domaincheckpoint>
              <name>cp2</name>
              <parent><name>cp1</name></parent>
              <creationTime>1796550635</creationTime>
              <disks><disk name='vda' checkpoint='bitmap' bitmap='cp2'/></disks>
              <domain type='qemu'><name>bt1</name></domain>
            </domaincheckpoint>
            """;
        var xml = XElement.Parse(LibvirtXml.WithoutParent(saved));
        Assert.Null(xml.Element("parent"));
        Assert.Null(xml.Element("domain"));
        Assert.Equal("cp2", xml.Element("name")!.Value);
        Assert.Equal("1796550635", xml.Element("creationTime")!.Value);
        Assert.Equal(["vda"], LibvirtXml.CheckpointDisks(xml.ToString()));
    }

    [Fact]
    public void Exports_ReadsLibvirtsExportAndBitmapNames()
    {
        const string job = """
            <domainbackup mode='pull'>
              <server transport='unix' socket='/r/.nbd.sock'/>
              <disks>
                <disk name='vda' backup='yes' type='file' backupmode='incremental' incremental='cp1' exportname='vda' exportbitmap='backup-vda' index='5'>
                  <driver type='qcow2'/><scratch file='/r/s-a.qcow2'/>
                </disk>
                <disk name='vdb' backup='yes' type='file' backupmode='full' exportname='vdb' index='6'/>
                <disk name='sda' backup='no'/>
              </disks>
            </domainbackup>
            """;
        Assert.Equal([new BackupExport("vda", "vda", "backup-vda"), new BackupExport("vdb", "vdb", null)], LibvirtXml.Exports(job));
        Assert.Equal("/r/.nbd.sock", LibvirtXml.BackupSocket(job));
        var push = Assert.Throws<BackupException>(() => LibvirtXml.Exports("<domainbackup mode='push'><disks/></domainbackup>"));
        Assert.Contains("push backup", push.Message);
    }

    [Fact]
    public void RestoredDomain_PointsEachDiskAtItsFile_DropsTheUuidAndTheDisksNotRestored()
    {
        var xml = XElement.Parse(LibvirtXml.RestoredDomain(Domain, "bt1-copy", new Dictionary<string, string> { ["vda"] = "/out/vda.raw" }, "raw"));
        Assert.Equal("bt1-copy", xml.Element("name")!.Value);
        Assert.Null(xml.Element("uuid"));
        var disks = xml.Element("devices")!.Elements("disk").ToList();
        Assert.Equal(2, disks.Count); // vda and the CD-ROM; vdb was not restored
        var vda = disks.Single(d => (string?)d.Element("target")!.Attribute("dev") == "vda");
        Assert.Equal("file", (string?)vda.Attribute("type"));
        Assert.Equal("raw", (string?)vda.Element("driver")!.Attribute("type"));
        Assert.Equal("/out/vda.raw", (string?)vda.Element("source")!.Attribute("file"));
        Assert.Single(vda.Elements("source"));
        Assert.Null(vda.Element("backingStore"));
        Assert.Equal("/iso/x.iso", (string?)disks.Single(d => (string?)d.Attribute("device") == "cdrom").Element("source")!.Attribute("file"));
    }

    [Theory]
    [InlineData("<domain><name>x</name", "domain XML is malformed")]
    [InlineData("<domain><devices/></domain>", "has no <name>")]
    public void BadDomainXml_IsAClearError(string xml, string expected)
    {
        var e = Assert.Throws<BackupException>(() => LibvirtXml.DomainName(xml));
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void ADiskWithoutTarget_IsAClearError()
    {
        var e = Assert.Throws<BackupException>(() => LibvirtXml.Disks("<domain><name>x</name><devices><disk device='disk'/></devices></domain>"));
        Assert.Contains("no <target dev>", e.Message);
    }
}
