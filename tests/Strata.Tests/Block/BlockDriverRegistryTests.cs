using Strata.Block;
using Strata.Block.Graph;
using Strata.Daemon;
using Strata.Protocol.Nbd;

namespace Strata.Tests.Block;

/// <summary>The graph opens nodes through its driver registry: an unknown name gets QEMU's answer, a registered
/// driver opens nodes (its children counted as used), and no name can be taken twice.</summary>
public class BlockDriverRegistryTests
{
    /// <summary>Opens a 1 MiB null node, on the node named by "file" when given.</summary>
    private sealed class TestDriver(params string[] names) : IBlockDriver
    {
        public IReadOnlyList<string> Names { get; } = names;
        public List<string> Opened { get; } = new();

        public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
        {
            Opened.Add(nodeName);
            var image = new NullImage(1 << 20, spec.ReadOnly, readZeroes: true);
            return spec.FileNodeName is { } file
                ? new OpenedNode(image, "test://" + nodeName) { OtherChildren = [graph.NodeNamed(file)] }
                : new OpenedNode(image, "test://" + nodeName);
        }
    }

    [Fact]
    public void UnknownDriverIsRefusedWithQemusMessage()
    {
        using var graph = new BlockGraph();
        var e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec { Driver = "vmdk", NodeName = "n" }));
        Assert.Equal("Unknown driver 'vmdk'", e.Message);
        // nbd lives in the protocol library: a graph nobody registered it with does not know it.
        e = Assert.Throws<BlockException>(() => graph.Add(new BlockNodeSpec { Driver = "nbd", NodeName = "n" }));
        Assert.Equal("Unknown driver 'nbd'", e.Message);
        Assert.Empty(graph.Nodes);
    }

    [Fact]
    public void RegisteredDriverOpensNodesAndItsChildrenCountAsUsed()
    {
        using var graph = new BlockGraph();
        var driver = new TestDriver("test-null");
        graph.Drivers.Register(driver);
        Assert.Same(driver, graph.Drivers.Find("test-null"));

        var below = graph.Add(new BlockNodeSpec { Driver = "null-co", NodeName = "below", Size = 1 << 20 });
        var node = graph.Add(new BlockNodeSpec { Driver = "test-null", NodeName = "top", FileNodeName = "below" });
        Assert.Equal(["top"], driver.Opened);
        Assert.Equal("test-null", node.Driver);
        Assert.Equal("test://top", node.FileName);
        Assert.Equal([below], node.OtherChildren);
        Assert.Equal(1, below.Users);
        Assert.Equal("Block device below is in use", Assert.Throws<BlockException>(() => graph.Delete("below")).Message);

        graph.Delete("top");
        Assert.Equal(0, below.Users);
        graph.Delete("below");
        Assert.Empty(graph.Nodes);
    }

    [Fact]
    public void ANameTakenTwiceIsRefused()
    {
        var registry = BlockDriverRegistry.WithBuiltInDrivers();
        var e = Assert.Throws<InvalidOperationException>(() => registry.Register(new TestDriver("file")));
        Assert.Equal("A block driver named 'file' is already registered", e.Message);
        // Refused as a whole: the driver's other, free name is not taken either.
        Assert.Throws<InvalidOperationException>(() => registry.Register(new TestDriver("fresh", "qcow2")));
        Assert.Equal("Unknown driver 'fresh'", Assert.Throws<BlockException>(() => registry.Find("fresh")).Message);
        registry.Register(new TestDriver("fresh"));
        Assert.Throws<InvalidOperationException>(() => registry.Register(new TestDriver("fresh")));
    }

    [Fact]
    public void TheDaemonRegistersTheNbdDriver()
    {
        using var graph = new BlockGraph();
        _ = new DaemonBackend(graph);
        Assert.IsType<NbdBlockDriver>(graph.Drivers.Find("nbd"));
    }
}
