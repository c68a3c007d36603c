using Strata.Block.Graph;

namespace Strata.Protocol.Nbd;

/// <summary>nbd as a graph driver: a node whose bytes live in a remote NBD export (<see cref="NbdImage"/>). It lives
/// here, beside the NBD client; whoever builds a graph that may hold such nodes registers it.</summary>
public sealed class NbdBlockDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["nbd"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        var image = NbdImage.Connect(spec.NbdSocketPath, spec.NbdHost, spec.NbdPort, spec.NbdExport, spec.ReadOnly);
        return new OpenedNode(image, image.FileName);
    }
}
