using System.CommandLine;
using Strata.Block;
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
}
