using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img rebase`: qemu-img rebase's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command RebaseCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var backing = LastWins("-b", "new backing file ('' for none)");
        var backingFormat = LastWins("-F", "new backing file format");
        var unsafeMode = new Option<bool>("-u") { Description = "only change the header (unsafe)" };
        var quiet = QuietOption();
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var cache = LastWins("-t", "cache mode (accepted)");
        var forceShare = ForceShareOption();
        var file = new Argument<string>("filename");
        var cmd = new Command("rebase", "Change the backing file of an image") { format, backing, backingFormat, unsafeMode, quiet, progress, cache, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string path = r.GetValue(file)!;
            string? newBacking = r.GetValue(backing);
            if (newBacking is null) throw new UsageException("Must specify backing file (-b) or use '-b \"\"' for no backing file");
            if (newBacking.Length == 0) newBacking = null;
            string? newFormat = r.GetValue(backingFormat);
            if (newFormat is not null && !QemuFormatNames.Contains(newFormat))
                throw new BlockException($"Invalid format name: '{newFormat}'");
            // As qemu-img 7.2: a new backing file is never written into the header without its format.
            var formatMissing = () => new BlockException($"Could not change the backing file to '{newBacking}': backing format must be specified");
            if (r.GetValue(unsafeMode))
            {
                using var img = OpenImage(path, r.GetValue(format), readOnly: false, openBacking: false);
                if (newBacking is not null && newFormat is null) throw formatMissing();
                img.SetBackingFile(newBacking, newFormat);
                return 0;
            }
            using var image = OpenImage(path, r.GetValue(format), readOnly: false, openBacking: true);
            if (newBacking is not null && newFormat is null) throw formatMissing();
            BlockImage? newChain = null;
            try
            {
                if (newBacking is not null)
                {
                    try { newChain = ImageOpener.Open(ImageOpener.ResolveBackingPath(path, newBacking), newFormat, locking: ReadLocking(r.GetValue(forceShare))); }
                    catch (BlockException e) { throw new BlockException($"Could not open new backing file '{newBacking}': {e.Message}"); }
                }
                var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout, minSkip: 2) : null;
                printer?.Report(0);
                ChainOperations.Rebase(image, image.Backing, newChain, newBacking, newFormat, printer is null ? null : printer.Report);
                printer?.Finish();
            }
            finally
            {
                newChain?.Dispose();
            }
            return 0;
        }));
        return cmd;
    }
}
