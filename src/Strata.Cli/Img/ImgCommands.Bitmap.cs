using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img bitmap`: qemu-img bitmap's options and output.</summary>
internal static partial class ImgCommands
{
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
        var rebuild = new Option<string?>("--rebuild")
        {
            Description = "(Strata) recreate bitmap NAME from what differs between the image and the --from point",
        };
        var from = new Option<string?>("--from") { Description = "(Strata) the backup point --rebuild compares with (read with its backing chain)" };
        var file = new Argument<string>("filename");
        // Optional only for --rebuild, which names the bitmap itself.
        var name = new Argument<string?>("bitmap") { Arity = ArgumentArity.ZeroOrOne };
        var cmd = new Command("bitmap", "Add, remove, clear, enable, disable, merge or rebuild persistent dirty bitmaps")
            { format, add, remove, clear, enable, disable, merge, granularity, sourceFile, sourceFormat, rebuild, from, file, name };
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
            if (r.GetValue(rebuild) is { } rebuildName)
            {
                if (ops.Count > 0) throw new UsageException("--rebuild cannot be combined with other bitmap operations");
                if (r.GetValue(name) is { } other && other != rebuildName) throw new UsageException("--rebuild names the bitmap: give no other bitmap name");
                return Rebuild(r.GetValue(file)!, r.GetValue(format), rebuildName,
                    r.GetValue(from) ?? throw new UsageException("--rebuild needs --from POINT, the backup point to compare with"), r.GetValue(granularity));
            }
            if (r.GetValue(from) is not null) throw new UsageException("--from only supported with --rebuild");
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
            string bitmapName = r.GetValue(name) ?? throw new UsageException("Expecting filename and bitmap name");
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

    /// <summary>--rebuild: the bitmap is created anew (an inconsistent or stale one is replaced, keeping its
    /// granularity unless -g says otherwise) and marks every granule where the image reads differently from the
    /// point: what an incremental from that point has to copy.</summary>
    private static int Rebuild(string path, string? format, string bitmapName, string pointPath, string? granularityText)
    {
        long? g = null;
        if (granularityText is not null)
        {
            if (!SizeText.TryParse(granularityText, out long gv)) throw new BlockException("Invalid granularity specified");
            g = gv;
        }
        using var image = OpenImage(path, format, readOnly: false, openBacking: true);
        if (image is not Qcow2Image) throw new BlockException($"Format '{image.FormatName}' does not support persistent bitmaps");
        using var point = OpenImage(pointPath, null, readOnly: true, openBacking: true);
        try
        {
            if (image.Bitmaps.Find(bitmapName) is { } old)
            {
                g ??= old.Granularity;
                image.Bitmaps.Remove(bitmapName);
            }
            var bitmap = image.Bitmaps.Add(bitmapName, g, persistent: true, disabled: false);
            BitmapRebuilder.MarkDifferences(image, point, bitmap);
        }
        catch (BlockException e)
        {
            throw new BlockException($"Operation rebuild on bitmap {bitmapName} failed: {e.Message}");
        }
        return 0;
    }
}
