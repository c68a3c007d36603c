using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img compare`: qemu-img compare's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command CompareCommand(TextWriter stdout, TextWriter stderr)
    {
        var fa = FormatOption("-f", "format of the first image");
        var fb = FormatOption("-F", "format of the second image");
        var strict = new Option<bool>("-s") { Description = "strict: sizes and allocation must match too" };
        var quiet = QuietOption();
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var files = new Argument<string[]>("filenames") { Arity = ArgumentArity.ZeroOrMore };
        var forceShare = ForceShareOption();
        var cmd = new Command("compare", "Check whether two images have the same content") { fa, fb, strict, quiet, progress, forceShare, files };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var names = r.GetValue(files) ?? [];
            if (names.Length != 2) throw new UsageException("Expecting two image file names");
            // qemu-img names the image that failed to open and exits 2, as for any compare error.
            BlockImage? Open(string name, string? format)
            {
                try { return OpenImage(name, format, locking: ReadLocking(r.GetValue(forceShare))); }
                catch (BlockException e) { stderr.WriteLine($"{Prog}: {Qualify(name, e.Message)}"); return null; }
            }
            using var a = Open(names[0], r.GetValue(fa));
            if (a is null) return 2;
            using var b = Open(names[1], r.GetValue(fb));
            if (b is null) return 2;
            bool quietMode = r.GetValue(quiet);
            var progressPrinter = r.GetValue(progress) && !quietMode ? new ProgressPrinter(stdout, minSkip: 2) : null;
            progressPrinter?.Report(0);
            CompareResult result;
            try
            {
                result = ImageComparer.Compare(a, b, r.GetValue(strict), progressPrinter is null ? null : progressPrinter.Report);
            }
            catch (CompareReadException e)
            {
                stderr.WriteLine($"{Prog}: Error while reading offset {e.Offset} of {(e.InFirstImage ? names[0] : names[1])}: {e.Message}");
                // qemu-img's stdout is buffered: its size warning comes out after the error.
                if (a.Size != b.Size && !r.GetValue(strict) && !quietMode) stdout.WriteLine("Warning: Image size mismatch!");
                return 4;
            }
            catch (BlockException e)
            {
                stderr.WriteLine($"{Prog}: {e.Message}");
                return 2;
            }
            progressPrinter?.Finish();
            if (quietMode) return result.Outcome == CompareOutcome.Identical ? 0 : 1;
            // qemu-img warns about the sizes only once the common part has compared equal.
            bool commonPartDiffers = result.Outcome is CompareOutcome.ContentMismatch or CompareOutcome.StatusMismatchStrict && result.Offset < Math.Min(a.Size, b.Size);
            if (result.SizesDiffer && result.Outcome != CompareOutcome.SizeMismatchStrict && !commonPartDiffers) stdout.WriteLine("Warning: Image size mismatch!");
            switch (result.Outcome)
            {
                case CompareOutcome.Identical:
                    stdout.WriteLine("Images are identical.");
                    return 0;
                case CompareOutcome.SizeMismatchStrict:
                    stdout.WriteLine("Strict mode: Image size mismatch!");
                    return 1;
                case CompareOutcome.StatusMismatchStrict:
                    stdout.WriteLine($"Strict mode: Offset {result.Offset} block status mismatch!");
                    return 1;
                default:
                    stdout.WriteLine($"Content mismatch at offset {result.Offset}!");
                    return 1;
            }
        }, errorExit: 2));
        return cmd;
    }

    private static string Qualify(string path, string message) =>
        message.StartsWith("Could not open", StringComparison.Ordinal) ? message : $"Could not open '{path}': {message}";
}
