using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>QAPI's block-core commands that add, create, resize, list and delete nodes.</summary>
internal sealed class BlockNodeCommands(BlockGraph graph, JobManager jobs, ExportManager exports)
{
    public void Register(QmpDispatcher q)
    {
        q.Add("query-block", [], "[BlockInfo]", _ => new List<object?>()); // a storage daemon has no devices
        q.Add("query-named-block-nodes", [new("flat", ArgType.Bool, true)], "[BlockDeviceInfo]", a => NamedBlockNodes(ArgSchema.Bool(a, "flat")));
        q.Add("blockdev-add", BlockdevOptions.CommandArgs, "any", BlockdevAdd);
        q.Add("blockdev-del", [new("node-name", ArgType.Str)], "any", a =>
        {
            graph.Delete(ArgSchema.Str(a, "node-name"));
            return new QDict();
        });
        q.Add("blockdev-create", [new("job-id", ArgType.Str), new("options", ArgType.Object)], "any", BlockdevCreate);
        q.Add("block_resize", [new("device", ArgType.Str, true), new("node-name", ArgType.Str, true), new("size", ArgType.Int)], "any", BlockResize);
    }

    /// <summary>QEMU 7.2's BlockdevDriver enum: what a backing-fmt may name (Strata opens qcow2 and raw).</summary>
    private static readonly string[] QemuBlockDrivers =
    [
        "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg", "file",
        "snapshot-access", "ftp", "ftps", "gluster", "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio",
        "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd", "replication", "ssh", "throttle", "vdi",
        "vhdx", "vmdk", "vpc", "vvfat",
    ];

    private static readonly ArgSpec[] CreateFileArgs =
    [
        new("driver", ArgType.Enum, false, ["file", "qcow2"]), new("filename", ArgType.Str), new("size", ArgType.UInt64),
        new("preallocation", ArgType.Enum, true, ["off", "metadata", "falloc", "full"]), new("nocow", ArgType.Bool, true),
        new("extent-size-hint", ArgType.UInt64, true),
    ];

    private static readonly ArgSpec[] CreateQcow2Args =
    [
        new("driver", ArgType.Enum, false, ["file", "qcow2"]), new("file", ArgType.Any), new("size", ArgType.UInt64),
        new("version", ArgType.Enum, true, ["v2", "v3"]), new("backing-file", ArgType.Str, true), new("backing-fmt", ArgType.Enum, true, QemuBlockDrivers),
        new("encrypt", ArgType.Any, true), new("cluster-size", ArgType.UInt64, true),
        new("preallocation", ArgType.Enum, true, ["off", "metadata", "falloc", "full"]), new("lazy-refcounts", ArgType.Bool, true),
        new("refcount-bits", ArgType.Int, true), new("compression-type", ArgType.Enum, true, ["zlib", "zstd"]),
        new("data-file", ArgType.Any, true), new("data-file-raw", ArgType.Bool, true), new("extended-l2", ArgType.Bool, true),
    ];

