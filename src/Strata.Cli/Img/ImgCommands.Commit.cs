using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Formats.Qcow2;

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
        var cache = new Option<string?>("-t") { Description = "cache mode (accepted)" };
        var file = new Argument<string>("filename");
        var cmd = new Command("commit", "Write an image's changes into its backing file") { format, quiet, keep, progress, cache, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string path = r.GetValue(file)!;
            // The whole chain must open (no loop, no missing layer) before the top and its backing file are taken
            // for writing, or a loop would read as the image locking itself out.
            OpenImage(path, r.GetValue(format), locking: ImageLocking.Off).Dispose();
            using var top = OpenImage(path, r.GetValue(format), readOnly: false, openBacking: false);
            if (top.BackingFileName is not { } backingName) throw new BlockException("Image does not have a backing file");
            string backingPath = ImageOpener.ResolveBackingPath(path, backingName);
            using var backing = ImageOpener.Open(backingPath, top.BackingFormat, readOnly: false, locking: ImageLocking.Normal);
            var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout) : null;
            ChainOperations.Commit(top, backing, r.GetValue(keep), printer is null ? null : printer.Report);
            printer?.Finish();
            if (!r.GetValue(quiet)) stdout.WriteLine("Image committed.");
            return 0;
        }));
        return cmd;
    }
}
