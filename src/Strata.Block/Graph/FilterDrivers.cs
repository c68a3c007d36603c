using Strata.Block.Filters;

namespace Strata.Block.Graph;

/// <summary>throttle: a filter limiting the rate of requests to its child to its throttle group's.</summary>
internal sealed class ThrottleDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["throttle"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var file = graph.NodeNamed(spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing"));
        string groupName = spec.ThrottleGroup ?? throw new BlockException("Parameter 'throttle-group' is missing");
        var group = graph.ThrottleGroups.GetValueOrDefault(groupName) ?? throw new BlockException($"Throttle group '{groupName}' does not exist");
        return new OpenedNode(new ThrottleImage(file.Image, group), file.FileName) { OtherChildren = [file] };
    }
}

/// <summary>copy-before-write: a filter that copies what a write is about to overwrite to its target first (the
/// point in time a fleecing backup reads).</summary>
internal sealed class CopyBeforeWriteDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["copy-before-write"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var file = graph.NodeNamed(spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing"));
        var target = graph.NodeNamed(spec.TargetNodeName ?? throw new BlockException("Parameter 'target' is missing"));
        Bitmaps.DirtyBitmap? bitmap = null;
        if (spec.CbwBitmap is var (bitmapNode, bitmapName))
            bitmap = graph.NodeNamed(bitmapNode).Image.Bitmaps.Find(bitmapName) ?? throw new BlockException($"Dirty bitmap '{bitmapName}' not found");
        CopyBeforeWriteImage filter;
        // Inserted drained, as QEMU inserts a filter: no write is half-way past the point in time it fixes.
        using (file.Image.Drain())
            filter = new CopyBeforeWriteImage(file.Image, target.Image, bitmap, spec.CbwBreakSnapshot, spec.CbwTimeout);
        return new OpenedNode(filter, file.FileName) { OtherChildren = [file, target] };
    }
}

/// <summary>snapshot-access: reads the point in time a copy-before-write filter below it keeps.</summary>
internal sealed class SnapshotAccessDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["snapshot-access"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var file = graph.NodeNamed(spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing"));
        if (file.Image is not CopyBeforeWriteImage cbw) throw new BlockException("snapshot-access must sit on a copy-before-write node");
        return new OpenedNode(new SnapshotAccessImage(cbw), file.FileName) { OtherChildren = [file] };
    }
}
