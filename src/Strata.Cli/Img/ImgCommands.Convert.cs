using System.CommandLine;
using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img convert`: qemu-img convert's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command ConvertCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var outFormat = LastWins("-O", "output format (default raw)");
        var compress = new Option<bool>("-c") { Description = "compress the target (qcow2)" };
        var backing = LastWins("-B", "backing file of the target");
        var backingFormat = LastWins("-F", "format of the target's backing file");
        var opts = new Option<string[]>("-o") { Description = "target format options" };
        var progress = new Option<bool>("-p") { Description = "show progress" };
        var quiet = QuietOption();
        var noCreate = new Option<bool>("-n") { Description = "do not create the target (it must exist)" };
        var cache = LastWins("-t", "target cache mode: unsafe (default), writeback, writethrough, none, directsync");
        var srcCache = LastWins("-T", "source cache mode (accepted)");
        var outOfOrder = new Option<bool>("-W") { Description = "out-of-order writes" };
        var coroutines = LastWins("-m", "parallel workers (1..16)");
        var sparse = LastWins("-S", "shortest run of zeros left as a hole (0: allocate everything)");
        var salvage = new Option<bool>("--salvage") { Description = "copy unreadable sectors as zeros instead of failing" };
        var copyOffload = new Option<bool>("-C") { Description = "copy offloading (copy_file_range); Strata copies itself" };
        var bitmaps = new Option<bool>("--bitmaps") { Description = "also copy the source's persistent bitmaps" };
        var skipBroken = new Option<bool>("--skip-broken-bitmaps") { Description = "with --bitmaps, leave out inconsistent bitmaps" };
        var files = new Argument<string[]>("filenames") { Arity = ArgumentArity.ZeroOrMore };
        var forceShare = ForceShareOption();
        var snapshotParam = LastWins("-l", "convert an internal snapshot: snapshot.id=…,snapshot.name=… or an ID or name");
        var snapshotName = LastWins("-s", "convert the internal snapshot with this ID or name");
        var cmd = new Command("convert", "Convert or copy an image")
        {
            format, outFormat, compress, backing, backingFormat, opts, progress, quiet, noCreate, cache, srcCache, outOfOrder, coroutines,
            sparse, salvage, copyOffload, bitmaps, skipBroken, forceShare, snapshotParam, snapshotName, files,
        };
        cmd.SetAction(r => Run(stderr, () =>
        {
            var names = r.GetValue(files) ?? [];
            string? outFmtGiven = r.GetValue(outFormat);
            string outFmt = outFmtGiven ?? "raw";
            bool compressed = r.GetValue(compress);
            if (r.GetValue(copyOffload))
            {
                if (compressed) throw new BlockException("Cannot enable copy offloading when -c is used");
                if (r.GetValue(sparse) is not null) throw new BlockException("Cannot enable copy offloading when -S is used");
                if (r.GetValue(salvage)) throw new BlockException("Cannot use copy offloading in salvaging mode");
            }
            bool fresh = !r.GetValue(noCreate);
            bool quietMode = r.GetValue(quiet);
            int workers = 8;
            if (r.GetValue(coroutines) is { } m && (!int.TryParse(m, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out workers) || workers is < 1 or > 16))
                throw new BlockException("Invalid number of coroutines. Allowed number of coroutines is between 1 and 16");
            int minSparse = 4096;
            if (r.GetValue(sparse) is { } sparseText)
            {
                if (!SizeText.TryParse(sparseText, out long sparseBytes))
                    throw new BlockException("Invalid buffer size for sparse output specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
                if (sparseBytes % 512 != 0 || sparseBytes > 32768L * 512)
                    throw new BlockException("Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).");
                minSparse = (int)sparseBytes;
            }
            if (r.GetValue(skipBroken) && !r.GetValue(bitmaps)) throw new BlockException("Use of --skip-broken-bitmaps requires --bitmaps");
            var optionGroups = r.GetValue(opts) ?? [];
            ImgOptionHelp.CheckLists(optionGroups);
            if (ImgOptionHelp.Requested(optionGroups))
            {
                // Only a target beside a source counts as a named file here, as in qemu-img.
                stdout.Write(ImgOptionHelp.ForCreate(r.GetValue(outFormat) ?? "raw", fileNamed: names.Length >= 2));
                return 0;
            }
            if (!fresh && optionGroups.Length > 0) throw new BlockException("-o has no effect when skipping image creation");
            if (names.Length < 2) throw new BlockException("Must specify image file name");
            string cacheMode = r.GetValue(cache) ?? "unsafe";
            if (!IsCacheMode(cacheMode)) throw new BlockException($"Invalid cache option: {cacheMode}");
            if (r.GetValue(srcCache) is { } sc && !IsCacheMode(sc)) throw new BlockException($"Invalid source cache option: {sc}");
            string target = names[^1];
            var printer = r.GetValue(progress) && !quietMode ? new ProgressPrinter(stdout, minSkip: 1) : null;
            printer?.Report(0);

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
                var kv = ParseOptions(optionGroups, target);
                foreach (var (k, v) in kv)
                {
                    if (k == "backing_file") targetBacking = v;
                    else if (k == "backing_fmt") targetBackingFormat = v;
                }
                if (fresh && outFmt is not ("raw" or "qcow2")) throw new BlockException($"Unknown file format '{outFmt}'");
                if (sources.Count > 1 && targetBacking is not null)
                    throw new BlockException("Having a backing file for the target makes no sense when concatenating multiple input images");
                if (compressed && fresh && outFmt != "qcow2") throw new BlockException("Compression not supported for this file format");
                if (r.GetValue(bitmaps)) CheckBitmapsCopyable(sources, r.GetValue(skipBroken));
                if (fresh && targetBacking is not null && targetBackingFormat is null)
                    throw new BlockException("Use of backing file requires explicit backing format");
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
                // Without -n, -B only names the new target's backing file; an existing target keeps its own.
                // A new encrypted target is written through the key it was created with.
                string? targetKey = fresh && outFmt == "qcow2" ? kv.LastOrDefault(p => p.Key == "encrypt.key-secret").Value : null;
                using var dst = targetKey is not null
                    ? OpenEncryptedTarget(target, targetKey, openBacking: targetBacking is not null)
                    : OpenImage(target, fresh ? outFmt : outFmtGiven, readOnly: false, openBacking: fresh ? targetBacking is not null : true);
                if (!fresh && dst.Size < total) throw new BlockException("output file is smaller than input file");
                if (r.GetValue(bitmaps) && dst is not Qcow2Image) throw new BlockException($"Format driver '{dst.FormatName}' does not support bitmaps");
                if (compressed && !dst.SupportsCompression) throw new BlockException("Compression not supported for this file format");
                if (cacheMode == "unsafe")
                {
                    if (dst is Qcow2Image dq) dq.File.FlushEnabled = false;
                    if (dst is RawImage dr) dr.File.FlushEnabled = false;
                }
                bool targetHasBacking = fresh && targetBacking is not null;
                ImageConverter.Convert(sources, dst, new ConvertOptions
                {
                    Compress = compressed,
                    TargetHasBacking = targetHasBacking,
                    TargetBackingSize = targetHasBacking && dst.Backing is { } tb ? tb.Size : -1,
                    TargetIsZeroed = fresh,
                    MinSparse = minSparse,
                    WriteInOrder = !r.GetValue(outOfOrder),
                    Salvage = r.GetValue(salvage),
                    Warn = quietMode ? null : w => stderr.WriteLine($"{Prog}: warning: {w}"),
                    Workers = Math.Min(workers, Math.Max(4, 2 * Environment.ProcessorCount)),
                    Progress = printer is null ? null : printer.Report,
                });
                if (r.GetValue(bitmaps)) CopyBitmaps(sources[0], dst, r.GetValue(skipBroken), quietMode ? null : stderr);
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

    private static bool IsCacheMode(string mode) => mode is "none" or "writeback" or "writethrough" or "directsync" or "unsafe";

    /// <summary>--bitmaps copies from one source only, and an inconsistent bitmap only when told to leave it out.</summary>
    private static void CheckBitmapsCopyable(List<BlockImage> sources, bool skipBroken)
    {
        if (sources.Count > 1) throw new BlockException("Copying bitmaps only possible with single source");
        if (sources[0] is not Qcow2Image) throw new BlockException("Source lacks bitmap support");
        if (skipBroken) return;
        foreach (var b in sources[0].Bitmaps.All)
            if (b.Persistent && b.Inconsistent)
                throw new BlockException($"Cannot copy inconsistent bitmap '{b.Name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it");
    }

    /// <summary>Each persistent bitmap of the source, with its granularity, state and bits, into the target.</summary>
    private static void CopyBitmaps(BlockImage source, BlockImage target, bool skipBroken, TextWriter? warnings)
    {
        // qemu-img walks a node's bitmaps from the last in the image's directory to the first, warning as it goes;
        // the target must end up with the source's directory order, so the copies are made first to last.
        if (skipBroken)
            foreach (var b in source.Bitmaps.All.Where(b => b.Persistent && b.Name is not null && b.Inconsistent))
                warnings?.WriteLine($"{Prog}: warning: Skipping inconsistent bitmap '{b.Name}'");
        foreach (var b in source.Bitmaps.All.Reverse())
        {
            if (!b.Persistent || b.Name is null || (skipBroken && b.Inconsistent)) continue;
            target.Bitmaps.Add(b.Name, b.Granularity, persistent: true, disabled: false);
            target.Bitmaps.Merge(b.Name, [b]);
            if (!b.Enabled) target.Bitmaps.Disable(b.Name);
        }
        target.Flush();
    }

    /// <summary>Opens a qcow2 target just created encrypted, with the key secret it was created with.</summary>
    private static BlockImage OpenEncryptedTarget(string target, string keySecretId, bool openBacking)
    {
        var options = new BlockOptions([
            KeyValuePair.Create("driver", (string?)"qcow2"), KeyValuePair.Create("file.driver", (string?)"file"),
            KeyValuePair.Create("file.filename", (string?)target), KeyValuePair.Create("encrypt.key-secret", (string?)keySecretId)]);
        var image = ImageOpener.OpenSpecChain(target, options, "qcow2", readOnly: false, openBacking, ImageLocking.Normal);
        try
        {
            ImageOpener.UnlockChain(target, image);
        }
        catch
        {
            image.Dispose();
            throw;
        }
        return image;
    }
}
