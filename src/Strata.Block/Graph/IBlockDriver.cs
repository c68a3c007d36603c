namespace Strata.Block.Graph;

/// <summary>
/// A kind of node the graph can open (QEMU's BlockDriver): the names blockdev-add's "driver" takes for it, and how
/// a node of that kind is opened from its definition.
/// </summary>
public interface IBlockDriver
{
    /// <summary>The driver names this driver opens (a "driver" value is taken by at most one driver).</summary>
    IReadOnlyList<string> Names { get; }

    /// <summary>Opens the node <paramref name="nodeName"/> (the name given, or the automatic one) from
    /// <paramref name="spec"/>, already validated. Runs under the graph's lock; the nodes it sits on are looked up in
    /// <paramref name="graph"/>. Errors are QEMU's texts.</summary>
    OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph);
}

/// <summary>What a driver opened: the image, the file name QEMU reports for it, and the nodes it sits on. The graph
/// names the node and counts it as a user of each of those children.</summary>
public sealed record OpenedNode(BlockImage Image, string FileName)
{
    /// <summary>The protocol node under a format node.</summary>
    public BlockNode? FileChild { get; init; }
    /// <summary>A qcow2 node's external data file node.</summary>
    public BlockNode? DataFileChild { get; init; }
    /// <summary>The data file node was created with its parent (inline, or from the header's name) and goes with it.</summary>
    public bool DataFileChildCreated { get; init; }
    /// <summary>An existing node serving as the backing image.</summary>
    public BlockNode? BackingChild { get; init; }
    /// <summary>The nodes a filter uses (its source first).</summary>
    public IReadOnlyList<BlockNode> OtherChildren { get; init; } = [];
}