    /// <summary>blockdev-create: a "create" job. As in QEMU, option values that only the driver can judge (a bad
    /// cluster size, a missing node) make the job fail rather than the command.</summary>
    private object? BlockdevCreate(JsonObject a)
    {
        string id = ArgSchema.Str(a, "job-id");
        var o = (JsonObject)a["options"]!;
        if (!o.TryGetPropertyValue("driver", out var d)) throw QmpException.Generic("Parameter 'options.driver' is missing");
        ArgSchema.CheckType("options.driver", d, CreateFileArgs[0]);
        string driver = d!.GetValue<string>();
        ArgSchema.Validate(o, driver == "file" ? CreateFileArgs : CreateQcow2Args, "options.");
        long size = (long)o["size"]!.GetValue<ulong>();
        Func<CancellationToken, Task> work;
        if (driver == "file")
        {
            string filename = ArgSchema.Str(o, "filename");
            if (ArgSchema.OptStr(o, "preallocation") is { } p and not "off") throw QmpException.Generic($"Unsupported preallocation mode '{p}'");
            work = _ =>
            {
                try
                {
                    using var f = HostFile.Create(filename);
                    f.SetLength(size);
                    f.Flush();
                }
                catch (BlockException e)
                {
                    throw new BlockException(ImageLockedException.WithoutHint(e.Message).Replace("Could not create", "Could not create file"));
                }
                return Task.CompletedTask;
            };
        }
        else
        {
            string fileNode = BlockdevOptions.BlockdevRef(o["file"], "options.", "file").Name
                ?? throw QmpException.Generic("Parameter 'options.file': only a node name is supported here");
            string? dataFileNode = o.ContainsKey("data-file")
                ? BlockdevOptions.BlockdevRef(o["data-file"], "options.", "data-file").Name
                  ?? throw QmpException.Generic("Parameter 'options.data-file': only a node name is supported here")
                : null;
            var options = new Qcow2CreateOptions
            {
                Size = size,
                ClusterSize = (int)Math.Min(o["cluster-size"]?.GetValue<ulong>() ?? 65536, int.MaxValue),
                RefcountBits = (int)(o["refcount-bits"]?.GetValue<long>() ?? 16),
                CompressionType = ArgSchema.OptStr(o, "compression-type") == "zstd" ? Formats.Qcow2.Qcow2CompressionType.Zstd : Formats.Qcow2.Qcow2CompressionType.Deflate,
                BackingFile = ArgSchema.OptStr(o, "backing-file"),
                BackingFormat = ArgSchema.OptStr(o, "backing-fmt"),
                ExtendedL2 = ArgSchema.Bool(o, "extended-l2"),
                DataFileRaw = ArgSchema.Bool(o, "data-file-raw"),
            };
            string? unsupported = ArgSchema.OptStr(o, "version") == "v2"
                    ? o.ContainsKey("data-file") ? "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
                    : "qcow2 version 2 cannot be created"
                : ArgSchema.Bool(o, "lazy-refcounts") ? "lazy refcounts are not supported"
                : o.ContainsKey("encrypt") ? "encryption is not supported"
                : ArgSchema.OptStr(o, "preallocation") is { } p and not "off" ? $"Unsupported preallocation mode '{p}'" : null;
            work = _ =>
            {
                // qcow2 counts the disk in 512-byte sectors: QEMU's job fails on any other size.
                if (size % 512 != 0) throw new BlockException("Image size must be a multiple of 512 bytes");
                if (unsupported is not null) throw new BlockException(unsupported);
                var node = graph.Find(fileNode) ?? throw new BlockException($"Cannot find device='{fileNode}' nor node-name='{fileNode}'");
                // As QEMU: an existing node becomes the data file, its bytes kept (with data-file-raw the new disk
                // reads exactly what it holds); the header records the node's file name.
                HostFile? dataFile = null;
                if (dataFileNode is not null)
                {
                    var dataNode = graph.Find(dataFileNode) ?? throw new BlockException($"Cannot find device='{dataFileNode}' nor node-name='{dataFileNode}'");
                    dataFile = dataNode.Image is RawImage { FormatName: "file" } data ? data.File
                        : throw new BlockException($"Node '{dataFileNode}' is not a file node; only file nodes can serve as a qcow2 data file");
                    options = options with { DataFile = dataNode.FileName, AdoptDataFile = true };
                }
                if (node.Image is not RawImage { FormatName: "file" } file) throw new BlockException($"Node '{fileNode}' is not a file node");
                if (node.Users > 0) throw new BlockException($"Node '{fileNode}' is in use");
                Qcow2Image.Format(file.File, options, dataFile);
                return Task.CompletedTask;
            };
        }
        jobs.Start([new DelegateJob(id, "create", autoFinalize: true, autoDismiss: false, work)]);
        return new QDict();
    }

