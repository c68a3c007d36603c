using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// The QMP commands of strata daemon, with qemu-storage-daemon 7.2's argument checking, reply shapes and error
/// classes. Commands run one at a time; events go to every negotiated session.
/// </summary>
public sealed partial class DaemonBackend : IQmpBackend
{
    private readonly SemaphoreSlim _serial = new(1, 1);
    private readonly List<Func<QDict, ValueTask>> _subscribers = new();
    private readonly Dictionary<string, (IReadOnlyList<ArgSpec> Args, string Returns, Func<JsonObject, object?> Run)> _commands = new(StringComparer.Ordinal);
    private readonly TaskCompletionSource _quit = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public BlockGraph Graph { get; }
    public JobManager Jobs { get; }

    public DaemonBackend(BlockGraph graph)
    {
        Graph = graph;
        Jobs = new JobManager(JobEventsToQmp.To(Emit));
        Graph.ExternalDrivers["nbd"] = spec => NbdImage.Connect(spec.NbdSocketPath, spec.NbdHost, spec.NbdPort, spec.NbdExport, spec.ReadOnly);
        Register();
    }

    /// <summary>Completes when a client asked to quit (after its reply went out).</summary>
    public Task QuitRequested => _quit.Task;

    public QDict Version { get; } = new QDict()
        .Add("qemu", new QDict().Add("major", 7).Add("minor", 2).Add("micro", 0))
        .Add("package", $"strata {typeof(DaemonBackend).Assembly.GetName().Version?.ToString(3) ?? "0.1.0"}");

    public async ValueTask<object?> ExecuteAsync(string command, JsonObject arguments, CancellationToken cancellationToken)
    {
        if (!_commands.TryGetValue(command, out var entry))
            throw new QmpException("CommandNotFound", $"The command {command} has not been found");
        await _serial.WaitAsync(cancellationToken);
        try
        {
            // blockdev-add is a union on "driver": its handler checks the members itself.
            if (!entry.Args.Any(a => a.Name == "*")) ArgSchema.Validate(arguments, entry.Args);
            return entry.Run(arguments);
        }
        catch (JobException e) when (e.DeviceNotActive)
        {
            throw new QmpException("DeviceNotActive", e.Message);
        }
        catch (BlockException e)
        {
            throw QmpException.Generic(ImageLockedException.WithoutHint(e.Message));
        }
        catch (Formats.Qcow2.ImageFormatException e)
        {
            // A corrupt or unsupported image header: QEMU's open fails with the same GenericError.
            throw QmpException.Generic(e.Message);
        }
        finally
        {
            _serial.Release();
        }
    }

    /// <summary>Where the stack of an unexpected command failure goes (the daemon's stderr).</summary>
    public TextWriter Log { get; init; } = TextWriter.Null;

    public void CommandFailed(string command, Exception error)
    {
        lock (Log) Log.WriteLine($"strata daemon: unexpected error in '{command}' (answered GenericError, still serving): {error}");
    }

    public void ReplySent(string command)
    {
        if (command == "quit") _quit.TrySetResult();
    }

    public IDisposable SubscribeEvents(Func<QDict, ValueTask> onEvent)
    {
        lock (_subscribers) _subscribers.Add(onEvent);
        return new Unsubscriber(() => { lock (_subscribers) _subscribers.Remove(onEvent); });
    }

    private sealed class Unsubscriber(Action action) : IDisposable
    {
        public void Dispose() => action();
    }

    /// <summary>Sends an event to every negotiated session.</summary>
    public void Emit(string name, QDict? data)
    {
        var now = DateTimeOffset.UtcNow;
        long micros = now.ToUnixTimeMilliseconds() * 1000 + now.Ticks / 10 % 1000;
        var e = new QDict()
            .Add("timestamp", new QDict().Add("seconds", micros / 1_000_000).Add("microseconds", micros % 1_000_000))
            .Add("event", name);
        if (data is not null) e.Add("data", data);
        Func<QDict, ValueTask>[] subscribers;
        lock (_subscribers) subscribers = _subscribers.ToArray();
        foreach (var s in subscribers) _ = s(e);
    }

    // ------------------------------------------------------------------ command table

    private void Add(string name, ArgSpec[] args, string returns, Func<JsonObject, object?> run) => _commands[name] = (args, returns, run);

    private static readonly ArgSpec Node = new("node", ArgType.Str);
    private static readonly ArgSpec Name = new("name", ArgType.Str);

