using Strata.Block.Qcow2;

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

/// <summary>The definition of a node to add (what blockdev-add and --blockdev carry, already validated).</summary>
public sealed record BlockNodeSpec
{
    public required string Driver { get; init; }
    public string? NodeName { get; init; }
    public bool ReadOnly { get; init; }
    /// <summary>file driver: the path.</summary>
    public string? Filename { get; init; }
    /// <summary>null-co read-zeroes=on.</summary>
    public bool ReadZeroes { get; init; }
    /// <summary>cache.direct=on: the file is opened with O_DIRECT.</summary>
    public bool CacheDirect { get; init; }
    /// <summary>cache.no-flush=on: flushes are not passed to the host.</summary>
    public bool CacheNoFlush { get; init; }
    /// <summary>qcow2/raw: the child, either an existing node's name or an inline definition.</summary>
    public string? FileNodeName { get; init; }
    public BlockNodeSpec? FileInline { get; init; }
    /// <summary>qcow2: false for "backing": null (do not open the backing chain).</summary>
    public bool OpenBacking { get; init; } = true;
    /// <summary>throttle: the group whose rate applies.</summary>
    public string? ThrottleGroup { get; init; }
    /// <summary>copy-before-write: the target node, and the bitmap (node, name) limiting what is kept.</summary>
    public string? TargetNodeName { get; init; }
    public (string Node, string Name)? CbwBitmap { get; init; }
    /// <summary>copy-before-write on-cbw-error=break-snapshot.</summary>
    public bool CbwBreakSnapshot { get; init; }
    /// <summary>copy-before-write cbw-timeout, seconds (0: none).</summary>
    public uint CbwTimeout { get; init; }
    /// <summary>qcow2: "backing": NODE — an existing node serves as the backing image (fleecing overlays).</summary>
    public string? BackingNodeName { get; init; }
    /// <summary>The "discard" option: true for unmap/on.</summary>
    public bool DiscardUnmap { get; init; }
    /// <summary>nbd: where the export lives (a unix socket path, or host and port) and its name.</summary>
    public string? NbdSocketPath { get; init; }
    public string? NbdHost { get; init; }
    public int NbdPort { get; init; }
    public string NbdExport { get; init; } = "";
    /// <summary>blkdebug: the fault injector put on the image file.</summary>
    public Blkdebug? Faults { get; init; }
    /// <summary>null-co: the size.</summary>
    public long Size { get; init; } = 1L << 30;
    /// <summary>file nodes: take QEMU's image locks (locking=auto or on).</summary>
    public bool Locking { get; init; } = true;
}

/// <summary>
/// The daemon's node graph. Commands that change it run one at a time (QMP is serialised), so a plain lock
/// guards it; data I/O goes to the nodes' images directly.
/// </summary>
public sealed class BlockGraph : IDisposable
{
    private readonly object _lock = new();
    private readonly Dictionary<string, BlockNode> _nodes = new(StringComparer.Ordinal);
    private readonly List<string> _order = new();
    private int _autoNames;

    /// <summary>Throttle groups defined with --object throttle-group.</summary>
    public Dictionary<string, Filters.ThrottleGroup> ThrottleGroups { get; } = new(StringComparer.Ordinal);

    /// <summary>Drivers that live outside the block layer (nbd, in the protocol library), by name.</summary>
    public Dictionary<string, Func<BlockNodeSpec, BlockImage>> ExternalDrivers { get; } = new(StringComparer.Ordinal);

    public IReadOnlyList<BlockNode> Nodes
    {
        get { lock (_lock) return _order.Select(n => _nodes[n]).Reverse().ToArray(); }
    }

    public BlockNode? Find(string name)
    {
        lock (_lock) return _nodes.GetValueOrDefault(name);
    }

    /// <summary>Adds a node (and any inline child). Errors are QEMU's texts.</summary>
    public BlockNode Add(BlockNodeSpec spec)
    {
        lock (_lock) return AddLocked(spec, topLevel: true);
    }

