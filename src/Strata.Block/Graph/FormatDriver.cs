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
        BlockNode? dataChild = null;
        bool createdDataChild = false;
        try
        {
            // QEMU's qcow2 keeps writers and resizers off its file whoever uses the node; taken before the
            // image is opened, since a writable open marks in-use flags in the file.
            if (spec.Driver == "qcow2") graph.ClaimForNewParent(child, nodeName, LockClaim.Qcow2(spec.ReadOnly));
            if (spec.DataFileInline is { } dataInline)
            {
                dataChild = graph.AddInlineChild(dataInline);
                createdDataChild = true;
            }
            else if (spec.DataFileNodeName is { } dataName)
            {
                dataChild = graph.NodeNamed(dataName);
            }
            BlockImage image = spec.Driver == "raw"
                ? new RawImage(fileImage.File, "raw", ownsFile: false)
                : Qcow2Image.Open(fileImage.File, new Qcow2OpenOptions
                {
                    OwnsFile = false, ReadOnly = spec.ReadOnly, OwnsDataFile = false,
                    CrashSafeBitmaps = spec.CrashSafeBitmaps ?? graph.CrashSafeBitmapsByDefault,
                    DataFile = dataChild is null ? null : DataFileOf(dataChild),
                    // No data-file given: the header's name becomes a file node of its own, as in QEMU.
                    OpenDataFileByName = name =>
                    {
                        dataChild = graph.AddInlineChild(new BlockNodeSpec { Driver = "file", Filename = name, ReadOnly = spec.ReadOnly });
                        createdDataChild = true;
                        return DataFileOf(dataChild);
                    },
                });
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
                return new OpenedNode(image, child.FileName)
                {
                    FileChild = child, BackingChild = backingNode, DataFileChild = dataChild, DataFileChildCreated = createdDataChild,
                };
            }
            catch
            {
                image.Dispose();
                throw;
            }
        }
        catch
        {
            if (createdDataChild) graph.RemoveNode(dataChild!);
            if (createdChild) graph.RemoveNode(child);
            else graph.RefreshLocksQuietly();
            throw;
        }
    }

    /// <summary>The host file of a node serving as a qcow2 data file: Strata keeps guest data in host files only.</summary>
    private static HostFile DataFileOf(BlockNode node) => node.HostFile
        ?? throw new BlockException($"Node '{node.Name}' is not a file node; only file nodes can serve as a qcow2 data file");
}