    private void Register()
    {
        Add("qmp_capabilities", [new("enable", ArgType.Any, true)], "any", _ => new QDict());
        Add("query-version", [], "VersionInfo", _ => Version);
        Add("query-commands", [], "[CommandInfo]", _ => _commands.Keys.Order().Select(n => (object?)new QDict().Add("name", n)).ToList());
        Add("query-qmp-schema", [], "[SchemaInfo]", _ => Schema());
        Add("quit", [], "any", _ =>
        {
            // The daemon stops once the reply is out (ReplySent). With no job still writing, the images are closed
            // first: a client that runs qemu-img as soon as it has the reply finds them unlocked and complete.
            if (Jobs.All.All(j => j.Status is JobStatus.Concluded or JobStatus.Null))
            {
                StopAsync().AsTask().GetAwaiter().GetResult();
                Graph.Dispose();
            }
            return new QDict();
        });
        Add("query-block", [], "[BlockInfo]", _ => new List<object?>()); // a storage daemon has no devices
        Add("query-jobs", [], "[JobInfo]", _ => Jobs.QueryJobs());
        Add("query-block-jobs", [], "[BlockJobInfo]", _ => Jobs.QueryBlockJobs());
        var jobId = new ArgSpec("id", ArgType.Str);
        var device = new ArgSpec("device", ArgType.Str);
        Add("job-pause", [jobId], "any", a => Ok(() => Jobs.Pause(ArgSchema.Str(a, "id"))));
        Add("job-resume", [jobId], "any", a => Ok(() => Jobs.Resume(ArgSchema.Str(a, "id"))));
        Add("job-cancel", [jobId], "any", a => Ok(() => Jobs.Cancel(ArgSchema.Str(a, "id"))));
        Add("job-complete", [jobId], "any", a => Ok(() => Jobs.Complete(ArgSchema.Str(a, "id"))));
        Add("job-finalize", [jobId], "any", a => Ok(() => Jobs.FinalizeJob(ArgSchema.Str(a, "id"))));
        Add("job-dismiss", [jobId], "any", a => Ok(() => Jobs.DismissJob(ArgSchema.Str(a, "id"))));
        Add("block-job-cancel", [device, new("force", ArgType.Bool, true)], "any", a => Ok(() => Jobs.Cancel(ArgSchema.Str(a, "device"), blockFamily: true, force: ArgSchema.Bool(a, "force"))));
        Add("block-job-pause", [device], "any", a => Ok(() => Jobs.Pause(ArgSchema.Str(a, "device"), blockFamily: true)));
        Add("block-job-resume", [device], "any", a => Ok(() => Jobs.Resume(ArgSchema.Str(a, "device"), blockFamily: true)));
        Add("block-job-complete", [device], "any", a => Ok(() => Jobs.Complete(ArgSchema.Str(a, "device"), blockFamily: true)));
        Add("block-job-set-speed", [device, new("speed", ArgType.Int)], "any", a => Ok(() => Jobs.SetSpeed(ArgSchema.Str(a, "device"), a["speed"]!.GetValue<long>())));
        Add("block-job-finalize", [jobId], "any", a => Ok(() => Jobs.FinalizeJob(ArgSchema.Str(a, "id"), blockFamily: true)));
        Add("block-job-dismiss", [jobId], "any", a => Ok(() => Jobs.DismissJob(ArgSchema.Str(a, "id"), blockFamily: true)));
        Add("blockdev-create", [new("job-id", ArgType.Str), new("options", ArgType.Object)], "any", BlockdevCreate);
        Add("block_resize", [new("device", ArgType.Str, true), new("node-name", ArgType.Str, true), new("size", ArgType.Int)], "any", BlockResize);
        RegisterBackup();
        RegisterMirror();
        RegisterMigration();
        RegisterSnapshot();
        Add("query-named-block-nodes", [new("flat", ArgType.Bool, true)], "[BlockDeviceInfo]", a => NamedBlockNodes(ArgSchema.Bool(a, "flat")));
        Add("blockdev-add", BlockdevAddCommon.Concat([new ArgSpec("*", ArgType.Any, true)]).ToArray(), "any", BlockdevAdd);
        Add("blockdev-del", [new("node-name", ArgType.Str)], "any", a =>
        {
            Graph.Delete(ArgSchema.Str(a, "node-name"));
            return new QDict();
        });
        Add("block-dirty-bitmap-add", [Node, Name, new("granularity", ArgType.UInt32, true), new("persistent", ArgType.Bool, true), new("disabled", ArgType.Bool, true)], "any", a =>
        {
            var set = BitmapNode(a).Image.Bitmaps;
            long? g = ArgSchema.OptLong(a, "granularity");
            set.Add(ArgSchema.Str(a, "name"), g, ArgSchema.Bool(a, "persistent"), ArgSchema.Bool(a, "disabled"));
            return new QDict();
        });
        Add("block-dirty-bitmap-remove", [Node, Name], "any", a => BitmapOp(a, (s, n) => s.Remove(n)));
        Add("block-dirty-bitmap-clear", [Node, Name], "any", a => BitmapOp(a, (s, n) => s.Clear(n)));
        Add("block-dirty-bitmap-enable", [Node, Name], "any", a => BitmapOp(a, (s, n) => s.Enable(n)));
        Add("block-dirty-bitmap-disable", [Node, Name], "any", a => BitmapOp(a, (s, n) => s.Disable(n)));
        Add("block-dirty-bitmap-merge", [Node, new("target", ArgType.Str), new("bitmaps", ArgType.Any)], "any", BitmapMerge);
        Add("nbd-server-start", [new("addr", ArgType.Object), new("tls-creds", ArgType.Str, true), new("tls-authz", ArgType.Str, true), new("max-connections", ArgType.UInt32, true)], "any", a =>
        {
            StartNbdServer((JsonObject)a["addr"]!, legacy: true, ArgSchema.OptLong(a, "max-connections"), a.ContainsKey("tls-creds"));
            return new QDict();
        });
        Add("nbd-server-stop", [], "any", _ =>
        {
            StopNbdServer();
            return new QDict();
        });
        Add("block-export-add", ExportArgs, "any", a =>
        {
            AddExport(a);
            return new QDict();
        });
        Add("block-export-del", [new("id", ArgType.Str), new("mode", ArgType.Enum, true, ["safe", "hard"])], "any", a =>
        {
            DeleteExport(ArgSchema.Str(a, "id"), ArgSchema.OptStr(a, "mode") == "hard");
            return new QDict();
        });
        Add("query-block-exports", [], "[BlockExportInfo]", _ => _exports.Values.Select(e => (object?)new QDict()
            .Add("id", e.Export.Id).Add("type", "nbd").Add("node-name", e.Node.Name).Add("shutting-down", e.Export.ShuttingDown)).ToList());
        Add("nbd-server-add", [new("device", ArgType.Str), new("name", ArgType.Str, true), new("description", ArgType.Str, true), new("writable", ArgType.Bool, true), new("bitmap", ArgType.Str, true)], "any", a =>
        {
            var args = new JsonObject { ["type"] = "nbd", ["id"] = ArgSchema.OptStr(a, "name") ?? ArgSchema.Str(a, "device"), ["node-name"] = ArgSchema.Str(a, "device") };
            foreach (var key in new[] { "name", "description", "writable" }) if (a[key] is { } v) args[key] = v.DeepClone();
            if (ArgSchema.OptStr(a, "bitmap") is { } bm) args["bitmaps"] = new JsonArray(bm);
            AddExport(args);
            return new QDict();
        });
        Add("nbd-server-remove", [new("name", ArgType.Str), new("mode", ArgType.Enum, true, ["safe", "hard"])], "any", a =>
        {
            string name = ArgSchema.Str(a, "name");
            var match = _exports.Values.Where(e => e.Export.Name == name).ToList();
            if (match.Count == 0) throw QmpException.Generic($"Export '{name}' is not found");
            DeleteExport(match[0].Export.Id, ArgSchema.OptStr(a, "mode") == "hard");
            return new QDict();
        });
        Add("x-debug-block-dirty-bitmap-sha256", [Node, Name], "BlockDirtyBitmapSha256", a =>
        {
            string node = ArgSchema.Str(a, "node");
            var n = Graph.Find(node) ?? throw QmpException.Generic($"Node '{node}' not found");
            var b = n.Image.Bitmaps.Get(ArgSchema.Str(a, "name"));
            return new QDict().Add("sha256", b.Bits.Sha256());
        });
    }

