using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;

namespace Strata.Cli.Img;

/// <summary>`img measure`: qemu-img measure's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command MeasureCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var outFormat = new Option<string[]>("-O") { Description = "format of the image to measure for (default raw)" };
        var opts = new Option<string[]>("-o") { Description = "target format options (cluster_size, refcount_bits, compat, extended_l2, preallocation, backing_file)" };
        var size = LastWins("--size", "measure a new empty image of this size");
        var forceShare = ForceShareOption();
        var files = new Argument<string[]>("filename") { Arity = ArgumentArity.ZeroOrMore };
        var cmd = new Command("measure", "Measure the file size a new image needs") { format, output, outFormat, opts, size, forceShare, files };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var names = r.GetValue(files) ?? [];
            if (names.Length > 1) throw new BlockException("At most one filename argument is allowed.");
            string? filename = names.Length == 1 ? names[0] : null;
            string mode = OutputMode(r.GetValue(output)!);
            long newSize = 0;
            if (r.GetValue(size) is { } sizeText)
            {
                if (!SizeText.TryParse(sizeText, out newSize))
                    throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
                if (filename is not null) throw new BlockException("--size N cannot be used together with a filename.");
            }
            else if (filename is null) throw new BlockException("Either --size N or one filename must be specified.");
            if (filename is null && r.GetValue(format) is not null) throw new BlockException("--image-opts, -f, and -l require a filename argument.");

            string targetFormat = r.GetValue(outFormat) is { Length: > 0 } o ? o[^1] : "raw";
            if (targetFormat is not ("raw" or "qcow2")) throw new BlockException($"Unknown file format '{targetFormat}'");
            var target = MeasureTargetFrom(targetFormat, ParseOptions(r.GetValue(opts) ?? [], filename ?? ""));

            using var source = filename is null ? null : OpenImage(filename, r.GetValue(format), locking: ReadLocking(r.GetValue(forceShare)));
            var result = ImageMeasure.Measure(target, source, newSize);
            var ci = System.Globalization.CultureInfo.InvariantCulture;
            if (mode == "json")
            {
                // qemu-img prints the bitmaps member first when there is one.
                stdout.WriteLine("{");
                if (result.BitmapsSize is { } bj) stdout.WriteLine(string.Create(ci, $"    \"bitmaps\": {bj},"));
                stdout.WriteLine(string.Create(ci, $"    \"required\": {result.Required},"));
                stdout.WriteLine(string.Create(ci, $"    \"fully-allocated\": {result.FullyAllocated}"));
                stdout.WriteLine("}");
            }
            else
            {
                stdout.WriteLine(string.Create(ci, $"required size: {result.Required}"));
                stdout.WriteLine(string.Create(ci, $"fully allocated size: {result.FullyAllocated}"));
                if (result.BitmapsSize is { } bh) stdout.WriteLine(string.Create(ci, $"bitmaps size: {bh}"));
            }
            return 0;
        }));
        return cmd;
    }

    private static MeasureTarget MeasureTargetFrom(string format, List<(string Key, string Value)> options)
    {
        var target = new MeasureTarget { Format = format };
        if (format != "qcow2") return target;
        foreach (var (key, value) in options)
        {
            switch (key)
            {
                case "cluster_size":
                    if (!SizeText.TryParse(value, out long cs) || cs < 512 || cs > 2 << 20 || (cs & (cs - 1)) != 0)
                        throw new BlockException("Cluster size must be a power of two between 512 and 2048k");
                    target = target with { ClusterSize = (int)cs };
                    break;
                case "refcount_bits":
                    if (!int.TryParse(value, out int bits) || bits is < 1 or > 64 || (bits & (bits - 1)) != 0)
                        throw new BlockException("Refcount width must be a power of two and may not exceed 64 bits");
                    target = target with { RefcountBits = bits };
                    break;
                case "compat":
                    target = target with { Version3 = value is not ("0.10" or "v2") };
                    break;
                case "extended_l2":
                    target = target with { ExtendedL2 = value is "on" or "true" };
                    break;
                case "preallocation":
                    target = target with { PreallocatesData = value is "falloc" or "full" };
                    break;
                case "backing_file":
                    target = target with { HasBackingFile = true };
                    break;
            }
        }
        if (target.ExtendedL2 && target.ClusterSize < Strata.Block.Qcow2.Qcow2Image.MinExtendedL2ClusterSize)
            throw new BlockException($"Extended L2 entries are only supported with cluster sizes of at least {Strata.Block.Qcow2.Qcow2Image.MinExtendedL2ClusterSize} bytes");
        return target;
    }
}
