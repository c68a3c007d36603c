using System.CommandLine;
using System.CommandLine.Invocation;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Formats.Qcow2;

namespace Strata.Cli.Img;

/// <summary>Thrown for bad command-line use: printed with a hint, exit code 1.</summary>
internal sealed class UsageException(string message) : Exception(message);

/// <summary><c>strata img</c>: an offline image tool that takes qemu-img's options and prints what it prints.</summary>
internal static partial class ImgCommands
{
    public static string Prog => ToolFace.Img;

    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var img = new Command("img", "Inspect and edit disk images offline (qemu-img compatible)");
        img.Subcommands.Add(CreateCommand(stdout, stderr));
        img.Subcommands.Add(InfoCommand(stdout, stderr));
        img.Subcommands.Add(CheckCommand(stdout, stderr));
        img.Subcommands.Add(CompareCommand(stdout, stderr));
        img.Subcommands.Add(ConvertCommand(stdout, stderr));
        img.Subcommands.Add(MapCommand(stdout, stderr));
        img.Subcommands.Add(CommitCommand(stdout, stderr));
        img.Subcommands.Add(RebaseCommand(stdout, stderr));
        img.Subcommands.Add(ResizeCommand(stdout, stderr));
        img.Subcommands.Add(BitmapCommand(stdout, stderr));
        img.Subcommands.Add(MeasureCommand(stdout, stderr));
        img.Subcommands.Add(DdCommand(stdout, stderr));
        img.Subcommands.Add(BenchCommand(stdout, stderr));
        img.Subcommands.Add(SnapshotCommand(stdout, stderr));
        img.Subcommands.Add(AmendCommand(stdout, stderr));
        foreach (var sub in img.Subcommands) AddImageOptsAndObjects(sub, stderr);
        return img;
    }

    /// <summary>A command line System.CommandLine could not parse, reported in qemu-img's words (never the parser's
    /// own English): exit code 1 and qemu-img's hint, as its getopt loop does.</summary>
    public static int ReportParseErrors(ParseResult parse, TextWriter stderr)
    {
        string message = ParseErrorMessage(parse);
        stderr.WriteLine($"{Prog}: {message}");
        stderr.WriteLine($"Try '{Prog} --help' for more information");
        return 1;
    }

    private static string ParseErrorMessage(ParseResult parse)
    {
        var command = parse.CommandResult.Command;
        var unmatched = parse.UnmatchedTokens;
        // An unknown option may have been taken as an image name, so every argument token is looked at, up to "--".
        foreach (var token in parse.Tokens)
        {
            if (token.Type == System.CommandLine.Parsing.TokenType.DoubleDash) break;
            if (token.Type == System.CommandLine.Parsing.TokenType.Argument && token.Value.Length > 1 && token.Value[0] == '-'
                && !char.IsAsciiDigit(token.Value[1]))
                return $"unrecognized option '{token.Value}'";
        }
        foreach (var error in parse.Errors)
            if (error.SymbolResult is System.CommandLine.Parsing.OptionResult option)
                return $"missing argument for option '{option.IdentifierToken?.Value ?? option.Option.Name}'";
        if (command.Name == "img")
            return unmatched.Count > 0 ? $"Command not found: {unmatched[0]}" : "Not enough arguments";
        return command.Name switch
        {
            "create" => "Expecting image file name",
            "compare" => "Expecting two image file names",
            "convert" => "Must specify image file name",
            "resize" => unmatched.Count > 0 ? "Expecting image file name and size" : "Not enough arguments",
            "bitmap" => "Expecting filename and bitmap name",
            _ => "Expecting one image file name",
        };
    }

    /// <summary>Image names given as --image-opts strings in this call (key=value options, not file names).</summary>
    private static readonly AsyncLocal<HashSet<string>?> s_imageOptsNames = new();

    /// <summary>--image-opts and --object, which every qemu-img subcommand takes: the option strings among the image
    /// names (the subcommand's first argument; for convert all but the last) are remembered for
    /// <see cref="OpenImage"/>, and the objects are checked before the subcommand runs, as qemu-img does.</summary>
    private static void AddImageOptsAndObjects(Command sub, TextWriter stderr)
    {
        var imageOpts = new Option<bool>("--image-opts") { Description = "image names are option strings (driver=qcow2,file.filename=...)" };
        var objects = new Option<string[]>("--object") { Description = "define an object (secret,id=ID,data=...|file=...)" };
        sub.Options.Add(imageOpts);
        sub.Options.Add(objects);
        if (sub.Action is not SynchronousCommandLineAction inner) return;
        sub.SetAction(r => Run(stderr, () =>
        {
            var ids = new HashSet<string>(StringComparer.Ordinal);
            foreach (var definition in r.GetValue(objects) ?? []) QemuObjects.Define(definition, ids);
            s_imageOptsNames.Value = null;
            if (r.GetValue(imageOpts) && sub.Arguments.Count > 0)
            {
                var names = r.GetResult(sub.Arguments[0])?.Tokens.Select(t => t.Value).ToList() ?? [];
                if (sub.Name == "convert" && names.Count > 0) names.RemoveAt(names.Count - 1);
                s_imageOptsNames.Value = new HashSet<string>(names, StringComparer.Ordinal);
            }
            return inner.Invoke(r);
        }));
    }

    private static bool IsImageOpts(string name) => s_imageOptsNames.Value?.Contains(name) == true;

    private static Option<string?> FormatOption(string name = "-f", string description = "image format (qcow2 or raw); probed when omitted") =>
        LastWins(name, description);

    /// <summary>A one-value option that may be given again, the last one counting (qemu-img's getopt loop simply
    /// overwrites). Each occurrence still takes exactly one token.</summary>
    private static Option<string?> LastWins(string name, string description) => new(name)
    {
        Description = description,
        Arity = ArgumentArity.OneOrMore,
        AllowMultipleArgumentsPerToken = false,
        CustomParser = result => result.Tokens.Count == 0 ? null : result.Tokens[^1].Value,
    };

    private static Option<bool> QuietOption() => new("-q", "--quiet") { Description = "quiet mode" };

    private static Option<string> OutputOption() => new("--output") { Description = "human or json", DefaultValueFactory = _ => "human" };

    private static Option<bool> ForceShareOption() => new("-U", "--force-share") { Description = "open even if another process uses the image (read-only)" };

    /// <summary>qemu-img's image locks: normal ones, or none held against others with -U.</summary>
    private static ImageLocking ReadLocking(bool forceShare) => forceShare ? ImageLocking.ForceShare : ImageLocking.Normal;

    /// <summary>Runs a command body, turning errors into qemu-img style messages and exit codes.</summary>
    private static int Run(TextWriter stderr, Func<int> body, int errorExit = 1)
    {
        try
        {
            return body();
        }
        catch (UsageException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            stderr.WriteLine($"Try '{Prog} --help' for more information");
            return 1;
        }
        catch (BlockException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return errorExit;
        }
        catch (ImageFormatException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return errorExit;
        }
        catch (IOException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return errorExit;
        }
    }

    /// <summary>The format names qemu-img 7.2 knows (its "Supported formats" line): a header may name any of them as
    /// a backing format even where Strata cannot open it.</summary>
    internal static readonly HashSet<string> QemuFormatNames =
    [
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg",
        "file", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "iser", "luks", "nbd", "nfs",
        "null-aio", "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd",
        "replication", "snapshot-access", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat",
    ];

    private static string OutputMode(string value) => value switch
    {
        "human" or "json" => value,
        _ => throw new BlockException("--output must be used with human or json as argument."),
    };

    /// <summary>Opens an image named on the command line with its backing chain: a file name, json:/protocol name,
    /// or an --image-opts option string.</summary>
    private static BlockImage OpenImage(string path, string? format, bool readOnly = true, bool openBacking = true,
        ImageLocking locking = ImageLocking.Normal, bool forCheck = false)
    {
        if (format is not null and not ("qcow2" or "raw"))
            throw new BlockException($"Could not open '{path}': Unknown driver '{format}'");
        var image = IsImageOpts(path)
            ? ImageOpener.OpenSpecChain(path, ImageOptsSpec(path, locking), format, readOnly, openBacking, locking)
            : ImageOpener.Open(path, format, readOnly, openBacking, locking, forCheck);
        // Only info looks at an encrypted image without its key; every other command needs its data, so the key is
        // checked now, as qemu-img checks it when it opens an image.
        try
        {
            ImageOpener.UnlockChain(path, image);
        }
        catch
        {
            image.Dispose();
            throw;
        }
        return image;
    }

    /// <summary>An --image-opts string as options; -U and an explicit force-share=off contradict each other.</summary>
    private static BlockOptions ImageOptsSpec(string path, ImageLocking locking)
    {
        var spec = BlockSpec.FromKeyValues(path);
        if (locking == ImageLocking.ForceShare && spec["force-share"] is "off" or "false")
            throw new BlockException("--force-share/-U conflicts with image options");
        return spec;
    }

    /// <summary>Opens one layer named on the command line (or found as a backing name) without its backing chain.</summary>
    private static BlockImage OpenImageLayer(string path, string? format, bool readOnly, ImageLocking locking, bool isBacking,
        bool metadataOnly = false)
    {
        if (IsImageOpts(path)) return ImageOpener.OpenSpec(path, ImageOptsSpec(path, locking), format, readOnly, locking, isBacking);
        return ImageOpener.OpenSingle(path, format, readOnly, locking, isBacking, metadataOnly);
    }

    /// <summary>The name qemu-img shows for an image given on the command line (see <see cref="ImageOpener.DisplayName"/>).</summary>
    private static string DisplayName(string path) =>
        ImageOpener.DisplayName(path, IsImageOpts(path) ? BlockSpec.FromKeyValues(path) : null);

    /// <summary>Where a backing name points, relative to the image that names it (an --image-opts string's host file).</summary>
    private static string BackingPath(string imagePath, string backing) =>
        ImageOpener.ResolveBackingPath(IsImageOpts(imagePath) ? ImageOpener.HostPathOf(BlockSpec.FromKeyValues(imagePath)) ?? "" : imagePath, backing);
}
