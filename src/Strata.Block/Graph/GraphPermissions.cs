namespace Strata.Block.Graph;

/// <summary>
/// QEMU's permission rules over the graph: what the users of each node demand of it (taken and unshared
/// permissions), the check between parents sharing one file node, and the image locks that follow on each file.
/// </summary>
internal static class GraphPermissions
{
    /// <summary>Sets every file node's image locks to what its users demand (<see cref="Demand"/>).
    /// <paramref name="opening"/>: the claim of a qcow2 node about to open on <paramref name="openingOn"/>.</summary>
    public static void ApplyLocks(IReadOnlyCollection<BlockNode> nodes, BlockNode? openingOn = null, LockClaim? opening = null)
    {
        foreach (var node in nodes)
        {
            if (node.HostFile is not { } file || !node.Locking) continue;
            var wanted = Demand(nodes, node);
            if (node == openingOn && opening is { } extra) wanted = wanted.Union(extra);
            file.SetLockClaim(wanted);
        }
    }

    /// <summary>What the users of <paramref name="node"/> demand of it, as QEMU's permission graph has it: its own
    /// exports and jobs; a qcow2 parent's fixed claim on its file, and its users' demands passed through to its data
    /// file; a raw or throttle parent passes its users' demands through; a
    /// copy-before-write filter in use passes them through and keeps other writers and resizers off its source
    /// (their writes would escape the copy); the backing node of a node in use is read (and may still be written by
    /// others: QEMU shares that, so that a commit can write into it).</summary>
    public static LockClaim Demand(IReadOnlyCollection<BlockNode> nodes, BlockNode node)
    {
        var demand = node.Claims.Aggregate(LockClaim.None, (u, c) => u.Union(c));
        foreach (var parent in nodes)
        {
            if (parent.FileChild == node)
                demand = demand.Union(parent.Driver == "qcow2" ? LockClaim.Qcow2(parent.Image.ReadOnly) : Demand(nodes, parent));
            if (parent.DataFileChild == node) demand = demand.Union(LockClaim.Qcow2DataFile(Demand(nodes, parent)));
            if (parent.BackingChild == node && InUse(nodes, parent))
                demand = demand.Union(new(BlockPermissions.ConsistentRead, BlockPermissions.None));
            if (parent.OtherChildren.Count > 0 && parent.OtherChildren[0] == node)
            {
                if (parent.Driver == "throttle") demand = demand.Union(Demand(nodes, parent));
                else if (parent.Driver == "copy-before-write" && InUse(nodes, parent))
                    demand = demand.Union(Demand(nodes, parent)).Union(new(BlockPermissions.None, BlockPermissions.Write | BlockPermissions.Resize));
            }
        }
        return demand;
    }

    /// <summary>QEMU's permission check between parents of one node (one open file, so the OFD locks cannot
    /// see it): a new parent may not take what another refuses to share, nor refuse what another takes — two
    /// writable qcow2 nodes on one file would each overwrite the other's metadata.</summary>
    public static void CheckSiblings(IReadOnlyCollection<BlockNode> nodes, BlockNode child, string newParent, LockClaim wanted)
    {
        foreach (var parent in nodes)
        {
            if (parent.FileChild != child) continue;
            var held = parent.Driver == "qcow2" ? LockClaim.Qcow2(parent.Image.ReadOnly) : Demand(nodes, parent);
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

    /// <summary>Whether anything uses the node: a claim of its own, or a parent in the graph.</summary>
    private static bool InUse(IReadOnlyCollection<BlockNode> nodes, BlockNode node) =>
        node.Claims.Count > 0 || nodes.Any(p => p.FileChild == node || p.DataFileChild == node || p.BackingChild == node || p.OtherChildren.Contains(node));
}
