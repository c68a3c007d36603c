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
internal static class ImgCommands
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

    // ------------------------------------------------------------------ create

    private static Command CreateCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var backing = new Option<string?>("-b") { Description = "backing file" };
        var backingFormat = new Option<string?>("-F") { Description = "backing file format" };
        var opts = new Option<string[]>("-o") { Description = "format options (cluster_size=…,compression_type=…,refcount_bits=…)", AllowMultipleArgumentsPerToken = false };
        var quiet = QuietOption();
        var unsafeBacking = new Option<bool>("-u") { Description = "do not open the backing file" };
        var file = new Argument<string>("filename");
        var size = new Argument<string?>("size") { Arity = ArgumentArity.ZeroOrOne };
        var cmd = new Command("create", "Create a new image") { format, backing, backingFormat, opts, quiet, unsafeBacking, file, size };
        cmd.SetAction(r => Run(stderr, () => Create(stdout, r.GetValue(file)!, r.GetValue(format) ?? "raw", r.GetValue(backing), r.GetValue(backingFormat),
            r.GetValue(opts) ?? [], r.GetValue(size), r.GetValue(quiet), r.GetValue(unsafeBacking))));
        return cmd;
    }

    internal static int Create(TextWriter stdout, string file, string format, string? backing, string? backingFormat, string[] options, string? sizeText, bool quiet, bool unsafeBacking)
    {
        if (format is not ("qcow2" or "raw")) throw new BlockException($"{file}: Unknown file format '{format}'");
        var kv = ParseOptions(options, file);
        int clusterSize = 65536;
        var compression = Qcow2CompressionType.Deflate;
        int refcountBits = 16;
        long? size = null;
        if (sizeText is not null)
        {
            if (!SizeText.TryParse(sizeText, out long s))
                throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            size = s;
        }
        foreach (var (key, value) in kv)
        {
            switch (key)
            {
                case "cluster_size" when format == "qcow2":
                    if (!SizeText.TryParse(value, out long cs) || cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) != 0)
                        throw new BlockException($"{file}: Cluster size must be a power of two between 512 and 2048k");
                    clusterSize = (int)cs;
                    break;
                case "compression_type" when format == "qcow2":
                    compression = value switch
                    {
                        "zlib" => Qcow2CompressionType.Deflate,
                        "zstd" => Qcow2CompressionType.Zstd,
                        _ => throw new BlockException($"{file}: Parameter 'compression_type' does not accept value '{value}'"),
                    };
                    break;
                case "refcount_bits" when format == "qcow2":
                    if (!int.TryParse(value, out refcountBits) || refcountBits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
                        throw new BlockException($"{file}: Refcount width must be a power of two and may not exceed 64 bits");
                    break;
                case "compat" when format == "qcow2":
                    if (value is not ("1.1" or "v3"))
                        throw new BlockException($"{file}: Creating qcow2 version 2 (compat={value}) images is not supported");
                    break;
                case "lazy_refcounts" when format == "qcow2":
                case "extended_l2" when format == "qcow2":
                    if (value is not ("off" or "false"))
                        throw new BlockException($"{file}: {key}={value} is not supported");
                    break;
                case "backing_file" when format == "qcow2":
                    backing = value;
                    break;
                case "backing_fmt" when format == "qcow2":
                    backingFormat = value;
                    break;
                case "size":
                    if (!SizeText.TryParse(value, out long os)) throw new BlockException($"{file}: Parameter 'size' expects a size");
                    size = os;
                    break;
                default:
                    throw new BlockException($"{file}: Invalid parameter '{key}'");
            }
        }
        if (backing is not null && format != "qcow2")
            throw new BlockException($"{file}: Backing file not supported for file format '{format}'");
        if (backing is not null)
        {
            if (backingFormat is null)
            {
                string detected = "raw";
                try { detected = ImageOpener.ProbeFormat(ImageOpener.ResolveBackingPath(file, backing)); } catch (BlockException) { }
                throw new BlockException($"{file}: Backing file specified without backing format\nDetected format of {detected}.");
            }
            CheckFormatName(backingFormat);
            if (!unsafeBacking || size is null)
            {
                try
                {
                    using var b = ImageOpener.Open(ImageOpener.ResolveBackingPath(file, backing), backingFormat);
                    size ??= b.Size;
                }
                catch (BlockException e)
                {
                    throw new BlockException($"{file}: {e.Message.Replace("Could not open backing file: ", "")}\nCould not open backing image.");
                }
            }
        }
        if (size is null) throw new BlockException($"{file}: Image creation needs a size parameter");
        if (!quiet)
        {
            string line = format == "raw"
                ? $"Formatting '{file}', fmt=raw size={size}"
                : $"Formatting '{file}', fmt=qcow2 cluster_size={clusterSize} extended_l2=off compression_type={(compression == Qcow2CompressionType.Zstd ? "zstd" : "zlib")} size={size}" +
                  (backing is null ? "" : $" backing_file={backing} backing_fmt={backingFormat}") + $" lazy_refcounts=off refcount_bits={refcountBits}";
            stdout.WriteLine(line);
        }
        if (format == "raw")
        {
            try
            {
                using var r = RawImage.Create(file, size.Value);
                r.Flush();
            }
            catch (BlockException e)
            {
                throw new BlockException($"{file}: {e.Message}");
            }
        }
        else
        {
            try
            {
                using var q = Qcow2Image.Create(file, new Qcow2CreateOptions
                {
                    Size = size.Value,
                    ClusterSize = clusterSize,
                    CompressionType = compression,
                    RefcountBits = refcountBits,
                    BackingFile = backing,
                    BackingFormat = backingFormat,
                });
            }
            catch (BlockException e)
            {
                throw new BlockException($"{file}: {e.Message}");
            }
        }
        return 0;
    }

    private static List<(string Key, string Value)> ParseOptions(IEnumerable<string> options, string file)
    {
        var list = new List<(string, string)>();
        foreach (var group in options)
        {
            foreach (var part in group.Split(',', StringSplitOptions.RemoveEmptyEntries))
            {
                int eq = part.IndexOf('=');
                if (eq <= 0) throw new BlockException($"{file}: Invalid parameter '{part}'");
                list.Add((part[..eq], part[(eq + 1)..]));
            }
        }
        return list;
    }

    // ------------------------------------------------------------------ info

    private static Command InfoCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var chain = new Option<bool>("--backing-chain") { Description = "show the whole backing chain" };
        var file = new Argument<string>("filename");
        var forceShare = ForceShareOption();
        var cmd = new Command("info", "Show information about an image") { format, output, chain, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string mode = OutputMode(r.GetValue(output)!);
            CheckFormatName(r.GetValue(format));
            // Like qemu-img, open each layer alone: info needs no backing file, and --backing-chain walks the names.
            var layers = new List<BlockImage>();
            var names = new List<string>();
            using var disposer = new LayerList(layers);
            string path = r.GetValue(file)!;
            string? layerFormat = r.GetValue(format);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            while (true)
            {
                seen.Add(Path.GetFullPath(path));
                var layer = ImageOpener.OpenSingle(path, layerFormat, readOnly: true, ReadLocking(r.GetValue(forceShare)), isBacking: layers.Count > 0);
                layers.Add(layer);
                names.Add(path);
                if (!r.GetValue(chain) || layer.BackingFileName is not { } backing) break;
                string next = ImageOpener.ResolveBackingPath(path, backing);
                if (seen.Contains(Path.GetFullPath(next))) throw new BlockException($"Backing file '{next}' creates an infinite loop.");
                path = next;
                layerFormat = layer.BackingFormat;
            }
            if (mode == "json")
            {
                var dicts = layers.Select((l, i) => InfoJson(l, names[i])).ToList();
                stdout.WriteLine(QemuJson.Pretty(r.GetValue(chain) ? dicts : dicts[0]));
            }
            else
            {
                for (int i = 0; i < layers.Count; i++)
                {
                    if (i > 0) stdout.WriteLine();
                    stdout.Write(InfoHuman(layers[i], names[i]));
                }
            }
            return 0;
        }));
        return cmd;
    }

    private static string DisplayName(BlockImage image, string? givenName) => givenName ?? image.FileName;

    internal static QDict InfoJson(BlockImage image, string? givenName) => ImageInfo.Build(image, DisplayName(image, givenName));

    private static long ActualSize(BlockImage image) => ImageInfo.ActualSize(image);

    internal static string InfoHuman(BlockImage image, string? givenName)
    {
        var sb = new System.Text.StringBuilder();
        string name = DisplayName(image, givenName);
        sb.Append($"image: {name}\n");
        sb.Append($"file format: {image.FormatName}\n");
        sb.Append($"virtual size: {SizeText.Human(image.Size)} ({image.Size} bytes)\n");
        sb.Append($"disk size: {SizeText.Human(ActualSize(image))}\n");
        if (image.ClusterSize > 0) sb.Append($"cluster_size: {image.ClusterSize}\n");
        if (image.BackingFileName is { } bf)
        {
            string full = ImageOpener.ResolveBackingPath(name, bf);
            sb.Append(full == bf ? $"backing file: {bf}\n" : $"backing file: {bf} (actual path: {full})\n");
            if (image.BackingFormat is { } bfmt) sb.Append($"backing file format: {bfmt}\n");
        }
        if (image is Qcow2Image q)
        {
            var h = q.Header;
            if ((h.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) != 0) sb.Append("cleanly shut down: no\n");
            sb.Append("Format specific information:\n");
            var specific = (QDict)InfoJson(image, givenName)["format-specific"]!;
            QemuHumanDump.Write(sb, (QDict)specific["data"]!, 1);
        }
        return sb.ToString();
    }

    // ------------------------------------------------------------------ check

    private static Command CheckCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var repair = new Option<string?>("-r") { Description = "repair: leaks or all" };
        var quiet = QuietOption();
        var file = new Argument<string>("filename");
        var forceShare = ForceShareOption();
        var cmd = new Command("check", "Check an image for consistency") { format, output, repair, quiet, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string mode = OutputMode(r.GetValue(output)!);
            var repairMode = r.GetValue(repair) switch
            {
                null => RepairMode.None,
                "leaks" => RepairMode.Leaks,
                "all" => RepairMode.All,
                var other => throw new UsageException($"Unknown option value for -r (expecting 'leaks' or 'all'): {other}"),
            };
            string path = r.GetValue(file)!;
            using var image = OpenImage(path, r.GetValue(format), readOnly: repairMode == RepairMode.None, openBacking: true,
                repairMode == RepairMode.None ? ReadLocking(r.GetValue(forceShare)) : ImageLocking.Normal);
            if (image is not Qcow2Image q)
            {
                stderr.WriteLine($"{Prog}: This image format does not support checks");
                return 63;
            }
            CheckReport report;
            CheckReport? repaired = null;
            try
            {
                report = q.Check(repairMode);
                if (repairMode != RepairMode.None && (report.LeaksFixed > 0 || report.CorruptionsFixed > 0))
                {
                    repaired = report;
                    report = q.Check(RepairMode.None);
                }
            }
            catch (CheckFailedException e)
            {
                foreach (var m in e.Report.Messages) stderr.WriteLine(m);
                stderr.WriteLine($"{Prog}: {e.Message}");
                return 1;
            }
            foreach (var m in (repaired?.Messages ?? []).Concat(report.Messages)) stderr.WriteLine(m);
            bool quietMode = r.GetValue(quiet);
            if (mode == "json")
            {
                stdout.WriteLine(QemuJson.Pretty(CheckJson(path, report, repaired)));
            }
            else if (!quietMode)
            {
                stdout.Write(CheckHuman(report, repaired));
            }
            if (report.CheckErrors > 0) return 1;
            if (report.Corruptions > 0) return 2;
            if (report.Leaks > 0) return 3;
            return 0;
        }));
        return cmd;
    }

    internal static QDict CheckJson(string file, CheckReport report, CheckReport? repaired)
    {
        var d = new QDict();
        d.Add("filename", file);
        d.Add("format", "qcow2");
        d.Add("check-errors", report.CheckErrors);
        d.Add("image-end-offset", report.ImageEndOffset);
        if (report.Corruptions > 0) d.Add("corruptions", report.Corruptions);
        if (report.Leaks > 0) d.Add("leaks", report.Leaks);
        if (repaired is not null && repaired.CorruptionsFixed > 0) d.Add("corruptions-fixed", repaired.CorruptionsFixed);
        if (repaired is not null && repaired.LeaksFixed > 0) d.Add("leaks-fixed", repaired.LeaksFixed);
        d.Add("total-clusters", report.TotalClusters);
        if (report.AllocatedClusters > 0) d.Add("allocated-clusters", report.AllocatedClusters);
        if (report.FragmentedClusters > 0) d.Add("fragmented-clusters", report.FragmentedClusters);
        if (report.CompressedClusters > 0) d.Add("compressed-clusters", report.CompressedClusters);
        return d;
    }

    internal static string CheckHuman(CheckReport report, CheckReport? repaired)
    {
        var sb = new System.Text.StringBuilder();
        if (repaired is not null)
        {
            sb.Append("The following inconsistencies were found and repaired:\n\n");
            sb.Append($"    {repaired.LeaksFixed} leaked clusters\n");
            sb.Append($"    {repaired.CorruptionsFixed} corruptions\n\n");
            sb.Append("Double checking the fixed image now...\n");
        }
        if (report.Corruptions == 0 && report.Leaks == 0 && report.CheckErrors == 0)
            sb.Append("No errors were found on the image.\n");
        if (report.Corruptions > 0)
            sb.Append($"\n{report.Corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n");
        if (report.Leaks > 0)
            sb.Append($"\n{report.Leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n");
        if (report.CheckErrors > 0)
            sb.Append($"\n{report.CheckErrors} internal errors have occurred during the check.\n");
        if (report.TotalClusters > 0 && report.AllocatedClusters > 0)
        {
            double t = report.TotalClusters;
            sb.Append(System.FormattableString.Invariant(
                $"{report.AllocatedClusters}/{report.TotalClusters} = {report.AllocatedClusters * 100.0 / t:F2}% allocated, {(report.AllocatedClusters == 0 ? 0 : report.FragmentedClusters * 100.0 / report.AllocatedClusters):F2}% fragmented, {(report.AllocatedClusters == 0 ? 0 : report.CompressedClusters * 100.0 / report.AllocatedClusters):F2}% compressed clusters\n"));
        }
        if (report.ImageEndOffset > 0) sb.Append($"Image end offset: {report.ImageEndOffset}\n");
        return sb.ToString();
    }

    // ------------------------------------------------------------------ compare

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
            var progressPrinter = r.GetValue(progress) && !quietMode ? new ProgressPrinter(stdout) : null;
            CompareResult result;
            try
            {
                result = ImageComparer.Compare(a, b, r.GetValue(strict), progressPrinter is null ? null : progressPrinter.Report);
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

    // ------------------------------------------------------------------ convert

    private static Command ConvertCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var outFormat = new Option<string?>("-O") { Description = "output format (default raw)" };
        var compress = new Option<bool>("-c") { Description = "compress the target (qcow2)" };
        var backing = new Option<string?>("-B") { Description = "backing file of the target" };
        var backingFormat = new Option<string?>("-F") { Description = "format of the target's backing file" };
        var opts = new Option<string[]>("-o") { Description = "target format options" };
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var quiet = QuietOption();
        var noCreate = new Option<bool>("-n") { Description = "do not create the target (it must exist)" };
        var cache = new Option<string?>("-t") { Description = "target cache mode: unsafe (default), writeback, none" };
        var srcCache = new Option<string?>("-T") { Description = "source cache mode (accepted)" };
        var outOfOrder = new Option<bool>("-W") { Description = "out-of-order writes (always on)" };
        var coroutines = new Option<int?>("-m") { Description = "parallel workers (1..16)" };
        var files = new Argument<string[]>("filenames") { Arity = ArgumentArity.ZeroOrMore };
        var forceShare = ForceShareOption();
        var cmd = new Command("convert", "Convert or copy an image")
            { format, outFormat, compress, backing, backingFormat, opts, progress, quiet, noCreate, cache, srcCache, outOfOrder, coroutines, forceShare, files };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var names = r.GetValue(files) ?? [];
            if (names.Length < 2) throw new UsageException("Expecting image file name");
            string target = names[^1];
            string outFmt = r.GetValue(outFormat) ?? "raw";
            if (outFmt is not ("raw" or "qcow2")) throw new BlockException($"Unknown file format '{outFmt}'");
            bool compressed = r.GetValue(compress);
            if (compressed && outFmt != "qcow2") throw new BlockException("Compression not supported for this file format");
            int workers = r.GetValue(coroutines) ?? 8;
            if (workers is < 1 or > 16) throw new BlockException("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");

            var sources = new List<BlockImage>();
            try
            {
                foreach (var s in names[..^1])
                {
                    // The sources must not change while they are copied (qemu-img keeps writers off even a raw one).
                    try { sources.Add(OpenImage(s, r.GetValue(format), locking: r.GetValue(forceShare) ? ImageLocking.ForceShare : ImageLocking.Stable)); }
                    catch (BlockException e) { throw new BlockException(Qualify(s, e.Message)); }
                }
                long total = sources.Sum(s => s.Size);
                string? targetBacking = r.GetValue(backing);
                string? targetBackingFormat = r.GetValue(backingFormat);
                var kv = ParseOptions(r.GetValue(opts) ?? [], target);
                foreach (var (k, v) in kv)
                {
                    if (k == "backing_file") targetBacking = v;
                    else if (k == "backing_fmt") targetBackingFormat = v;
                }
                if (targetBacking is not null && targetBackingFormat is null)
                    targetBackingFormat = ImageOpener.ProbeFormat(ImageOpener.ResolveBackingPath(target, targetBacking));
                BlockImage dst;
                bool fresh = !r.GetValue(noCreate);
                if (fresh)
                {
                    var createOpts = kv.Where(p => p.Key is not ("backing_file" or "backing_fmt")).Select(p => $"{p.Key}={p.Value}").ToArray();
                    try
                    {
                        Create(TextWriter.Null, target, outFmt, targetBacking, targetBackingFormat, createOpts, total.ToString(System.Globalization.CultureInfo.InvariantCulture),
                            quiet: true, unsafeBacking: true);
                    }
                    catch (BlockException e) when (e.Message.StartsWith(target + ": ", StringComparison.Ordinal))
                    {
                        throw new BlockException($"{target}: error while converting {outFmt}: {e.Message[(target.Length + 2)..]}");
                    }
                }
                dst = OpenImage(target, fresh ? outFmt : r.GetValue(outFormat), readOnly: false, openBacking: targetBacking is not null);
                using var _dst = dst;
                string cacheMode = r.GetValue(cache) ?? "unsafe";
                if (cacheMode == "unsafe")
                {
                    if (dst is Qcow2Image dq) dq.File.FlushEnabled = false;
                    if (dst is RawImage dr) dr.File.FlushEnabled = false;
                }
                var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout) : null;
                ImageConverter.Convert(sources, dst, new ConvertOptions
                {
                    Compress = compressed,
                    TargetHasBacking = targetBacking is not null,
                    TargetIsZeroed = fresh,
                    Workers = Math.Min(workers, Math.Max(4, 2 * Environment.ProcessorCount)),
                    Progress = printer is null ? null : printer.Report,
                });
                printer?.Finish();
            }
            finally
            {
                foreach (var s in sources) s.Dispose();
            }
            return 0;
        }));
        return cmd;
    }

    // ------------------------------------------------------------------ map

    private static Command MapCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var start = new Option<string?>("--start-offset") { Description = "first byte to map" };
        var max = new Option<string?>("--max-length") { Description = "bytes to map" };
        var files = new Argument<string[]>("filename") { Arity = ArgumentArity.ZeroOrMore };
        var forceShare = ForceShareOption();
        var cmd = new Command("map", "Show where the image's data lives") { format, output, start, max, forceShare, files };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var names = r.GetValue(files) ?? [];
            if (names.Length != 1) throw new UsageException("Expecting one image file name");
            string mode = OutputMode(r.GetValue(output)!);
            using var image = OpenImage(names[0], r.GetValue(format), locking: ReadLocking(r.GetValue(forceShare)));
            long from = 0, length = image.Size;
            if (r.GetValue(start) is { } s && !SizeText.TryParse(s, out from)) throw new BlockException("Invalid start offset specified! You may use k, M, G, T, P or E suffixes for");
            if (r.GetValue(max) is { } m && !SizeText.TryParse(m, out length)) throw new BlockException("Invalid length specified! You may use k, M, G, T, P or E suffixes for");
            from = Math.Min(from, image.Size);
            length = Math.Min(length, image.Size - from);
            var layers = ImageOpener.Layers(image);
            var extents = ChainStatus.Map(image, from, length);
            if (mode == "json")
            {
                bool first = true;
                var sb = new System.Text.StringBuilder();
                foreach (var e in extents)
                {
                    sb.Append(first ? "[" : ",\n");
                    first = false;
                    sb.Append($"{{ \"start\": {e.Offset}, \"length\": {e.Length}, \"depth\": {e.Depth}, \"present\": {Bool(e.Present)}, \"zero\": {Bool(e.Zero)}, \"data\": {Bool(e.Data)}");
                    if (e.HostOffset >= 0) sb.Append($", \"offset\": {e.HostOffset}");
                    sb.Append('}');
                }
                sb.Append(first ? "[]" : "]");
                stdout.WriteLine(sb.ToString());
                return 0;
            }
            stdout.WriteLine("Offset          Length          Mapped to       File");
            foreach (var e in extents)
            {
                if (!e.Data || e.Zero) continue;
                if (e.HostOffset < 0)
                {
                    stdout.Flush();
                    stderr.WriteLine($"{Prog}: File contains external, encrypted or compressed clusters.");
                    return 1;
                }
                stdout.WriteLine($"{SizeText.Hex(e.Offset),-16}{SizeText.Hex(e.Length),-16}{SizeText.Hex(e.HostOffset),-16}{layers[e.Depth].FileName}");
            }
            return 0;
        }));
        return cmd;
    }

    private static string Bool(bool b) => b ? "true" : "false";

    // ------------------------------------------------------------------ commit

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

    // ------------------------------------------------------------------ rebase

    private static Command RebaseCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var backing = new Option<string?>("-b") { Description = "new backing file ('' for none)" };
        var backingFormat = new Option<string?>("-F") { Description = "new backing file format" };
        var unsafeMode = new Option<bool>("-u") { Description = "only change the header (unsafe)" };
        var quiet = QuietOption();
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var cache = new Option<string?>("-t") { Description = "cache mode (accepted)" };
        var file = new Argument<string>("filename");
        var cmd = new Command("rebase", "Change the backing file of an image") { format, backing, backingFormat, unsafeMode, quiet, progress, cache, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string path = r.GetValue(file)!;
            string? newBacking = r.GetValue(backing);
            if (newBacking is null) throw new UsageException("Must specify backing file (-b) or use '-b \"\"' for no backing file");
            if (newBacking.Length == 0) newBacking = null;
            string? newFormat = r.GetValue(backingFormat);
            if (newBacking is not null && newFormat is null)
            {
                try { newFormat = ImageOpener.ProbeFormat(ImageOpener.ResolveBackingPath(path, newBacking)); }
                catch (BlockException) when (r.GetValue(unsafeMode)) { newFormat = null; }
            }
            CheckFormatName(newFormat);
            if (r.GetValue(unsafeMode))
            {
                using var img = OpenImage(path, r.GetValue(format), readOnly: false, openBacking: false);
                img.SetBackingFile(newBacking, newFormat);
                return 0;
            }
            using var image = OpenImage(path, r.GetValue(format), readOnly: false, openBacking: true);
            BlockImage? newChain = null;
            try
            {
                if (newBacking is not null)
                {
                    try { newChain = ImageOpener.Open(ImageOpener.ResolveBackingPath(path, newBacking), newFormat, locking: ImageLocking.Normal); }
                    catch (BlockException e) { throw new BlockException($"Could not open new backing file '{newBacking}': {e.Message}"); }
                }
                var printer = r.GetValue(progress) && !r.GetValue(quiet) ? new ProgressPrinter(stdout) : null;
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

    // ------------------------------------------------------------------ bitmap

    private static Command BitmapCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var add = new Option<bool>("--add") { Description = "create the bitmap (enabled unless --disable)" };
        var remove = new Option<bool>("--remove") { Description = "delete the bitmap" };
        var clear = new Option<bool>("--clear") { Description = "clear every bit" };
        var enable = new Option<bool>("--enable") { Description = "start recording writes" };
        var disable = new Option<bool>("--disable") { Description = "stop recording writes" };
        var merge = new Option<string[]>("--merge") { Description = "merge SOURCE bitmap into BITMAP" };
        var granularity = new Option<string?>("-g", "--granularity") { Description = "granularity for --add" };
        var sourceFile = new Option<string?>("-b", "--source-file") { Description = "image holding the --merge source" };
        var sourceFormat = new Option<string?>("-F", "--source-format") { Description = "format of the -b image" };
        var file = new Argument<string>("filename");
        var name = new Argument<string>("bitmap");
        var cmd = new Command("bitmap", "Add, remove, clear, enable, disable or merge persistent dirty bitmaps")
            { format, add, remove, clear, enable, disable, merge, granularity, sourceFile, sourceFormat, file, name };
        cmd.SetAction(r => Run(stderr, () =>
        {
            // Operations run in command-line order, as qemu-img runs them.
            var ops = new List<(string Op, string? Arg)>();
            var tokens = r.Tokens.Select(t => t.Value).ToList();
            for (int i = 0; i < tokens.Count; i++)
            {
                switch (tokens[i])
                {
                    case "--add": ops.Add(("add", null)); break;
                    case "--remove": ops.Add(("remove", null)); break;
                    case "--clear": ops.Add(("clear", null)); break;
                    case "--enable": ops.Add(("enable", null)); break;
                    case "--disable": ops.Add(("disable", null)); break;
                    case "--merge" when i + 1 < tokens.Count: ops.Add(("merge", tokens[++i])); break;
                }
            }
            bool addDisabled = ops.Any(o => o.Op == "add") && ops.Any(o => o.Op == "disable");
            if (addDisabled) ops.RemoveAll(o => o.Op == "disable");
            if (ops.Count == 0) throw new UsageException("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
            long? g = null;
            if (r.GetValue(granularity) is { } gText)
            {
                if (!ops.Any(o => o.Op == "add")) throw new UsageException("granularity only supported with --add");
                if (!SizeText.TryParse(gText, out long gv)) throw new BlockException("Invalid granularity specified");
                g = gv;
            }
            if (r.GetValue(sourceFile) is not null && !ops.Any(o => o.Op == "merge")) throw new UsageException("-b only supported with --merge");
            string bitmapName = r.GetValue(name)!;
            using var image = OpenImage(r.GetValue(file)!, r.GetValue(format), readOnly: false, openBacking: false);
            if (image is not Qcow2Image) throw new BlockException($"Format '{image.FormatName}' does not support persistent bitmaps");
            foreach (var (op, arg) in ops)
            {
                try
                {
                    switch (op)
                    {
                        case "add": image.Bitmaps.Add(bitmapName, g, persistent: true, disabled: addDisabled); break;
                        case "remove": image.Bitmaps.Remove(bitmapName); break;
                        case "clear": image.Bitmaps.Clear(bitmapName); break;
                        case "enable": image.Bitmaps.Enable(bitmapName); break;
                        case "disable": image.Bitmaps.Disable(bitmapName); break;
                        case "merge":
                            if (r.GetValue(sourceFile) is { } src)
                            {
                                using var other = OpenImage(src, r.GetValue(sourceFormat), readOnly: true, openBacking: false);
                                image.Bitmaps.Merge(bitmapName, [other.Bitmaps.Get(arg!)]);
                            }
                            else
                            {
                                image.Bitmaps.Merge(bitmapName, [image.Bitmaps.Get(arg!)]);
                            }
                            break;
                    }
                }
                catch (BlockException e)
                {
                    throw new BlockException($"Operation {op} on bitmap {bitmapName} failed: {e.Message}");
                }
            }
            return 0;
        }));
        return cmd;
    }

    // ------------------------------------------------------------------ resize

    private static Command ResizeCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var shrink = new Option<bool>("--shrink") { Description = "allow shrinking the image" };
        var quiet = QuietOption();
        var prealloc = new Option<string?>("--preallocation") { Description = "off only" };
        var file = new Argument<string>("filename");
        var size = new Argument<string>("size");
        var cmd = new Command("resize", "Change the virtual size of an image") { format, shrink, quiet, prealloc, file, size };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string text = r.GetValue(size)!;
            int sign = text.StartsWith('+') ? 1 : text.StartsWith('-') ? -1 : 0;
            if (!SizeText.TryParse(sign == 0 ? text : text[1..], out long amount))
                throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            if (r.GetValue(prealloc) is { } p && p != "off") throw new BlockException($"Preallocation mode '{p}' is not supported");
            using var image = OpenImage(r.GetValue(file)!, r.GetValue(format), readOnly: false, openBacking: false, ImageLocking.Resize);
            long newSize = sign == 0 ? amount : image.Size + sign * amount;
            if (newSize < 0) throw new BlockException("New image size must be positive");
            if (newSize < image.Size && !r.GetValue(shrink))
                throw new BlockException("Use the --shrink option to perform a shrink operation.");
            image.Resize(newSize);
            image.Flush();
            if (!r.GetValue(quiet)) stdout.WriteLine("Image resized.");
            return 0;
        }));
        return cmd;
    }
}

/// <summary>Disposes the layers opened one by one.</summary>
internal sealed class LayerList(List<BlockImage> layers) : IDisposable
{
    public void Dispose()
    {
        foreach (var l in layers) l.Dispose();
    }
}

/// <summary>qemu-img's -p output: "    (NN.NN/100%)\r" updates, then a newline.</summary>
internal sealed class ProgressPrinter(TextWriter output)
{
    private readonly object _lock = new();
    private double _last = -1;

    public void Report(long done, long total)
    {
        double pct = total == 0 ? 100 : done * 100.0 / total;
        lock (_lock)
        {
            if (_last >= 0 && pct - _last < 1 && pct < 100) return;
            _last = pct;
            output.Write(System.FormattableString.Invariant($"    ({pct:F2}/100%)\r"));
            output.Flush();
        }
    }

    public void Finish()
    {
        lock (_lock)
        {
            if (_last < 100) output.Write("    (100.00/100%)\r");
            output.Write("\n");
            output.Flush();
        }
    }
}
