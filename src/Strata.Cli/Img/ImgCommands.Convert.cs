using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Formats.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img convert`: qemu-img convert's options and output.</summary>
internal static partial class ImgCommands
{
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
        var snapshotParam = new Option<string?>("-l") { Description = "convert an internal snapshot: snapshot.id=…,snapshot.name=… or an ID or name" };
        var snapshotName = new Option<string?>("-s") { Description = "convert the internal snapshot with this ID or name" };
        var cmd = new Command("convert", "Convert or copy an image")
            { format, outFormat, compress, backing, backingFormat, opts, progress, quiet, noCreate, cache, srcCache, outOfOrder, coroutines, forceShare, snapshotParam, snapshotName, files };
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
                if ((r.GetValue(snapshotParam) ?? r.GetValue(snapshotName)) is { } snapshot)
                    LoadSourceSnapshot(sources, snapshot);
                long total = sources.Sum(s => s.Size);
                string? targetBacking = r.GetValue(backing);
                string? targetBackingFormat = r.GetValue(backingFormat);
                var kv = ParseOptions(r.GetValue(opts) ?? [], target);
                foreach (var (k, v) in kv)
                {
                    if (k == "backing_file") targetBacking = v;
                    else if (k == "backing_fmt") targetBackingFormat = v;
                }
                // qemu-img no longer probes the format of a backing file it is asked to write into a header.
                if (targetBacking is not null && targetBackingFormat is null)
                    throw new BlockException("Use of backing file requires explicit backing format");
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

    /// <summary>-l/-s: the source is read as the snapshot's disk (qemu-img's bdrv_snapshot_load_tmp).</summary>
    private static void LoadSourceSnapshot(List<BlockImage> sources, string snapshot)
    {
        if (sources.Count > 1) throw new BlockException("No support for concatenating multiple snapshot");
        string? id = null, name = null;
        if (snapshot.StartsWith("snapshot.", StringComparison.Ordinal))
        {
            foreach (var part in snapshot.Split(','))
            {
                if (part.StartsWith("snapshot.id=", StringComparison.Ordinal)) id = part["snapshot.id=".Length..];
                else if (part.StartsWith("snapshot.name=", StringComparison.Ordinal)) name = part["snapshot.name=".Length..];
                else throw new BlockException($"Failed in parsing snapshot param '{snapshot}'");
            }
        }
        else
        {
            id = snapshot;
        }
        try
        {
            if (sources[0] is not Qcow2Image q) throw new BlockException("Operation not supported");
            q.LoadSnapshotTemporarily(id, name, byIdOrName: !snapshot.StartsWith("snapshot.", StringComparison.Ordinal));
        }
        catch (BlockException e)
        {
            throw new BlockException($"Failed to load snapshot: {e.Message}");
        }
    }
}
