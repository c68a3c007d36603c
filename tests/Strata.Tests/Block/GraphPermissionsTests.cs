using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>QEMU's permission rules in the graph: parents of one file node must share what the others take (checked
/// in the graph, as one open file's locks cannot see each other), and another process's graph meets them through
/// the image locks.</summary>
public class GraphPermissionsTests
{
    private static string NewImage(TempDir dir, string name = "disk.qcow2")
    {
        Qcow2Image.Create(dir[name], new Qcow2CreateOptions { Size = 1 << 20 }).Dispose();
        return dir[name];
    }

    private static string Conflict(string file, string requiredBy, string unsharedBy) =>
        $"Permission conflict on node '{file}': permissions 'write, resize' are both required by node '{requiredBy}' " +
        $"(uses node '{file}' as 'file' child) and unshared by node '{unsharedBy}' (uses node '{file}' as 'file' child).";

    [Fact]
    public void TwoWritableQcow2NodesOnOneFileAreRefused()
    {
        using var dir = new TempDir();
        using var graph = new BlockGraph();
        var file = graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = NewImage(dir) });
        var first = graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "a", FileNodeName = "f" });

        var e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "b", FileNodeName = "f" }));
        Assert.Equal(Conflict("f", requiredBy: "a", unsharedBy: "b"), e.Message);
        // A reader beside a writer is refused as well: it cannot let the writer change the metadata under it.
        e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "b", FileNodeName = "f", ReadOnly = true }));
        Assert.Equal(Conflict("f", requiredBy: "a", unsharedBy: "b"), e.Message);

        Assert.Equal(["a", "f"], graph.Nodes.Select(n => n.Name));
        Assert.Equal(1, file.Users);
        Assert.Equal(LockClaim.Qcow2(readOnly: false), file.HostFile!.LockClaim);
        first.Image.Write(0, new byte[512]);
    }

    [Fact]
    public void AReadOnlyQcow2NodeRefusesAWriterOnItsFile()
    {
        using var dir = new TempDir();
        using var graph = new BlockGraph();
        var file = graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = NewImage(dir) });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "ro", FileNodeName = "f", ReadOnly = true });

        var e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "rw", FileNodeName = "f" }));
        Assert.Equal(Conflict("f", requiredBy: "rw", unsharedBy: "ro"), e.Message);
        Assert.Equal(LockClaim.Qcow2(readOnly: true), file.HostFile!.LockClaim);

        // Readers share.
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "ro2", FileNodeName = "f", ReadOnly = true });
        Assert.Equal(2, file.Users);
    }

    [Fact]
    public void AnotherGraphMeetsTheImageLocks()
    {
        using var dir = new TempDir();
        string image = NewImage(dir);
        using var other = new BlockGraph();
        other.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = image });
        other.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "ro", FileNodeName = "f", ReadOnly = true });

        using var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = image });
        var e = Assert.Throws<ImageLockedException>(() => graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "rw", FileNodeName = "f" }));
        Assert.StartsWith("Failed to get \"write\" lock", e.Message);
        Assert.Equal(LockClaim.None, graph.Find("f")!.HostFile!.LockClaim);

        // locking=off takes no locks, so nothing stands in the way of a reader.
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "unlocked", Filename = image, Locking = false });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "peek", FileNodeName = "unlocked", ReadOnly = true });
        Assert.Equal(LockClaim.None, graph.Find("unlocked")!.HostFile!.LockClaim);
        graph.Delete("peek");

        // Once the other graph lets go, the writer gets its locks.
        other.Delete("ro");
        other.Delete("f");
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "rw", FileNodeName = "f" });
        Assert.Equal(LockClaim.Qcow2(readOnly: false), graph.Find("f")!.HostFile!.LockClaim);
    }

    /// <summary>A qcow2 node's data file is a node of its own: opened from the header's name when none is given
    /// (newer than its parent, as in QEMU, and gone with it), or a named node that cannot go while it serves; its
    /// locks are what the qcow2 node's users claim, passed through, and nobody else may resize it.</summary>
    [Fact]
    public void ADataFileNodeCarriesTheClaimsOfTheDisksUsers()
    {
        using var dir = new TempDir();
        Qcow2Image.Create(dir["disk.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, DataFile = dir["disk.raw"], DataFileRaw = true }).Dispose();
        using var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = dir["disk.qcow2"] });
        var disk = graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "f" });
        var data = disk.DataFileChild!;
        Assert.True(data.AutoNamed);
        Assert.Equal(dir["disk.raw"], data.FileName);
        Assert.Equal([data.Name, "disk", "f"], graph.Nodes.Select(n => n.Name));
        Assert.Equal(new LockClaim(BlockPermissions.None, BlockPermissions.Resize), data.HostFile!.LockClaim);

        var export = LockClaim.Export(writable: true);
        graph.AddUser(disk, NodeUser.Export, export);
        Assert.Equal(new LockClaim(BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.Resize),
            data.HostFile.LockClaim);
        graph.RemoveUser(disk, NodeUser.Export, export);
        Assert.Equal(new LockClaim(BlockPermissions.None, BlockPermissions.Resize), data.HostFile.LockClaim);

        graph.Delete("disk");
        Assert.Equal(["f"], graph.Nodes.Select(n => n.Name));

        var named = graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "d", Filename = dir["disk.raw"] });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "f", DataFileNodeName = "d" });
        Assert.Equal(1, named.Users);
        Assert.Equal("Block device d is in use", Assert.Throws<BlockException>(() => graph.Delete("d")).Message);
        graph.Delete("disk");
        Assert.Equal(LockClaim.None, named.HostFile!.LockClaim);
        graph.Delete("d");
    }

    [Fact]
    public void ADataFileForAnImageWithoutOneIsRefusedAndLeavesNoNodeBehind()
    {
        using var dir = new TempDir();
        using var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = NewImage(dir) });
        System.IO.File.WriteAllBytes(dir["x.raw"], new byte[4096]);
        var e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec
        {
            Driver = "qcow2", NodeName = "disk", FileNodeName = "f", DataFileInline = new BlockNodeSpec { Driver = "file", Filename = dir["x.raw"] },
        }));
        Assert.Equal("'data-file' can only be set for images with an external data file", e.Message);
        Assert.Equal(["f"], graph.Nodes.Select(n => n.Name));
    }

    /// <summary>Regression: the graph closed a data file node (newer than its qcow2 node) before the qcow2 node, whose
    /// close flushes the data file before writing its tables; the tables of unflushed writes were lost.</summary>
    [Fact]
    public void ClosingTheGraphWritesTheTablesOfADataFileImage()
    {
        using var dir = new TempDir();
        Qcow2Image.Create(dir["disk.qcow2"], new Qcow2CreateOptions { Size = 1 << 20, DataFile = dir["disk.raw"] }).Dispose();
        var pattern = new byte[65536];
        Array.Fill(pattern, (byte)0x5a);
        using (var graph = new BlockGraph())
        {
            graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = dir["disk.qcow2"] });
            graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "f" }).Image.Write(65536, pattern);
        }
        using var img = Qcow2Image.Open(HostFile.Open(dir["disk.qcow2"], readOnly: true));
        var read = new byte[65536];
        img.Read(65536, read);
        Assert.Equal(pattern, read);
    }
}
