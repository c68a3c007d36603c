using Strata.Block.Qcow2;

namespace Strata.Block.Graph;

/// <summary>qcow2 and raw: a format on a file node, named or defined inline (an inline child is created with the
/// node and goes with it).</summary>
internal sealed class FormatDriver : IBlockDriver
{
    public IReadOnlyList<string> Names { get; } = ["qcow2", "raw"];

    public OpenedNode Open(BlockNodeSpec spec, string nodeName, BlockGraph graph)
    {
        BlockNode child;
        bool createdChild = false;
        if (spec.FileInline is { } inline)
        {
            child = graph.AddInlineChild(inline);
            createdChild = true;
        }
        else
        {
            child = graph.NodeNamed(spec.FileNodeName ?? throw new BlockException("Parameter 'file' is missing"));
        }
        if (child.Image is not RawImage { FormatName: "file" } fileImage)
        {
            if (createdChild) graph.RemoveNode(child);
            throw new BlockException($"Node '{child.Name}' is not a file node; only file nodes can carry a {spec.Driver} node");
        }
        try
        {
            // QEMU's qcow2 keeps writers and resizers off its file whoever uses the node; taken before the
            // image is opened, since a writable open marks in-use flags in the file.
            if (spec.Driver == "qcow2") graph.ClaimForNewParent(child, nodeName, LockClaim.Qcow2(spec.ReadOnly));
            BlockImage image = spec.Driver == "raw"
                ? new RawImage(fileImage.File, "raw", ownsFile: false)
                : Qcow2Image.Open(fileImage.File, new Qcow2OpenOptions { OwnsFile = false, ReadOnly = spec.ReadOnly, CrashSafeBitmaps = spec.CrashSafeBitmaps ?? graph.CrashSafeBitmapsByDefault });
            try
            {
                // The daemon takes no secrets yet: an encrypted image is refused as QEMU refuses one given no key
                // (never served as ciphertext).
                if (image is Qcow2Image { EncryptionFormat: not null })
                    throw new BlockException("Parameter 'encrypt.key-secret' is required for cipher");
                BlockNode? backingNode = null;
                if (spec.BackingNodeName is { } backingName)
                {
                    backingNode = graph.NodeNamed(backingName);
                    image.UseBackingNode(backingNode.Image);
                }
                else if (spec.OpenBacking && image.BackingFileName is { } backing)
                {
                    image.ReplaceBacking(ImageOpener.Open(ImageOpener.ResolveBackingPath(child.FileName, backing), image.BackingFormat,
                        locking: child.Locking ? ImageLocking.FormatOnly : ImageLocking.Off));
                }
                return new OpenedNode(image, child.FileName) { FileChild = child, BackingChild = backingNode };
            }
            catch
            {
                image.Dispose();
                throw;
            }
        }
        catch
        {
            if (createdChild) graph.RemoveNode(child);
            else graph.RefreshLocksQuietly();
            throw;
        }
    }
}
