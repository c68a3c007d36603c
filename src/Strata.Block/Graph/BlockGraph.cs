namespace Strata.Block.Graph;

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

    /// <summary>qcow2 nodes track their persistent bitmaps crash-safely unless their spec says otherwise.</summary>
    public bool CrashSafeBitmapsByDefault { get; set; }

    /// <summary>Every bitmap change made so far is durable (crash-safe nodes checkpoint; others need nothing).</summary>
    public void PersistBitmapChanges()
    {
        foreach (var node in Nodes) node.Image?.PersistBitmapChanges();
    }

    /// <summary>Throttle groups defined with --object throttle-group.</summary>
    public Dictionary<string, Filters.ThrottleGroup> ThrottleGroups { get; } = new(StringComparer.Ordinal);

    /// <summary>The drivers nodes are opened with: the block layer's own, and those the host program registers
    /// (nbd, from the protocol library).</summary>
    public BlockDriverRegistry Drivers { get; } = BlockDriverRegistry.WithBuiltInDrivers();

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
        var opened = Drivers.Find(spec.Driver).Open(spec, name, this);
        var node = new BlockNode(name, spec.Driver, opened.Image, opened.FileChild, opened.FileName, autoNamed)
        {
            DiscardUnmap = spec.DiscardUnmap, CacheDirect = spec.CacheDirect, CacheNoFlush = spec.CacheNoFlush,
            BackingChild = opened.BackingChild, OtherChildren = opened.OtherChildren.ToList(), Locking = spec.Locking,
            DataFileChild = opened.DataFileChild,
        };
        if (node.FileChild is { } fileChild) fileChild.Users++;
        if (node.DataFileChild is { } dataFileChild) dataFileChild.Users++;
        if (node.BackingChild is { } backingChild) backingChild.Users++;
        foreach (var other in node.OtherChildren) other.Users++;
        _nodes[name] = node;
        _order.Add(name);
        if (opened.DataFileChildCreated)
        {
            // QEMU names a qcow2 node before its driver opens the data file: the data file node is the newer.
            _order.Remove(opened.DataFileChild!.Name);
            _order.Add(opened.DataFileChild.Name);
        }
        if (node.OtherChildren.Count > 0 || node.BackingChild is not null || node.DataFileChild is not null)
        {
            // A filter, a named backing node or a data file changes what is demanded of the nodes below it.
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

    // ------------------------------------------------------------------ for drivers (the graph's lock is held)

    /// <summary>The node a driver's definition names; QEMU's error when there is none.</summary>
    internal BlockNode NodeNamed(string name) =>
        _nodes.GetValueOrDefault(name) ?? throw new BlockException($"Cannot find device='{name}' nor node-name='{name}'");

    /// <summary>Adds a child defined inline in its parent's definition (named automatically unless it has a name).</summary>
    internal BlockNode AddInlineChild(BlockNodeSpec spec) => AddLocked(spec, topLevel: false);

    /// <summary>Removes a node a driver created and could not use (an inline child of a parent that failed to open).</summary>
    internal void RemoveNode(BlockNode node) => RemoveLocked(node);

    /// <summary>A new parent <paramref name="parentName"/> is about to open on <paramref name="child"/> with
    /// <paramref name="claim"/>: checked against the child's other parents, then locked on its file.</summary>
    internal void ClaimForNewParent(BlockNode child, string parentName, LockClaim claim)
    {
        GraphPermissions.CheckSiblings(_nodes.Values, child, parentName, claim);
        GraphPermissions.ApplyLocks(_nodes.Values, child, claim);
    }

    /// <summary>Giving up claims: what remains cannot newly conflict, and a failure to unlock must not stop a
    /// removal half-way.</summary>
    internal void RefreshLocksQuietly()
    {
        try { RefreshLocks(); } catch (BlockException) { }
    }

    // ------------------------------------------------------------------ users

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

    /// <summary>Sets every file node's image locks to what its users demand (<see cref="GraphPermissions"/>).</summary>
    private void RefreshLocks() => GraphPermissions.ApplyLocks(_nodes.Values);

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
        if (node.DataFileChild is { } dataFileChild)
        {
            dataFileChild.Users--;
            if (dataFileChild.AutoNamed) RemoveLocked(dataFileChild);
        }
        RefreshLocksQuietly();
    }

    /// <summary>Drains every node (QEMU's bdrv_drain_all_begin): transactions and quit.</summary>
    public DrainedSection DrainAll(TimeSpan? timeout = null)
    {
        lock (_lock) return DrainedSection.Begin(_nodes.Values.Select(n => n.Image).ToList(), timeout);
    }

    /// <summary>Closes every node, parents before children, storing persistent bitmaps.</summary>
    public void Dispose()
    {
        // Whatever is in flight lands before the images close (a request stuck on a dead NBD server is given up on).
        using var drained = NodeRequests.InsideRequest ? null : DrainAll(TimeSpan.FromSeconds(30));
        lock (_lock)
        {
            // Newest first is parents first, but for data files, which are newer than the qcow2 nodes that write
            // their tables (and flush the data file first) as they close: those go last.
            var dataFiles = _nodes.Values.Select(n => n.DataFileChild).OfType<BlockNode>().ToHashSet();
            var order = _order.AsEnumerable().Reverse().Where(_nodes.ContainsKey).Select(n => _nodes[n]).ToList();
            foreach (var node in order.Where(n => !dataFiles.Contains(n)).Concat(order.Where(dataFiles.Contains)))
            {
                try { node.Image.Dispose(); } catch (Exception) { }
            }
            _nodes.Clear();
            _order.Clear();
        }
    }
}
