using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img resize`: qemu-img resize's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command ResizeCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var shrink = new Option<bool>("--shrink") { Description = "allow shrinking the image" };
        var quiet = QuietOption();
        var prealloc = new Option<string?>("--preallocation") { Description = "off, metadata (qcow2), falloc or full" };
        var file = new Argument<string>("filename");
        var size = new Argument<string>("size");
        var cmd = new Command("resize", "Change the virtual size of an image") { format, shrink, quiet, prealloc, file, size };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string text = r.GetValue(size)!;
            int sign = text.StartsWith('+') ? 1 : text.StartsWith('-') ? -1 : 0;
            if (!SizeText.TryParse(sign == 0 ? text : text[1..], out long amount))
                throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            var mode = r.GetValue(prealloc) switch
            {
                null or "off" => Preallocation.Off,
                "metadata" => Preallocation.Metadata,
                "falloc" => Preallocation.Falloc,
                "full" => Preallocation.Full,
                var p => throw new BlockException($"Invalid preallocation mode '{p}'"),
            };
            // With its backing chain, as qemu-img opens it: growing over a longer backing file must zero the new range.
            using var image = OpenImage(r.GetValue(file)!, r.GetValue(format), readOnly: false, openBacking: true, ImageLocking.Resize);
            long newSize = sign == 0 ? amount : image.Size + sign * amount;
            if (newSize < 0) throw new BlockException("New image size must be positive");
            if (newSize < image.Size && mode != Preallocation.Off)
                throw new BlockException("Preallocation can only be used for growing images");
            if (newSize < image.Size && !r.GetValue(shrink))
                throw new BlockException("Use the --shrink option to perform a shrink operation.");
            Action<long>? preallocate = mode == Preallocation.Off ? null : image switch
            {
                Qcow2Image q => from => q.Preallocate(mode, from),
                _ when mode == Preallocation.Metadata => throw new BlockException("Unsupported preallocation mode: metadata"),
                // Other formats read zeros in the new range anyway; falloc and full give it disk blocks.
                _ => from =>
                {
                    var zeros = new byte[Math.Min(newSize - from, 1L << 20)];
                    for (long at = from; at < newSize; at += zeros.Length)
                        image.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, newSize - at)));
                },
            };
            ChainOperations.Resize(image, newSize, preallocate);
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

/// <summary>qemu-img's -p output: "    (NN.NN/100%)\r" updates, then a newline. Like qemu-img, it prints 0% and 100%
/// every time they are reported, and otherwise only once progress has moved more than
/// <paramref name="minSkip"/> points since the last line printed (1 for convert and commit, 2 for rebase).</summary>
internal sealed class ProgressPrinter(TextWriter output, double minSkip = 1)
{
    private readonly object _lock = new();
    private double _lastPrinted;

    public void Report(long done, long total) => Report(total == 0 ? 100 : Math.Min(100, done * 100.0 / total));

    public void Report(double percent)
    {
        // qemu-img keeps the value as a float: the comparisons are made at that precision.
        float current = (float)percent;
        lock (_lock)
        {
            if (current > _lastPrinted + minSkip || current == 100 || current == 0)
            {
                _lastPrinted = current;
                output.Write(System.FormattableString.Invariant($"    ({current:F2}/100%)\r"));
                output.Flush();
            }
        }
    }

    /// <summary>The end of a successful run: 100% once more, then the newline.</summary>
    public void Finish()
    {
        Report(100);
        lock (_lock)
        {
            output.Write("\n");
            output.Flush();
        }
    }
}
