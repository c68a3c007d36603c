using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img commit`: qemu-img commit's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command CommitCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var quiet = QuietOption();
        var keep = new Option<bool>("-d") { Description = "do not empty the top image" };
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var cache = LastWins("-t", "cache mode (accepted)");
        var file = new Argument<string>("filename");
        var baseOption = LastWins("-b", "the layer of the backing chain to commit into (implies -d)");
        var cmd = new Command("commit", "Write an image's changes into its backing file") { format, quiet, keep, progress, cache, file, baseOption };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string path = r.GetValue(file)!;
            // The whole chain opens first (no loop, no missing layer), without locks: it is what the commit reads.
            // The top and the base are then taken for writing on their own, or a loop would read as the image
            // locking itself out.
            using var chain = OpenImage(path, r.GetValue(format), locking: ImageLocking.Off);
            if (chain.Backing is null) throw new BlockException("Image does not have a backing file");
            string? baseName = r.GetValue(baseOption);
            int baseDepth = baseName is null ? 1 : FindInChain(chain, baseName)
                ?? throw new BlockException($"Did not find '{baseName}' in the backing chain of '{path}'");
            var layers = ImageOpener.Layers(chain);
            var baseLayer = layers[baseDepth];
            bool emptyTop = !r.GetValue(keep) && baseName is null;
            using var top = emptyTop ? OpenImage(path, r.GetValue(format), readOnly: false, openBacking: false) : null;
            // A base named by options (json:, blkdebug:) opens as named, so that filters such as blkdebug stay on it.
            string? storedName = layers[baseDepth - 1].BackingFileName;
            string targetName = storedName is not null && BlockSpec.ProtocolOf(storedName) is "json" or "blkdebug" ? storedName : baseLayer.FileName;
            using var target = BaseSpec(path, baseDepth) is { } baseSpec
                ? ImageOpener.OpenSpecChain(baseLayer.FileName, baseSpec, baseLayer.FormatName, readOnly: false, locking: ImageLocking.Normal)
                : ImageOpener.Open(targetName, baseLayer.FormatName, readOnly: false, locking: ImageLocking.Normal);
            var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout, minSkip: 1) : null;
            printer?.Report(0, 1);
            try
            {
                ChainOperations.Commit(chain, baseDepth, target, printer is null ? null : printer.Report);
            }
            catch (BlockIOException e)
            {
                throw new BlockException($"Block job failed: {BlockIOException.Describe(e.Errno)}");
            }
            if (top is Qcow2Image q)
            {
                try
                {
                    q.MakeEmpty();
                    q.Flush();
                }
                catch (BlockIOException e)
                {
                    throw new BlockException($"Failed to empty {path}: {BlockIOException.Describe(e.Errno)}");
                }
            }
            printer?.Finish();
            if (!r.GetValue(quiet)) stdout.WriteLine("Image committed.");
            return 0;
        }));
        return cmd;
    }

    /// <summary>The options --image-opts gives the base layer (backing.…, as deep as the base lies), when they
    /// describe it themselves — its key secret among them; null when the base is opened by its file name.</summary>
    private static BlockOptions? BaseSpec(string path, int baseDepth)
    {
        if (!IsImageOpts(path)) return null;
        var options = BlockSpec.FromKeyValues(path);
        for (int depth = 0; depth < baseDepth; depth++)
        {
            options = options.Child("backing");
            if (!options.HasChild("file") && options["driver"] is null) return null;
        }
        return options;
    }

    /// <summary>The depth of the layer <paramref name="name"/> names, as qemu-img finds a base: the backing file name
    /// as an overlay stores it, or a path that (relative to that overlay) is the same file.</summary>
    private static int? FindInChain(BlockImage top, string name)
    {
        var layers = ImageOpener.Layers(top);
        for (int depth = 1; depth < layers.Count; depth++)
        {
            var overlay = layers[depth - 1];
            if (overlay.BackingFileName == name) return depth;
            string candidate = Path.GetFullPath(ImageOpener.ResolveBackingPath(overlay.FileName, name));
            if (candidate == Path.GetFullPath(layers[depth].FileName)) return depth;
        }
        return null;
    }
}
