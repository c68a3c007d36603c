using System.CommandLine;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img amend`: qemu-img amend's options and messages (qcow2 only).</summary>
internal static partial class ImgCommands
{
    /// <summary>qcow2 creation options that QEMU cannot change on an existing image.</summary>
    private static readonly HashSet<string> CreationOnlyOptions =
        ["cluster_size", "preallocation", "compression_type", "extended_l2", "encryption", "encrypt.format"];

    private static Command AmendCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var opts = new Option<string[]>("-o") { Description = "options to change (compat, lazy_refcounts, refcount_bits, size)" };
        var quiet = QuietOption();
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var force = new Option<bool>("--force") { Description = "accepted for compatibility" };
        var file = new Argument<string[]>("filename") { Arity = ArgumentArity.ZeroOrMore };
        var cmd = new Command("amend", "Change format-specific options of an image") { format, opts, quiet, progress, force, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var options = r.GetValue(opts) ?? [];
            ImgOptionHelp.CheckLists(options);
            if (options.Length == 0) throw new UsageException("Must specify options (-o)");
            var files = r.GetValue(file) ?? [];
            if (files.FirstOrDefault(f => f.StartsWith('-') && f != "-") is { } unknown) throw new UsageException($"unrecognized option '{unknown}'");
            if (ImgOptionHelp.Requested(options) && (r.GetValue(format) is not null || files.Length == 1))
            {
                string amendFormat = r.GetValue(format) ?? ImageOpener.ProbeFormat(files[0]);
                stdout.Write(ImgOptionHelp.ForAmend(amendFormat) ?? throw new BlockException($"Format driver '{amendFormat}' does not support option amendment"));
                return 0;
            }
            // qemu-img amend reports this one without the --help hint.
            if (files.Length != 1) throw new BlockException("Expecting one image file name");
            var amend = new Qcow2AmendOptions();
            foreach (var (key, value) in ParseOptions(options, files[0]))
            {
                switch (key)
                {
                    case "compat":
                        amend = amend with
                        {
                            Version = value switch
                            {
                                "0.10" or "v2" => 2,
                                "1.1" or "v3" => 3,
                                _ => throw new BlockException($"Unknown compatibility level {value}"),
                            },
                        };
                        break;
                    case "lazy_refcounts":
                        amend = amend with
                        {
                            LazyRefcounts = value switch
                            {
                                "on" or "true" => true,
                                "off" or "false" => false,
                                _ => throw new BlockException("Parameter 'lazy_refcounts' expects 'on' or 'off'"),
                            },
                        };
                        break;
                    case "size":
                        if (!SizeText.TryParse(value, out long size)) throw new BlockException("Parameter 'size' expects a size");
                        amend = amend with { Size = size };
                        break;
                    case "data_file":
                        amend = amend with { DataFile = value };
                        break;
                    case "data_file_raw":
                        amend = amend with
                        {
                            DataFileRaw = value switch
                            {
                                "on" or "true" => true,
                                "off" or "false" => false,
                                _ => throw new BlockException("Parameter 'data_file_raw' expects 'on' or 'off'"),
                            },
                        };
                        break;
                    case "refcount_bits":
                        if (!int.TryParse(value, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int bits)
                            || bits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
                            throw new BlockException("Refcount width must be a power of two and may not exceed 64 bits");
                        amend = amend with { RefcountBits = bits };
                        break;
                    case "backing_file" or "backing_fmt":
                        throw new BlockException("Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.");
                    case var k when CreationOnlyOptions.Contains(k):
                        throw new BlockException($"Invalid parameter '{k}'\nThis option is only supported for image creation");
                    default:
                        throw new BlockException($"Invalid parameter '{key}'");
                }
            }
            using var image = OpenImage(files[0], r.GetValue(format), readOnly: false, openBacking: true);
            if (image is not Qcow2Image q) throw new BlockException($"Format driver '{image.FormatName}' does not support option amendment");
            var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout, minSkip: 1) : null;
            printer?.Report(0);
            try
            {
                q.Amend(amend, printer is null ? null : printer.Report);
            }
            catch (SnapshotException e)
            {
                // A snapshot whose zero clusters cannot be read blocks a downgrade; QEMU reports both.
                stderr.WriteLine($"{Prog}: {e.Message}");
                throw new BlockException($"Failed to turn zero into data clusters: {Strerror(e.Errno)}");
            }
            printer?.Finish();
            return 0;
        }));
        return cmd;
    }
}
