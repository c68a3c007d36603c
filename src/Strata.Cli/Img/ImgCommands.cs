using System.CommandLine;
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
        return img;
    }

    private static Option<string?> FormatOption(string name = "-f", string description = "image format (qcow2 or raw); probed when omitted") =>
        new(name) { Description = description };

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

    private static void CheckFormatName(string? format)
    {
        if (format is not null and not ("qcow2" or "raw"))
            throw new BlockException($"Unknown driver '{format}'");
    }

    private static string OutputMode(string value) => value switch
    {
        "human" or "json" => value,
        _ => throw new BlockException("--output must be used with human or json as argument."),
    };

    private static BlockImage OpenImage(string path, string? format, bool readOnly = true, bool openBacking = true,
        ImageLocking locking = ImageLocking.Normal)
    {
        CheckFormatName(format);
        return ImageOpener.Open(path, format, readOnly, openBacking, locking);
    }
}
