using System.CommandLine;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img map`: qemu-img map's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command MapCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var start = LastWins("--start-offset", "first byte to map");
        var max = LastWins("--max-length", "bytes to map");
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
                stdout.WriteLine($"{SizeText.Hex(e.Offset),-16}{SizeText.Hex(e.Length),-16}{SizeText.Hex(e.HostOffset),-16}{HostFileName(layers[e.Depth])}");
            }
            return 0;
        }));
        return cmd;
    }

    /// <summary>The file a layer's host offsets point into: a qcow2 image's external data file, or its own file.</summary>
    private static string HostFileName(BlockImage layer) => layer is Qcow2Image { DataFile: { } data } ? data.Path : layer.FileName;

    private static string Bool(bool b) => b ? "true" : "false";
}
