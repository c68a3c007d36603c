namespace Strata.Block.Graph;

/// <summary>A named node of the daemon's graph: a driver instance and the node it sits on.</summary>
public sealed class BlockNode
{
    internal BlockNode(string name, string driver, BlockImage image, BlockNode? fileChild, string fileName, bool autoNamed)
    {
        Name = name;
        Driver = driver;
        Image = image;
        FileChild = fileChild;
        FileName = fileName;
        AutoNamed = autoNamed;
    }

    public string Name { get; }
    public string Driver { get; }
    public BlockImage Image { get; }
    /// <summary>The protocol node under a format node (qcow2/raw on file).</summary>
    public BlockNode? FileChild { get; }
    /// <summary>A qcow2 node's external data file (a file node), whose guest data the node's users read and write.</summary>
    public BlockNode? DataFileChild { get; internal set; }
    /// <summary>The file name as the user gave it (what QEMU reports in "file" and "image.filename").</summary>
    public string FileName { get; }
    /// <summary>Created implicitly (an inline child definition); deleted with its parent.</summary>
    public bool AutoNamed { get; }
    /// <summary>discard=unmap: guest discards reach the image. Otherwise (QEMU's default, discard=ignore) they
    /// succeed without doing anything, and zero writes keep their allocation.</summary>
    public bool DiscardUnmap { get; init; }
    /// <summary>cache.direct and cache.no-flush as given (query-named-block-nodes reports them).</summary>
    public bool CacheDirect { get; init; }
    public bool CacheNoFlush { get; init; }

    /// <summary>Nodes a filter uses (copy-before-write: source and target; snapshot-access: the filter).</summary>
    public List<BlockNode> OtherChildren { get; internal set; } = new();

    /// <summary>The node named as this node's backing image, if any.</summary>
    public BlockNode? BackingChild { get; internal set; }

    /// <summary>Users of this node: parents in the graph, exports, jobs.</summary>
    public int Users { get; internal set; }

    /// <summary>Of <see cref="Users"/>, the exports (QEMU's BlockBackends), not parent nodes or jobs.</summary>
    public int BackendUsers { get; internal set; }

    /// <summary>Of <see cref="Users"/>, the block jobs writing to this node (QEMU's op blockers).</summary>
    public int JobUsers { get; internal set; }

    /// <summary>A file node taking QEMU's image locks (locking=auto/on; off leaves the file unlocked).</summary>
    public bool Locking { get; init; } = true;

    /// <summary>The lock claims of this node's exports and jobs.</summary>
    internal List<LockClaim> Claims { get; } = new();

    /// <summary>The host file under a file node, if any (what image locks are taken on).</summary>
    internal HostFile? HostFile => Image is RawImage { FormatName: "file" } f ? f.File : null;
}

/// <summary>Who uses a node besides its parents in the graph.</summary>
public enum NodeUser
{
    /// <summary>An NBD export (QEMU's BlockBackend): blockdev-del says the node is in use.</summary>
    Export,
    /// <summary>A block job writing to the node: blockdev-del says it is busy.</summary>
    JobTarget,
    /// <summary>A job that only reads the node (a backup's or mirror's source): image locks only.</summary>
    JobSource,
}