    private BlockNode AddLocked(BlockNodeSpec spec, bool topLevel)
    {
        string? name = spec.NodeName;
        bool autoNamed = false;
        if (name is null)
        {
            if (topLevel) throw new BlockException("A top-level node must have a node-name");
            name = $"#block{++_autoNames:D3}";
            autoNamed = true;
        }
        else
        {
            ValidateNodeName(name);
            if (_nodes.ContainsKey(name)) throw new BlockException($"Duplicate nodes with node-name='{name}'");
        }
        BlockNode node;
        switch (spec.Driver)
        {
            case "file":
            {
                var file = HostFile.Open(spec.Filename!, spec.ReadOnly, spec.CacheDirect);
                file.FlushEnabled = !spec.CacheNoFlush;
                node = new BlockNode(name, "file", new RawImage(file, "file"), null, spec.Filename!, autoNamed);
                break;
            }
            case "blkdebug":
            {
                // A file node whose every read, write and flush passes QEMU-style fault injection rules.
                var file = HostFile.Open(spec.Filename!, spec.ReadOnly, spec.CacheDirect);
                file.FlushEnabled = !spec.CacheNoFlush;
                file.Faults = spec.Faults;
                node = new BlockNode(name, "blkdebug", new RawImage(file, "file"), null, spec.Filename!, autoNamed);
                break;
            }
            case "throttle":
            {
                string fileName = spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing");
                var file = _nodes.GetValueOrDefault(fileName) ?? throw new BlockException($"Cannot find device='{fileName}' nor node-name='{fileName}'");
                string groupName = spec.ThrottleGroup ?? throw new BlockException("Parameter 'throttle-group' is missing");
                var group = ThrottleGroups.GetValueOrDefault(groupName) ?? throw new BlockException($"Throttle group '{groupName}' does not exist");
                file.Users++;
                node = new BlockNode(name, "throttle", new Filters.ThrottleImage(file.Image, group), null, file.FileName, autoNamed) { OtherChildren = [file] };
                break;
            }
            case "copy-before-write":
            case "snapshot-access":
            {
                string fileName = spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing");
                var file = _nodes.GetValueOrDefault(fileName) ?? throw new BlockException($"Cannot find device='{fileName}' nor node-name='{fileName}'");
                var children = new List<BlockNode> { file };
                BlockImage filter;
                if (spec.Driver == "copy-before-write")
                {
                    string targetName = spec.TargetNodeName ?? throw new BlockException("Parameter 'target' is missing");
                    var target = _nodes.GetValueOrDefault(targetName) ?? throw new BlockException($"Cannot find device='{targetName}' nor node-name='{targetName}'");
                    Bitmaps.DirtyBitmap? bitmap = null;
                    if (spec.CbwBitmap is var (bn, bname))
                    {
                        var bnode = _nodes.GetValueOrDefault(bn) ?? throw new BlockException($"Cannot find device='{bn}' nor node-name='{bn}'");
                        bitmap = bnode.Image.Bitmaps.Find(bname) ?? throw new BlockException($"Dirty bitmap '{bname}' not found");
                    }
                    // Inserted drained, as QEMU inserts a filter: no write is half-way past the point in time it fixes.
                    using (file.Image.Drain())
                        filter = new Filters.CopyBeforeWriteImage(file.Image, target.Image, bitmap, spec.CbwBreakSnapshot, spec.CbwTimeout);
                    children.Add(target);
                }
                else
                {
                    if (file.Image is not Filters.CopyBeforeWriteImage cbw) throw new BlockException("snapshot-access must sit on a copy-before-write node");
                    filter = new Filters.SnapshotAccessImage(cbw);
                }
                foreach (var c in children) c.Users++;
                node = new BlockNode(name, spec.Driver, filter, null, file.FileName, autoNamed) { OtherChildren = children };
                break;
            }
            case "null-co":
                node = new BlockNode(name, "null-co", new NullImage(spec.Size, spec.ReadOnly, spec.ReadZeroes), null, "null-co://", autoNamed);
                break;
            case "qcow2":
            case "raw":
            {
                BlockNode child;
                bool createdChild = false;
                if (spec.FileInline is { } inline)
                {
                    child = AddLocked(inline, topLevel: false);
                    createdChild = true;
                }
                else
                {
                    string childName = spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing");
                    child = _nodes.GetValueOrDefault(childName) ?? throw new BlockException($"Cannot find device='{childName}' nor node-name='{childName}'");
                }
                if (child.Image is not RawImage { FormatName: "file" } fileImage)
                {
                    if (createdChild) RemoveLocked(child);
                    throw new BlockException($"Node '{child.Name}' is not a file node; only file nodes can carry a {spec.Driver} node");
                }
                try
                {
                    // QEMU's qcow2 keeps writers and resizers off its file whoever uses the node; taken before the
                    // image is opened, since a writable open marks in-use flags in the file.
                    if (spec.Driver == "qcow2")
                    {
                        CheckSiblingPermissions(child, name, LockClaim.Qcow2(spec.ReadOnly));
                        RefreshLocks(child, LockClaim.Qcow2(spec.ReadOnly));
                    }
                    BlockImage image = spec.Driver == "raw"
                        ? new RawImage(fileImage.File, "raw", ownsFile: false)
                        : Qcow2Image.Open(fileImage.File, new Qcow2OpenOptions { OwnsFile = false, ReadOnly = spec.ReadOnly });
                    // The daemon takes no secrets yet: an encrypted image is refused as QEMU refuses one given no key
                    // (never served as ciphertext).
                    if (image is Qcow2Image { EncryptionFormat: not null })
                    {
                        image.Dispose();
                        throw new BlockException("Parameter 'encrypt.key-secret' is required for cipher");
                    }
                    BlockNode? backingNode = null;
                    if (spec.BackingNodeName is { } bn)
                    {
                        backingNode = _nodes.GetValueOrDefault(bn);
                        if (backingNode is null)
                        {
                            image.Dispose();
                            throw new BlockException($"Cannot find device='{bn}' nor node-name='{bn}'");
                        }
                        image.UseBackingNode(backingNode.Image);
                        backingNode.Users++;
                    }
                    else if (spec.OpenBacking && image.BackingFileName is { } backing)
                    {
                        try
                        {
                            image.ReplaceBacking(ImageOpener.Open(ImageOpener.ResolveBackingPath(child.FileName, backing), image.BackingFormat,
                                locking: child.Locking ? ImageLocking.FormatOnly : ImageLocking.Off));
                        }
                        catch
                        {
                            image.Dispose();
                            throw;
                        }
                    }
                    node = new BlockNode(name, spec.Driver, image, child, child.FileName, autoNamed) { BackingChild = backingNode };
                    child.Users++;
                }
                catch
                {
                    if (createdChild) RemoveLocked(child);
                    else RefreshLocksQuietly();
                    throw;
                }
                break;
            }
            default:
                if (!ExternalDrivers.TryGetValue(spec.Driver, out var open)) throw new BlockException($"Unknown driver '{spec.Driver}'");
                var external = open(spec);
                node = new BlockNode(name, spec.Driver, external, null, external.FileName, autoNamed);
                break;
        }
        node = new BlockNode(node.Name, node.Driver, node.Image, node.FileChild, node.FileName, node.AutoNamed)
            {
                DiscardUnmap = spec.DiscardUnmap, CacheDirect = spec.CacheDirect, CacheNoFlush = spec.CacheNoFlush,
                BackingChild = node.BackingChild, OtherChildren = node.OtherChildren, Locking = spec.Locking,
            };
        _nodes[name] = node;
        _order.Add(name);
        if (node.OtherChildren.Count > 0 || node.BackingChild is not null)
        {
            // A filter or a named backing node changes what is demanded of the nodes below it.
            try
            {
                RefreshLocks();
            }
            catch
            {
                RemoveLocked(node);
                throw;
            }
        }
        return node;
    }

