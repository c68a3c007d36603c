namespace Strata.Block.Graph;

/// <summary>file: a host file (or block device) read and written with pread/pwrite.</summary>
internal sealed class FileDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["file"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var file = HostFile.Open(spec.Filename!, spec.ReadOnly, spec.CacheDirect);
        file.FlushEnabled = !spec.CacheNoFlush;
        return new OpenedNode(new RawImage(file, "file"), spec.Filename!);
    }
}

/// <summary>blkdebug: a file node whose every read, write and flush passes QEMU-style fault injection rules.</summary>
internal sealed class BlkdebugDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["blkdebug"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var file = HostFile.Open(spec.Filename!, spec.ReadOnly, spec.CacheDirect);
        file.FlushEnabled = !spec.CacheNoFlush;
        file.Faults = spec.Faults;
        return new OpenedNode(new RawImage(file, "file"), spec.Filename!);
    }
}

/// <summary>null-co: a node of a given size that stores nothing (reads zeros when read-zeroes=on).</summary>
internal sealed class NullDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["null-co"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph) =>
        new(new NullImage(spec.Size, spec.ReadOnly, spec.ReadZeroes), "null-co://");
}