    /// <summary>block_resize: a live node grows or shrinks, drained so no request straddles the change; QEMU's checks
    /// and words, in QEMU's order.</summary>
    private object? BlockResize(JsonObject a)
    {
        long size = a["size"]!.GetValue<long>();
        if (size < 0) throw QmpException.Generic("Parameter 'size' expects a >0 size");
        string? device = ArgSchema.OptStr(a, "device"), nodeName = ArgSchema.OptStr(a, "node-name");
        // A storage daemon has no devices: only node-name can name what is resized.
        var node = (nodeName is null ? null : graph.Find(nodeName))
            ?? throw QmpException.Generic($"Cannot find device='{device ?? ""}' nor node-name='{nodeName ?? ""}'");
        foreach (var job in jobs.All.Where(j => j.Status is not (JobStatus.Concluded or JobStatus.Null)))
        {
            var (source, target) = job switch
            {
                BackupJob b => (b.SourceImage, b.TargetImage),
                MirrorJob m => (m.SourceImage, m.TargetImage),
                _ => (null, null),
            };
            if (source == node.Image || target == node.Image)
                throw QmpException.Generic($"Node '{node.Name}' is busy: block device is in use by block job: {job.Type}");
        }
        // Permissions, as QEMU's graph has them: an NBD export never lets its node change size under its clients,
        // and qcow2 keeps its file's size to itself (raw passes resizing through).
        string Conflict(string by) => $"Permission conflict on node '{node.Name}': permissions 'resize' are both required by an unnamed block device " +
            $"(uses node '{node.Name}' as 'root' child) and unshared by {by}.";
        if (exports.Serves(node)) throw QmpException.Generic(Conflict($"an unnamed block device (uses node '{node.Name}' as 'root' child)"));
        if (graph.Nodes.FirstOrDefault(p => p.FileChild == node && p.Image is Qcow2Image) is { } parent)
            throw QmpException.Generic(Conflict($"node '{parent.Name}' (uses node '{node.Name}' as 'file' child)"));
        if (graph.Nodes.FirstOrDefault(p => p.DataFileChild == node) is { } user)
            throw QmpException.Generic(Conflict($"node '{user.Name}' (uses node '{node.Name}' as 'data-file' child)"));
        if (node.Image.ReadOnly) throw QmpException.Generic("Image is read-only");
        if (node.Image is Qcow2Image && size % 512 != 0) throw QmpException.Generic("The new size must be a multiple of 512");
        using (DrainedSection.Begin([node.Image]))
            node.Image.Resize(size);
        return new QDict();
    }

    private object? BlockdevAdd(JsonObject a)
    {
        var spec = BlockdevOptions.Parse(a);
        if (spec.NodeName is null) throw QmpException.Generic("A top-level node must have a node-name");
        try
        {
            graph.Add(spec);
        }
        catch (PathTooLongException)
        {
            // ENAMETOOLONG, which the file layer leaves as .NET's exception.
            throw QmpException.Generic($"Could not open '{spec.Filename ?? spec.FileInline?.Filename}': File name too long");
        }
        return new QDict();
    }

    private List<object?> NamedBlockNodes(bool flat)
    {
        var list = new List<object?>();
        foreach (var node in graph.Nodes)
        {
            var image = node.Image;
            var info = ImageInfo.Build(image, node.FileName, withBackingImage: !flat);
            if (node.Driver == "file") info.Add("format", "file");
            var d = new QDict()
                .Add("file", node.FileName)
                .Add("node-name", node.Name)
                .Add("ro", image.ReadOnly)
                .Add("drv", node.Driver)
                .Add("encrypted", false)
                .Add("detect_zeroes", "off")
                .Add("bps", 0).Add("bps_rd", 0).Add("bps_wr", 0)
                .Add("iops", 0).Add("iops_rd", 0).Add("iops_wr", 0)
                .Add("image", info)
                .Add("cache", new QDict().Add("writeback", true).Add("direct", node.CacheDirect).Add("no-flush", node.CacheNoFlush))
                .Add("write_threshold", 0);
            int depth = 0;
            for (var b = image.Backing ?? image.FilteredChild; b is not null; b = b.Backing ?? b.FilteredChild) depth++;
            d.Add("backing_file_depth", depth);
            if (image.BackingFileName is { } bf) d.Add("backing_file", ImageOpener.ResolveBackingPath(node.FileName, bf));
            var bitmaps = ImageInfo.DirtyBitmaps(image.Bitmaps, image.BitmapsCrashSafe);
            if (bitmaps.Count > 0) d.Add("dirty-bitmaps", bitmaps);
            list.Add(d);
        }
        return list;
    }
}