    private static void ValidateNodeName(string name)
    {
        if (name.Length == 0 || name.Length > 31 || !char.IsAsciiLetter(name[0]) ||
            name.Any(c => !(char.IsAsciiLetterOrDigit(c) || c is '-' or '.' or '_')))
            throw new BlockException("Invalid node-name: '" + name + "'");
    }

    /// <summary>A user starts using the node. Its lock claim is taken first (<see cref="ImageLockedException"/> when
    /// another process's locks forbid it); exports and writing jobs then keep blockdev-del off the node.</summary>
    public void AddUser(BlockNode node, NodeUser user, LockClaim claim)
    {
        lock (_lock)
        {
            AddClaim(node, claim);
            Count(node, user, +1);
        }
    }

    public void RemoveUser(BlockNode node, NodeUser user, LockClaim claim)
    {
        lock (_lock)
        {
            Count(node, user, -1);
            RemoveClaim(node, claim);
        }
    }

    private static void Count(BlockNode node, NodeUser user, int delta)
    {
        if (user == NodeUser.JobSource) return;
        node.Users += delta;
        if (user == NodeUser.Export) node.BackendUsers += delta;
        else node.JobUsers += delta;
    }

    private void AddClaim(BlockNode node, LockClaim claim)
    {
        node.Claims.Add(claim);
        try
        {
            RefreshLocks();
        }
        catch
        {
            node.Claims.Remove(claim);
            RefreshLocksQuietly();
            throw;
        }
    }

    private void RemoveClaim(BlockNode node, LockClaim claim)
    {
        node.Claims.Remove(claim);
        RefreshLocksQuietly();
    }

