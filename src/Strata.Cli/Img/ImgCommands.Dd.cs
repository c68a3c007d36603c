using System.CommandLine;
using Strata.Block;

namespace Strata.Cli.Img;

/// <summary>`img dd`: qemu-img dd's operands (if=, of=, bs=, count=, skip=) and behaviour.</summary>
internal static partial class ImgCommands
{
    private static Command DdCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var outFormat = LastWins("-O", "output format (default raw)");
        var forceShare = ForceShareOption();
        var operands = new Argument<string[]>("operands") { Arity = ArgumentArity.ZeroOrMore, Description = "if=FILE of=FILE [bs=N] [count=N] [skip=N]" };
        var cmd = new Command("dd", "Copy from an image into a new image, dd style") { format, outFormat, forceShare, operands };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string? input = null, output = null;
            long blockSize = 512, count = -1, skip = -1;
            foreach (var operand in r.GetValue(operands) ?? [])
            {
                int eq = operand.IndexOf('=');
                string key = eq < 0 ? operand : operand[..eq], value = eq < 0 ? "" : operand[(eq + 1)..];
                switch (key)
                {
                    case "if": input = value; break;
                    case "of": output = value; break;
                    case "bs":
                        blockSize = DdNumber("bs", value);
                        if (blockSize is < 1 or > int.MaxValue) throw new BlockException("Invalid bs specified. Must be between 1 and 2147483647.");
                        break;
                    case "count": count = DdNumber("count", value); break;
                    case "skip": skip = DdNumber("skip", value); break;
                    default: throw new BlockException($"unrecognized operand {key}");
                }
            }
            if (input is null || output is null) throw new BlockException("Must specify both input and output files");
            string outFmt = r.GetValue(outFormat) ?? "raw";
            if (outFmt is not ("raw" or "qcow2")) throw new BlockException("Unknown file format");

            using var source = OpenImage(input, r.GetValue(format), locking: ReadLocking(r.GetValue(forceShare)));
            // As qemu-img: count limits the input from its start, then the skipped blocks come off that.
            long size = source.Size;
            if (count >= 0 && count <= long.MaxValue / blockSize && size > count * blockSize) size = count * blockSize;
            bool skipPastEnd = skip >= 0 && (skip > long.MaxValue / blockSize || size < skip * blockSize);
            long start = skip < 0 ? 0 : skipPastEnd ? size : skip * blockSize;
            try
            {
                Create(TextWriter.Null, output, outFmt, null, null, [], (size - start).ToString(System.Globalization.CultureInfo.InvariantCulture), quiet: true, unsafeBacking: true);
            }
            catch (BlockException e) when (e.Message.StartsWith(output + ": ", StringComparison.Ordinal))
            {
                throw new BlockException($"{output}: error while creating output image: {e.Message[(output.Length + 2)..]}");
            }
            using var target = OpenImage(output, outFmt, readOnly: false, openBacking: false);
            // qemu-img goes on after this message and leaves an empty image, as dd(1) does.
            if (skipPastEnd) stderr.WriteLine($"{Prog}: {input}: cannot skip to specified offset");
            var buffer = new byte[blockSize];
            for (long inPos = start, outPos = 0; inPos < size;)
            {
                int bytes = (int)Math.Min(blockSize, size - inPos);
                var span = buffer.AsSpan(0, bytes);
                source.Read(inPos, span);
                target.Write(outPos, span);
                inPos += bytes;
                outPos += bytes;
            }
            target.Flush();
            return 0;
        }));
        return cmd;
    }

    private static long DdNumber(string name, string text) =>
        SizeText.TryParse(text, out long value) ? value
            : throw new BlockException($"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n{Prog}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
}