    private static QDict Ok(Action action)
    {
        action();
        return new QDict();
    }

    // ------------------------------------------------------------------ blockdev-create

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
            string fileNode = BlockdevRef(o["file"], "options.", "file").Name
                ?? throw QmpException.Generic("Parameter 'options.file': only a node name is supported here");
            var options = new Qcow2CreateOptions
            {
                Size = size,
                ClusterSize = (int)Math.Min(o["cluster-size"]?.GetValue<ulong>() ?? 65536, int.MaxValue),
                RefcountBits = (int)(o["refcount-bits"]?.GetValue<long>() ?? 16),
                CompressionType = ArgSchema.OptStr(o, "compression-type") == "zstd" ? Formats.Qcow2.Qcow2CompressionType.Zstd : Formats.Qcow2.Qcow2CompressionType.Deflate,
                BackingFile = ArgSchema.OptStr(o, "backing-file"),
                BackingFormat = ArgSchema.OptStr(o, "backing-fmt"),
                ExtendedL2 = ArgSchema.Bool(o, "extended-l2"),
            };
            string? unsupported = ArgSchema.OptStr(o, "version") == "v2" ? "qcow2 version 2 cannot be created"
                : ArgSchema.Bool(o, "lazy-refcounts") ? "lazy refcounts are not supported"
                : o.ContainsKey("encrypt") ? "encryption is not supported"
                : o.ContainsKey("data-file") ? "external data files are not supported"
                : ArgSchema.OptStr(o, "preallocation") is { } p and not "off" ? $"Unsupported preallocation mode '{p}'" : null;
            work = _ =>
            {
                // qcow2 counts the disk in 512-byte sectors: QEMU's job fails on any other size.
                if (size % 512 != 0) throw new BlockException("Image size must be a multiple of 512 bytes");
                if (unsupported is not null) throw new BlockException(unsupported);
                var node = Graph.Find(fileNode) ?? throw new BlockException($"Cannot find device='{fileNode}' nor node-name='{fileNode}'");
                if (node.Image is not RawImage { FormatName: "file" } file) throw new BlockException($"Node '{fileNode}' is not a file node");
                if (node.Users > 0) throw new BlockException($"Node '{fileNode}' is in use");
                Qcow2Image.Format(file.File, options);
                return Task.CompletedTask;
            };
        }
        Jobs.Start([new DelegateJob(id, "create", autoFinalize: true, autoDismiss: false, work)]);
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
        var node = (nodeName is null ? null : Graph.Find(nodeName))
            ?? throw QmpException.Generic($"Cannot find device='{device ?? ""}' nor node-name='{nodeName ?? ""}'");
        foreach (var job in Jobs.All.Where(j => j.Status is not (JobStatus.Concluded or JobStatus.Null)))
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
        if (_exports.Values.Any(e => e.Node == node)) throw QmpException.Generic(Conflict($"an unnamed block device (uses node '{node.Name}' as 'root' child)"));
        if (Graph.Nodes.FirstOrDefault(p => p.FileChild == node && p.Image is Qcow2Image) is { } parent)
            throw QmpException.Generic(Conflict($"node '{parent.Name}' (uses node '{node.Name}' as 'file' child)"));
        if (node.Image.ReadOnly) throw QmpException.Generic("Image is read-only");
        if (node.Image is Qcow2Image && size % 512 != 0) throw QmpException.Generic("The new size must be a multiple of 512");
        using (DrainedSection.Begin([node.Image]))
            node.Image.Resize(size);
        return new QDict();
    }

    private List<object?> Schema()
    {
        var list = new List<object?>();
        foreach (var (name, entry) in _commands.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            list.AddRange(ArgSchema.SchemaEntries(name, entry.Args.Where(s => s.Name != "*").ToList(), entry.Returns));
        foreach (var builtin in new[] { "str", "int", "bool", "any" })
            list.Add(new QDict().Add("name", builtin).Add("meta-type", "builtin").Add("json-type", builtin switch { "str" => "string", "int" => "int", "bool" => "boolean", _ => "value" }));
        return list;
    }

    // ------------------------------------------------------------------ bitmaps

    private BlockNode BitmapNode(JsonObject a)
    {
        string node = ArgSchema.Str(a, "node");
        return Graph.Find(node) ?? throw QmpException.Generic($"Cannot find device='{node}' nor node-name='{node}'");
    }

    private object? BitmapOp(JsonObject a, Action<BitmapSet, string> op)
    {
        op(BitmapNode(a).Image.Bitmaps, ArgSchema.Str(a, "name"));
        return new QDict();
    }

    private object? BitmapMerge(JsonObject a)
    {
        ArgSchema.CheckBitmapList(a["bitmaps"], "bitmaps");
        var node = BitmapNode(a);
        var list = a["bitmaps"]!.AsArray();
        // QEMU 7.2 crashes on an empty list; we refuse it.
        if (list.Count == 0) throw QmpException.Generic("Parameter 'bitmaps' must name at least one source bitmap");
        var sources = new List<DirtyBitmap>();
        int i = 0;
        foreach (var item in list)
        {
            switch (item)
            {
                case JsonValue v when v.GetValueKind() == JsonValueKind.String:
                    sources.Add(node.Image.Bitmaps.Get(v.GetValue<string>()));
                    break;
                case JsonObject o:
                    ArgSchema.Validate(o, [Node, Name], $"bitmaps[{i}].");
                    string other = ArgSchema.Str(o, "node");
                    var otherNode = Graph.Find(other) ?? throw QmpException.Generic($"Cannot find device='{other}' nor node-name='{other}'");
                    sources.Add(otherNode.Image.Bitmaps.Get(ArgSchema.Str(o, "name")));
                    break;
                default:
                    throw ArgSchema.AlternateError(null, "BlockDirtyBitmapOrStr");
            }
            i++;
        }
        node.Image.Bitmaps.Merge(ArgSchema.Str(a, "target"), sources);
        return new QDict();
    }

    // ------------------------------------------------------------------ NBD

    private NbdServer? _nbd;
    private readonly Dictionary<string, (NbdExport Export, BlockNode Node)> _exports = new(StringComparer.Ordinal);

    public NbdServer? NbdServer => _nbd;

    private static readonly ArgSpec[] ExportArgs =
    [
        new("type", ArgType.Enum, false, ["nbd", "fuse", "vhost-user-blk", "vduse-blk"]), new("id", ArgType.Str), new("node-name", ArgType.Str),
        new("writable", ArgType.Bool, true), new("writethrough", ArgType.Bool, true), new("iothread", ArgType.Str, true),
        new("fixed-iothread", ArgType.Bool, true), new("name", ArgType.Str, true), new("description", ArgType.Str, true),
        new("bitmaps", ArgType.Any, true), new("allocation-depth", ArgType.Bool, true),
    ];

    /// <summary>Starts the NBD server. <paramref name="legacy"/>: QMP's {type, data:{…}} address; otherwise the
    /// command line's flat {type, path | host, port}. <paramref name="accept"/> false binds and listens but leaves
    /// clients waiting in the backlog until <see cref="AcceptNbdClients"/>: the command line adds its exports first,
    /// so a client that connects as soon as the socket exists never finds its export missing.</summary>
    public void StartNbdServer(JsonObject addr, bool legacy, long? maxConnections, bool tls = false, bool accept = true)
    {
        // The address is checked first: QEMU's marshaller visits every argument before the command runs.
        var address = legacy ? SocketAddressArg.ParseLegacy(addr, "addr.") : SocketAddressArg.Parse(addr, "addr.");
        if (_nbd is not null) throw QmpException.Generic("NBD server already running");
        if (tls) throw QmpException.Generic("TLS is not supported by strata daemon");
        int max = (int)(maxConnections ?? 100);
        try
        {
            _nbd = address.Path is { } path ? NbdServer.ListenUnix(path, max) : NbdServer.ListenTcp(address.ListenHost(), address.Port, max);
        }
        catch (System.Net.Sockets.SocketException e)
        {
            throw QmpException.Generic(address.BindError(e));
        }
        if (accept) _nbd.Start();
    }

    public void AcceptNbdClients() => _nbd?.Start();

    private void StopNbdServer()
    {
        if (_nbd is null) throw QmpException.Generic("NBD server not running");
        foreach (var id in _exports.Keys.ToList()) DeleteExport(id, hard: true);
        _nbd.DisposeAsync().AsTask().Wait();
        _nbd = null;
    }

    /// <summary>block-export-add (also --export on the command line).</summary>
    public void AddExport(JsonObject a)
    {
        ArgSchema.Validate(a, ExportArgs);
        if (a.TryGetPropertyValue("bitmaps", out var bitmapList)) ArgSchema.CheckBitmapList(bitmapList, "bitmaps");
        if (ArgSchema.Str(a, "type") != "nbd") throw QmpException.Generic($"Export type '{ArgSchema.Str(a, "type")}' is not supported");
        if (_nbd is null) throw QmpException.Generic("NBD server not running");
        string id = ArgSchema.Str(a, "id");
        if (_exports.ContainsKey(id)) throw QmpException.Generic($"Block export id '{id}' is already in use");
        string nodeName = ArgSchema.Str(a, "node-name");
        var node = Graph.Find(nodeName) ?? throw QmpException.Generic($"Cannot find device='{nodeName}' nor node-name='{nodeName}'");
        string name = ArgSchema.OptStr(a, "name") ?? nodeName;
        if (name.Length > 4096) throw QmpException.Generic($"export name '{name[..32]}...' too long");
        if (_nbd.Find(name) is not null) throw QmpException.Generic($"NBD server already has export named '{name}'");
        string? description = ArgSchema.OptStr(a, "description");
        if (description is { Length: > 4096 }) throw QmpException.Generic("description too long");
        bool writable = ArgSchema.Bool(a, "writable");
        if (writable && node.Image.ReadOnly) throw QmpException.Generic($"Cannot export read-only node '{nodeName}' as writable");
        var bitmaps = new List<DirtyBitmap>();
        if (bitmapList is JsonArray array)
        {
            int i = 0;
            foreach (var item in array)
            {
                DirtyBitmap b;
                // The node QEMU asks about below: where a plain name was found, the export's node otherwise.
                BlockImage? holder = node.Image;
                if (item is JsonValue v && v.GetValueKind() == JsonValueKind.String)
                {
                    // A plain name is looked up on the node and down its backing chain.
                    string bn = v.GetValue<string>();
                    DirtyBitmap? found = null;
                    for (holder = node.Image; holder is not null; holder = holder.Backing)
                        if ((found = holder.Bitmaps.Find(bn)) is not null) break;
                    b = found ?? throw QmpException.Generic($"Bitmap '{bn}' is not found");
                }
                else if (item is JsonObject o)
                {
                    ArgSchema.Validate(o, [Node, Name], $"bitmaps[{i}].");
                    string on = ArgSchema.Str(o, "node");
                    var other = Graph.Find(on) ?? throw QmpException.Generic($"Cannot find device='{on}' nor node-name='{on}'");
                    b = other.Image.Bitmaps.Find(ArgSchema.Str(o, "name")) ?? throw QmpException.Generic($"Bitmap '{ArgSchema.Str(o, "name")}' is not found");
                }
                else throw ArgSchema.AlternateError(null, "BlockDirtyBitmapOrStr");
                // An enabled bitmap on a read-only export may still change under it — unless nothing can write the
                // node at all (QEMU 7.2 refuses only when the node itself is writable).
                if (!writable && b.Enabled && holder is { ReadOnly: false }) throw QmpException.Generic($"Enabled bitmap '{b.Name}' incompatible with readonly export");
                if (bitmaps.Any(x => x.Name == b.Name)) throw QmpException.Generic($"Bitmap '{b.Name}' is listed twice");
                bitmaps.Add(b);
                i++;
            }
        }
        var busy = new List<DirtyBitmap>();
        try
        {
            foreach (var b in bitmaps)
            {
                node.Image.Bitmaps.SetBusyAnywhere(b, true);
                busy.Add(b);
            }
        }
        catch (BitmapException)
        {
            foreach (var b in busy) b.Busy = false;
            throw;
        }
        var export = new NbdExport(id, name, description, node.Image, writable, bitmaps, ArgSchema.Bool(a, "allocation-depth")) { DiscardUnmap = node.DiscardUnmap };
        // A node switching over to a mirror's target: the new export is held with the others (before any client
        // can reach it) and moves with them.
        _switchingOver.TryGetValue(node, out var switching);
        if (switching is not null) _ = export.DrainAsync();
        _nbd.AddExport(export);
        try
        {
            Graph.AddUser(node, NodeUser.Export, LockClaim.Export(writable));
        }
        catch (BlockException)
        {
            _nbd.RemoveExport(export);
            foreach (var b in busy) b.Busy = false;
            throw;
        }
        _exports[id] = (export, node);
        switching?.Add(export);
    }

    private void DeleteExport(string id, bool hard)
    {
        if (!_exports.TryGetValue(id, out var entry)) throw QmpException.Generic($"Export '{id}' is not found");
        if (!hard && entry.Export.Connections > 0) throw QmpException.Generic($"export '{id}' still in use");
        entry.Export.ShuttingDown = true;
        _nbd!.RemoveExport(entry.Export);
        if (hard) entry.Export.DisconnectClients();
        foreach (var b in entry.Export.Bitmaps) b.Busy = false;
        Graph.RemoveUser(entry.Node, NodeUser.Export, LockClaim.Export(entry.Export.Writable));
        _exports.Remove(id);
        Emit("BLOCK_EXPORT_DELETED", new QDict().Add("id", id));
    }

    /// <summary>Daemon shutdown (SIGTERM): closes the NBD server between two QMP commands, as quit does; a command
    /// that does not finish within a few seconds is not waited for.</summary>
    public async ValueTask ShutdownAsync()
    {
        bool entered = await _serial.WaitAsync(TimeSpan.FromSeconds(10));
        try
        {
            await StopAsync();
        }
        finally
        {
            if (entered) _serial.Release();
        }
    }

    /// <summary>Closes the NBD server (quit, under the dispatcher's lock; <see cref="ShutdownAsync"/> otherwise).</summary>
    private async ValueTask StopAsync()
    {
        if (_nbd is null) return;
        foreach (var (export, node) in _exports.Values)
        {
            foreach (var b in export.Bitmaps) b.Busy = false;
            Graph.RemoveUser(node, NodeUser.Export, LockClaim.Export(export.Writable));
        }
        _exports.Clear();
        await _nbd.DisposeAsync();
        _nbd = null;
    }

    // ------------------------------------------------------------------ graph

    private static readonly ArgSpec[] BlockdevAddCommon =
    [
        new("driver", ArgType.Enum, false, ["file", "qcow2", "raw", "null-co", "nbd", "blkdebug", "copy-before-write", "snapshot-access", "throttle"]),
        new("node-name", ArgType.Str, true),
        new("discard", ArgType.Enum, true, ["ignore", "unmap", "off", "on"]),
        new("cache", ArgType.Object, true),
        new("read-only", ArgType.Bool, true),
        new("auto-read-only", ArgType.Bool, true),
        new("force-share", ArgType.Bool, true),
        new("detect-zeroes", ArgType.Enum, true, ["off", "on", "unmap"]),
    ];

    private static readonly Dictionary<string, ArgSpec[]> DriverArgs = new()
    {
        ["file"] =
        [
            new("filename", ArgType.Str), new("pr-manager", ArgType.Str, true), new("locking", ArgType.Enum, true, ["auto", "on", "off"]),
            new("aio", ArgType.Enum, true, ["threads", "native", "io_uring"]), new("aio-max-batch", ArgType.Int, true),
            new("drop-cache", ArgType.Bool, true), new("x-check-cache-dropped", ArgType.Bool, true),
        ],
        ["qcow2"] =
        [
            new("file", ArgType.Any), new("backing", ArgType.Any, true), new("lazy-refcounts", ArgType.Bool, true),
            new("pass-discard-request", ArgType.Bool, true), new("pass-discard-snapshot", ArgType.Bool, true),
            new("pass-discard-other", ArgType.Bool, true), new("overlap-check", ArgType.Any, true),
            new("cache-size", ArgType.Int, true), new("l2-cache-size", ArgType.Int, true), new("l2-cache-entry-size", ArgType.Int, true),
            new("refcount-cache-size", ArgType.Int, true), new("cache-clean-interval", ArgType.Int, true),
        ],
        ["raw"] = [new("file", ArgType.Any), new("offset", ArgType.Int, true), new("size", ArgType.Int, true)],
        ["null-co"] = [new("size", ArgType.Int, true), new("latency-ns", ArgType.UInt64, true), new("read-zeroes", ArgType.Bool, true)],
        ["copy-before-write"] =
        [
            new("file", ArgType.Any), new("target", ArgType.Any), new("bitmap", ArgType.Object, true),
            new("on-cbw-error", ArgType.Enum, true, ["break-guest-write", "break-snapshot"]), new("cbw-timeout", ArgType.UInt32, true),
        ],
        ["snapshot-access"] = [new("file", ArgType.Any)],
        ["throttle"] = [new("file", ArgType.Any), new("throttle-group", ArgType.Str)],
        ["blkdebug"] =
        [
            new("image", ArgType.Any), new("config", ArgType.Str, true), new("align", ArgType.Int, true), new("max-transfer", ArgType.Int, true),
            new("opt-write-zero", ArgType.Int, true), new("max-write-zero", ArgType.Int, true), new("opt-discard", ArgType.Int, true),
            new("max-discard", ArgType.Int, true), new("inject-error", ArgType.Any, true), new("set-state", ArgType.Any, true),
            new("take-child-perms", ArgType.Any, true), new("share-child-perms", ArgType.Any, true),
        ],
        ["nbd"] =
        [
            new("server", ArgType.Object), new("export", ArgType.Str, true), new("tls-creds", ArgType.Str, true), new("tls-hostname", ArgType.Str, true),
            new("x-dirty-bitmap", ArgType.Str, true), new("reconnect-delay", ArgType.UInt32, true), new("open-timeout", ArgType.UInt32, true),
        ],
    };

    /// <summary>Validates a blockdev definition (a flat union on "driver") and turns it into a node spec.</summary>
    public static BlockNodeSpec ParseBlockdev(JsonObject a, string prefix = "")
    {
        if (!a.TryGetPropertyValue("driver", out var driverNode)) throw QmpException.Generic($"Parameter '{prefix}driver' is missing");
        ArgSchema.CheckType(prefix + "driver", driverNode, BlockdevAddCommon[0]);
        string driver = driverNode!.GetValue<string>();
        var specs = BlockdevAddCommon.Concat(DriverArgs[driver]).ToArray();
        ArgSchema.Validate(a, specs, prefix);
        if (a["cache"] is JsonObject cache) ArgSchema.Validate(cache, [new("direct", ArgType.Bool, true), new("no-flush", ArgType.Bool, true)], prefix + "cache.");
        var spec = new BlockNodeSpec
        {
            Driver = driver,
            NodeName = ArgSchema.OptStr(a, "node-name"),
            ReadOnly = ArgSchema.Bool(a, "read-only"),
            DiscardUnmap = ArgSchema.OptStr(a, "discard") is "unmap" or "on",
            Filename = driver == "file" ? FileName(ArgSchema.Str(a, "filename")) : null,
            CacheDirect = a["cache"] is JsonObject c1 && ArgSchema.Bool(c1, "direct"),
            CacheNoFlush = a["cache"] is JsonObject c2 && ArgSchema.Bool(c2, "no-flush"),
            Size = driver == "null-co" ? ArgSchema.OptLong(a, "size") ?? 1L << 30 : 0,
            ReadZeroes = driver == "null-co" && ArgSchema.Bool(a, "read-zeroes"),
            Locking = ArgSchema.OptStr(a, "locking") != "off",
        };
        if (driver == "throttle")
            spec = spec with { FileNodeName = NamedNode(a, "file", prefix), ThrottleGroup = ArgSchema.Str(a, "throttle-group") };
        if (driver is "copy-before-write" or "snapshot-access")
        {
            spec = spec with { FileNodeName = NamedNode(a, "file", prefix) };
            if (driver == "copy-before-write")
            {
                spec = spec with
                {
                    TargetNodeName = NamedNode(a, "target", prefix),
                    CbwBreakSnapshot = ArgSchema.OptStr(a, "on-cbw-error") == "break-snapshot",
                    CbwTimeout = (uint)(ArgSchema.OptLong(a, "cbw-timeout") ?? 0),
                };
                if (a["bitmap"] is JsonObject bm)
                {
                    ArgSchema.Validate(bm, [new("node", ArgType.Str), new("name", ArgType.Str)], prefix + "bitmap.");
                    spec = spec with { CbwBitmap = (ArgSchema.Str(bm, "node"), ArgSchema.Str(bm, "name")) };
                }
            }
        }
        if (driver == "blkdebug")
        {
            var (_, image) = BlockdevRef(a["image"], prefix, "image");
            var states = new List<BlkdebugStateRule>();
            var errors = new List<BlkdebugErrorRule>();
            int i = 0;
            foreach (var r in List(a, "set-state", prefix))
            {
                var o = r as JsonObject ?? throw QmpException.Generic($"Invalid parameter type for '{prefix}set-state[{i}]', expected: object");
                ArgSchema.Validate(o, [new("event", ArgType.Enum, false, Blkdebug.KnownEvents), new("state", ArgType.Int, true), new("new_state", ArgType.Int)], $"{prefix}set-state[{i}].");
                states.Add(new BlkdebugStateRule(ArgSchema.Str(o, "event"), (int)(ArgSchema.OptLong(o, "state") ?? 0), (int)ArgSchema.OptLong(o, "new_state")!));
                i++;
            }
            i = 0;
            foreach (var r in List(a, "inject-error", prefix))
            {
                var o = r as JsonObject ?? throw QmpException.Generic($"Invalid parameter type for '{prefix}inject-error[{i}]', expected: object");
                ArgSchema.Validate(o, [new("event", ArgType.Enum, false, Blkdebug.KnownEvents), new("iotype", ArgType.Str, true), new("errno", ArgType.Int, true),
                    new("sector", ArgType.Int, true), new("once", ArgType.Bool, true), new("immediately", ArgType.Bool, true), new("state", ArgType.Int, true)], $"{prefix}inject-error[{i}].");
                errors.Add(new BlkdebugErrorRule(ArgSchema.Str(o, "event"), (int)(ArgSchema.OptLong(o, "errno") ?? 5), (int?)ArgSchema.OptLong(o, "state"),
                    ArgSchema.OptLong(o, "sector"), ArgSchema.Bool(o, "once")));
                i++;
            }
            if (image is not { Driver: "file" }) throw QmpException.Generic($"Parameter '{prefix}image': only an inline file node is supported under blkdebug");
            if (a.ContainsKey("config")) throw QmpException.Generic($"Parameter '{prefix}config': blkdebug config files are not supported");
            spec = spec with { Filename = image.Filename, Faults = new Blkdebug(states, errors) };
        }
        if (driver == "nbd")
        {
            var server = SocketAddressArg.Parse((JsonObject)a["server"]!, prefix + "server.").ForConnect();
            if (a.ContainsKey("tls-creds")) throw QmpException.Generic("TLS is not supported by strata daemon");
            if (a.ContainsKey("x-dirty-bitmap")) throw QmpException.Generic($"Parameter '{prefix}x-dirty-bitmap' is not supported");
            spec = spec with { NbdSocketPath = server.Path, NbdHost = server.Host, NbdPort = server.Port, NbdExport = ArgSchema.OptStr(a, "export") ?? "" };
        }
        if (driver is "qcow2" or "raw")
        {
            var (fileName, inline) = BlockdevRef(a["file"], prefix, "file");
            spec = inline is null ? spec with { FileNodeName = fileName } : spec with { FileInline = inline with { ReadOnly = inline.ReadOnly || spec.ReadOnly } };
            if (a.TryGetPropertyValue("backing", out var backing))
            {
                var (backingName, backingInline) = BlockdevRef(backing, prefix, "backing", orNull: true);
                if (backingInline is not null)
                    throw QmpException.Generic($"Parameter '{prefix}backing': an inline backing definition is not supported; name a node or use null");
                spec = spec with { OpenBacking = false, BackingNodeName = backingName };
            }
            if (driver == "raw" && (a.ContainsKey("offset") || a.ContainsKey("size")))
                throw QmpException.Generic($"Parameter '{prefix}offset'/'size' of the raw driver are not supported");
        }
        return spec;
    }

    /// <summary>A BlockdevRef member (a node's name, or an inline definition: <paramref name="orNull"/> allows null
    /// too), its types checked as QEMU's visitor checks them before anything else.</summary>
    private static (string? Name, BlockNodeSpec? Inline) BlockdevRef(JsonNode? value, string prefix, string member, bool orNull = false) => value switch
    {
        null when orNull => (null, null),
        JsonValue v when v.GetValueKind() == JsonValueKind.String => (v.GetValue<string>(), null),
        JsonObject o => (null, ParseBlockdev(o, prefix + member + ".")),
        _ => throw ArgSchema.AlternateError(prefix + member, orNull ? "BlockdevRefOrNull" : "BlockdevRef"),
    };

    /// <summary>A BlockdevRef that must name an existing node here (filters take no inline child).</summary>
    private static string NamedNode(JsonObject a, string member, string prefix) =>
        BlockdevRef(a[member], prefix, member).Name
        ?? throw QmpException.Generic($"Parameter '{prefix}{member}': an inline node definition is not supported here; name a node");

    /// <summary>An optional list member's items (none when absent).</summary>
    private static JsonArray List(JsonObject a, string member, string prefix) => a.TryGetPropertyValue(member, out var v)
        ? v as JsonArray ?? throw QmpException.Generic($"Invalid parameter type for '{prefix}{member}', expected: array")
        : [];

    /// <summary>A file node's file name, refused as QEMU refuses it before any open: empty, or with a NUL (which
    /// ends a C string: QEMU then looks for the part before it).</summary>
    private static string FileName(string name)
    {
        if (name.Length == 0) throw QmpException.Generic("The 'file' block driver requires a file name");
        if (name.Contains('\0')) throw QmpException.Generic($"Could not open '{name}': No such file or directory");
        return name;
    }

    private object? BlockdevAdd(JsonObject a)
    {
        var spec = ParseBlockdev(a);
        if (spec.NodeName is null) throw QmpException.Generic("A top-level node must have a node-name");
        try
        {
            Graph.Add(spec);
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
        foreach (var node in Graph.Nodes)
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
            var bitmaps = ImageInfo.DirtyBitmaps(image.Bitmaps);
            if (bitmaps.Count > 0) d.Add("dirty-bitmaps", bitmaps);
            list.Add(d);
        }
        return list;
    }
}