    /// <summary>Sets every file node's image locks to what its users demand (<see cref="Demand"/>).
    /// <paramref name="opening"/>: the claim of a qcow2 node about to open on <paramref name="openingOn"/>.</summary>
    private void RefreshLocks(BlockNode? openingOn = null, LockClaim? opening = null)
    {
        foreach (var node in _nodes.Values)
        {
            if (node.HostFile is not { } file || !node.Locking) continue;
            var wanted = Demand(node);
            if (node == openingOn && opening is { } extra) wanted = wanted.Union(extra);
            file.SetLockClaim(wanted);
        }
    }

    /// <summary>What the users of <paramref name="node"/> demand of it, as QEMU's permission graph has it: its own
    /// exports and jobs; a qcow2 parent's fixed claim; a raw or throttle parent passes its users' demands through; a
    /// copy-before-write filter in use passes them through and keeps other writers and resizers off its source
    /// (their writes would escape the copy); the backing node of a node in use is read (and may still be written by
    /// others: QEMU shares that, so that a commit can write into it).</summary>
    private LockClaim Demand(BlockNode node)
    {
        var demand = node.Claims.Aggregate(LockClaim.None, (u, c) => u.Union(c));
        foreach (var parent in _nodes.Values)
        {
            if (parent.FileChild == node)
                demand = demand.Union(parent.Driver == "qcow2" ? LockClaim.Qcow2(parent.Image.ReadOnly) : Demand(parent));
            if (parent.BackingChild == node && InUse(parent))
                demand = demand.Union(new(BlockPermissions.ConsistentRead, BlockPermissions.None));
            if (parent.OtherChildren.Count > 0 && parent.OtherChildren[0] == node)
            {
                if (parent.Driver == "throttle") demand = demand.Union(Demand(parent));
                else if (parent.Driver == "copy-before-write" && InUse(parent))
                    demand = demand.Union(Demand(parent)).Union(new(BlockPermissions.None, BlockPermissions.Write | BlockPermissions.Resize));
            }
        }
        return demand;
    }

    /// <summary>QEMU's permission check between parents of one node (one open file, so the OFD locks cannot
    /// see it): a new parent may not take what another refuses to share, nor refuse what another takes — two
    /// writable qcow2 nodes on one file would each overwrite the other's metadata.</summary>
    private void CheckSiblingPermissions(BlockNode child, string newParent, LockClaim wanted)
    {
        foreach (var parent in _nodes.Values)
        {
            if (parent.FileChild != child) continue;
            var held = parent.Driver == "qcow2" ? LockClaim.Qcow2(parent.Image.ReadOnly) : Demand(parent);
            if (Conflict(held.Taken & wanted.Unshared, parent.Name, newParent) is { } a) throw new BlockException(a);
            if (Conflict(wanted.Taken & held.Unshared, newParent, parent.Name) is { } b) throw new BlockException(b);
        }

        string? Conflict(BlockPermissions both, string requiredBy, string unsharedBy)
        {
            if (both == BlockPermissions.None) return null;
            var names = Enumerable.Range(0, 4).Select(i => (BlockPermissions)(1 << i)).Where(p => both.HasFlag(p)).Select(LockClaim.PermissionName);
            return $"Permission conflict on node '{child.Name}': permissions '{string.Join(", ", names)}' are both required by node '{requiredBy}' " +
                   $"(uses node '{child.Name}' as 'file' child) and unshared by node '{unsharedBy}' (uses node '{child.Name}' as 'file' child).";
        }
    }

    private bool InUse(BlockNode node) =>
        node.Claims.Count > 0 || _nodes.Values.Any(p => p.FileChild == node || p.BackingChild == node || p.OtherChildren.Contains(node));

    /// <summary>Giving up claims: what remains cannot newly conflict, and a failure to unlock must not stop a
    /// removal half-way.</summary>
    private void RefreshLocksQuietly()
    {
        try { RefreshLocks(); } catch (BlockException) { }
    }

    /// <summary>blockdev-del: the node must have no users; its persistent bitmaps are stored as it closes.</summary>
    public void Delete(string name)
    {
        lock (_lock)
        {
            var node = _nodes.GetValueOrDefault(name) ?? throw new BlockException($"Failed to find node with node-name='{name}'");
            // QEMU's checks, in its order: an export holds it, a job blocks it, it was not added by the monitor,
            // another node has it as a child.
            if (node.BackendUsers > 0) throw new BlockException($"Node {name} is in use");
            if (node.JobUsers > 0) throw new BlockException($"Node '{name}' is busy: block device is in use by block job: backup");
            if (node.AutoNamed) throw new BlockException($"Node {name} is not owned by the monitor");
            if (node.Users > 0) throw new BlockException($"Block device {name} is in use");
            using var drained = node.Image.Drain();
            RemoveLocked(node);
        }
    }

    /// <summary>blockdev-snapshot-sync's new top: a qcow2 node (named, or automatic) on <paramref name="file"/> whose
    /// backing image is <paramref name="below"/>'s.</summary>
    /// <remarks>With <paramref name="below"/> null the image opens its own backing chain (drive-mirror's target).</remarks>
    public BlockNode AddOverlay(string? name, string file, BlockNode? below, string format = "qcow2")
    {
        lock (_lock)
            return AddLocked(new BlockNodeSpec
            {
                Driver = format, NodeName = name, BackingNodeName = below?.Name,
                FileInline = new BlockNodeSpec { Driver = "file", Filename = file },
            }, topLevel: false);
    }

    /// <summary>Reopens a node read-only (the old top of an external snapshot); its file keeps only a reader's locks.</summary>
    public void SwitchToReadOnly(BlockNode node)
    {
        lock (_lock)
        {
            node.Image.SwitchToReadOnly();
            RefreshLocksQuietly();
        }
    }

    /// <summary>Removes a node nothing but this daemon's own bookkeeping uses (undoing a snapshot in a failed
    /// transaction), whether or not it was named automatically.</summary>
    public void DeleteForce(BlockNode node)
    {
        lock (_lock)
        {
            if (node.Users > 0) throw new BlockException($"Block device {node.Name} is in use");
            using var drained = node.Image.Drain();
            RemoveLocked(node);
        }
    }

    /// <summary>Checks a filter-node-name can be used (null: an automatic name will be).</summary>
    public void CheckNewNodeName(string? name)
    {
        if (name is null) return;
        ValidateNodeName(name);
        lock (_lock)
            if (_nodes.ContainsKey(name)) throw new BlockException($"Duplicate nodes with node-name='{name}'");
    }

    /// <summary>Lists a job's filter node above <paramref name="child"/> while the job runs.</summary>
    public BlockNode AddJobFilter(string? name, BlockImage filter, BlockNode child)
    {
        lock (_lock)
        {
            bool auto = name is null;
            name ??= $"#block{++_autoNames:D3}";
            if (_nodes.ContainsKey(name)) throw new BlockException($"Duplicate nodes with node-name='{name}'");
            var node = new BlockNode(name, "copy-before-write", filter, null, child.FileName, auto) { JobUsers = 1, Users = 1 };
            _nodes[name] = node;
            _order.Add(name);
            return node;
        }
    }

    public void RemoveJobFilter(BlockNode node)
    {
        lock (_lock)
        {
            if (!_nodes.TryGetValue(node.Name, out var current) || current != node) return;
            _nodes.Remove(node.Name);
            _order.Remove(node.Name);
        }
    }

    private void RemoveLocked(BlockNode node)
    {
        _nodes.Remove(node.Name);
        _order.Remove(node.Name);
        // Once out of the graph the node is gone whatever closing it meets (a failing disk under blkdebug, say):
        // QEMU's blockdev-del does not fail after its checks either, and the rest of the removal must still run.
        try { node.Image.Dispose(); } catch (Exception e) when (e is BlockException or IOException) { }
        if (node.BackingChild is { } backingChild) backingChild.Users--;
        foreach (var other in node.OtherChildren) other.Users--;
        if (node.FileChild is { } child)
        {
            child.Users--;
            if (child.AutoNamed) RemoveLocked(child);
        }
        RefreshLocksQuietly();
    }

    /// <summary>Closes every node, parents before children, storing persistent bitmaps.</summary>
    /// <summary>Drains every node (QEMU's bdrv_drain_all_begin): transactions and quit.</summary>
    public DrainedSection DrainAll(TimeSpan? timeout = null)
    {
        lock (_lock) return DrainedSection.Begin(_nodes.Values.Select(n => n.Image).ToList(), timeout);
    }

    public void Dispose()
    {
        // Whatever is in flight lands before the images close (a request stuck on a dead NBD server is given up on).
        using var drained = NodeRequests.InsideRequest ? null : DrainAll(TimeSpan.FromSeconds(30));
        lock (_lock)
        {
            foreach (var name in _order.AsEnumerable().Reverse().ToList())
            {
                if (!_nodes.TryGetValue(name, out var node)) continue;
                try { node.Image.Dispose(); } catch (Exception) { }
            }
            _nodes.Clear();
            _order.Clear();
        }
    }
}
