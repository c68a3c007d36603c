using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// blockdev-add's options (also --blockdev): a flat union on "driver", checked as QEMU's visitor checks it and
/// turned into a node spec. Each driver is one entry of the registry: its members, and what it adds to the spec.
/// </summary>
public static class BlockdevOptions
{
    /// <summary>A driver's own members and how they fill the spec (after the common members are read).</summary>
    private sealed record DriverOptions(ArgSpec[] Args, Func<JsonObject, string, BlockNodeSpec, BlockNodeSpec> Apply);

    private static readonly Dictionary<string, DriverOptions> Drivers = new(StringComparer.Ordinal)
    {
        ["file"] = new(
        [
            new("filename", ArgType.Str), new("pr-manager", ArgType.Str, true), new("locking", ArgType.Enum, true, ["auto", "on", "off"]),
            new("aio", ArgType.Enum, true, ["threads", "native", "io_uring"]), new("aio-max-batch", ArgType.Int, true),
            new("drop-cache", ArgType.Bool, true), new("x-check-cache-dropped", ArgType.Bool, true),
        ], (a, _, spec) => spec with { Filename = FileName(ArgSchema.Str(a, "filename")), Locking = ArgSchema.OptStr(a, "locking") != "off" }),
        ["qcow2"] = new(
        [
            new("file", ArgType.Any), new("backing", ArgType.Any, true), new("lazy-refcounts", ArgType.Bool, true),
            new("pass-discard-request", ArgType.Bool, true), new("pass-discard-snapshot", ArgType.Bool, true),
            new("pass-discard-other", ArgType.Bool, true), new("overlap-check", ArgType.Any, true),
            new("cache-size", ArgType.Int, true), new("l2-cache-size", ArgType.Int, true), new("l2-cache-entry-size", ArgType.Int, true),
            new("refcount-cache-size", ArgType.Int, true), new("cache-clean-interval", ArgType.Int, true),
            new("data-file", ArgType.Any, true), new("crash-safe-bitmaps", ArgType.Bool, true),
        ], Qcow2),
        ["raw"] = new([new("file", ArgType.Any), new("offset", ArgType.Int, true), new("size", ArgType.Int, true)], (a, prefix, spec) =>
        {
            spec = FormatWithFile(a, prefix, spec);
            if (a.ContainsKey("offset") || a.ContainsKey("size"))
                throw QmpException.Generic($"Parameter '{prefix}offset'/'size' of the raw driver are not supported");
            return spec;
        }),
        ["null-co"] = new([new("size", ArgType.Int, true), new("latency-ns", ArgType.UInt64, true), new("read-zeroes", ArgType.Bool, true)],
            (a, _, spec) => spec with { Size = ArgSchema.OptLong(a, "size") ?? 1L << 30, ReadZeroes = ArgSchema.Bool(a, "read-zeroes") }),
        ["nbd"] = new(
        [
            new("server", ArgType.Object), new("export", ArgType.Str, true), new("tls-creds", ArgType.Str, true), new("tls-hostname", ArgType.Str, true),
            new("x-dirty-bitmap", ArgType.Str, true), new("reconnect-delay", ArgType.UInt32, true), new("open-timeout", ArgType.UInt32, true),
        ], Nbd),
        ["blkdebug"] = new(
        [
            new("image", ArgType.Any), new("config", ArgType.Str, true), new("align", ArgType.Int, true), new("max-transfer", ArgType.Int, true),
            new("opt-write-zero", ArgType.Int, true), new("max-write-zero", ArgType.Int, true), new("opt-discard", ArgType.Int, true),
            new("max-discard", ArgType.Int, true), new("inject-error", ArgType.Any, true), new("set-state", ArgType.Any, true),
            new("take-child-perms", ArgType.Any, true), new("share-child-perms", ArgType.Any, true),
        ], Blkdebug),
        ["copy-before-write"] = new(
        [
            new("file", ArgType.Any), new("target", ArgType.Any), new("bitmap", ArgType.Object, true),
            new("on-cbw-error", ArgType.Enum, true, ["break-guest-write", "break-snapshot"]), new("cbw-timeout", ArgType.UInt32, true),
        ], CopyBeforeWrite),
        ["snapshot-access"] = new([new("file", ArgType.Any)], (a, prefix, spec) => spec with { FileNodeName = NamedNode(a, "file", prefix) }),
        ["throttle"] = new([new("file", ArgType.Any), new("throttle-group", ArgType.Str)],
            (a, prefix, spec) => spec with { FileNodeName = NamedNode(a, "file", prefix), ThrottleGroup = ArgSchema.Str(a, "throttle-group") }),
    };

    /// <summary>The members every driver takes; "driver" names one of the registry's.</summary>
    private static readonly ArgSpec[] Common =
    [
        new("driver", ArgType.Enum, false, [.. Drivers.Keys]),
        new("node-name", ArgType.Str, true),
        new("discard", ArgType.Enum, true, ["ignore", "unmap", "off", "on"]),
        new("cache", ArgType.Object, true),
        new("read-only", ArgType.Bool, true),
        new("auto-read-only", ArgType.Bool, true),
        new("force-share", ArgType.Bool, true),
        new("detect-zeroes", ArgType.Enum, true, ["off", "on", "unmap"]),
    ];

    /// <summary>blockdev-add's member list for the schema: the common members; the rest depends on the driver.</summary>
    public static ArgSpec[] CommandArgs => [.. Common, new ArgSpec("*", ArgType.Any, true)];

    /// <summary>Validates a blockdev definition and turns it into a node spec.</summary>
    public static BlockNodeSpec Parse(JsonObject a, string prefix = "")
    {
        if (!a.TryGetPropertyValue("driver", out var driverNode)) throw QmpException.Generic($"Parameter '{prefix}driver' is missing");
        ArgSchema.CheckType(prefix + "driver", driverNode, Common[0]);
        string driver = driverNode!.GetValue<string>();
        var options = Drivers[driver];
        ArgSchema.Validate(a, [.. Common, .. options.Args], prefix);
        if (a["cache"] is JsonObject cache) ArgSchema.Validate(cache, [new("direct", ArgType.Bool, true), new("no-flush", ArgType.Bool, true)], prefix + "cache.");
        var spec = new BlockNodeSpec
        {
            Driver = driver,
            NodeName = ArgSchema.OptStr(a, "node-name"),
            ReadOnly = ArgSchema.Bool(a, "read-only"),
            DiscardUnmap = ArgSchema.OptStr(a, "discard") is "unmap" or "on",
            CacheDirect = a["cache"] is JsonObject c1 && ArgSchema.Bool(c1, "direct"),
            CacheNoFlush = a["cache"] is JsonObject c2 && ArgSchema.Bool(c2, "no-flush"),
            Size = 0,
            Locking = true,
        };
        return options.Apply(a, prefix, spec);
    }

    /// <summary>qcow2 and raw: a file child (named or inline) and, for qcow2, a backing child.</summary>
    private static BlockNodeSpec FormatWithFile(JsonObject a, string prefix, BlockNodeSpec spec)
    {
        var (fileName, inline) = BlockdevRef(a["file"], prefix, "file");
        spec = inline is null ? spec with { FileNodeName = fileName } : spec with { FileInline = InheritCache(inline, a["file"], spec) with { ReadOnly = inline.ReadOnly || spec.ReadOnly } };
        if (a.TryGetPropertyValue("backing", out var backing))
        {
            var (backingName, backingInline) = BlockdevRef(backing, prefix, "backing", orNull: true);
            if (backingInline is not null)
                throw QmpException.Generic($"Parameter '{prefix}backing': an inline backing definition is not supported; name a node or use null");
            spec = spec with { OpenBacking = false, BackingNodeName = backingName };
        }
        return spec;
    }

    /// <summary>qcow2: a format with a file, and an external data file named or defined inline.</summary>
    private static BlockNodeSpec Qcow2(JsonObject a, string prefix, BlockNodeSpec spec)
    {
        spec = FormatWithFile(a, prefix, spec);
        if (a.ContainsKey("crash-safe-bitmaps")) spec = spec with { CrashSafeBitmaps = ArgSchema.Bool(a, "crash-safe-bitmaps") };
        if (!a.TryGetPropertyValue("data-file", out var dataFile)) return spec;
        var (name, inline) = BlockdevRef(dataFile, prefix, "data-file");
        return inline is null ? spec with { DataFileNodeName = name } : spec with { DataFileInline = InheritCache(inline, dataFile, spec) with { ReadOnly = inline.ReadOnly || spec.ReadOnly } };
    }

    /// <summary>QEMU's rule for a child defined inline: it takes its parent's cache.direct and cache.no-flush unless it
    /// sets them itself (qemu-storage-daemon reports a qcow2 node's inline file with the qcow2 node's cache).</summary>
    private static BlockNodeSpec InheritCache(BlockNodeSpec child, JsonNode? childDefinition, BlockNodeSpec parent)
    {
        // One level is all there is here: the inline children a format node takes (file, data-file) are protocol
        // nodes, which have no children of their own (a qcow2 node over a raw node is refused).
        var cache = (childDefinition as JsonObject)?["cache"] as JsonObject;
        return child with
        {
            CacheDirect = cache?.ContainsKey("direct") == true ? child.CacheDirect : parent.CacheDirect,
            CacheNoFlush = cache?.ContainsKey("no-flush") == true ? child.CacheNoFlush : parent.CacheNoFlush,
        };
    }

    private static BlockNodeSpec Nbd(JsonObject a, string prefix, BlockNodeSpec spec)
    {
        var server = SocketAddressArg.Parse((JsonObject)a["server"]!, prefix + "server.").ForConnect();
        if (a.ContainsKey("tls-creds")) throw QmpException.Generic("TLS is not supported by strata daemon");
        if (a.ContainsKey("x-dirty-bitmap")) throw QmpException.Generic($"Parameter '{prefix}x-dirty-bitmap' is not supported");
        return spec with { NbdSocketPath = server.Path, NbdHost = server.Host, NbdPort = server.Port, NbdExport = ArgSchema.OptStr(a, "export") ?? "" };
    }

    private static BlockNodeSpec CopyBeforeWrite(JsonObject a, string prefix, BlockNodeSpec spec)
    {
        spec = spec with
        {
            FileNodeName = NamedNode(a, "file", prefix),
            TargetNodeName = NamedNode(a, "target", prefix),
            CbwBreakSnapshot = ArgSchema.OptStr(a, "on-cbw-error") == "break-snapshot",
            CbwTimeout = (uint)(ArgSchema.OptLong(a, "cbw-timeout") ?? 0),
        };
        if (a["bitmap"] is JsonObject bm)
        {
            ArgSchema.Validate(bm, [new("node", ArgType.Str), new("name", ArgType.Str)], prefix + "bitmap.");
            spec = spec with { CbwBitmap = (ArgSchema.Str(bm, "node"), ArgSchema.Str(bm, "name")) };
        }
        return spec;
    }

    private static BlockNodeSpec Blkdebug(JsonObject a, string prefix, BlockNodeSpec spec)
    {
        var (_, image) = BlockdevRef(a["image"], prefix, "image");
        var states = new List<BlkdebugStateRule>();
        var errors = new List<BlkdebugErrorRule>();
        int i = 0;
        foreach (var r in List(a, "set-state", prefix))
        {
            var o = r as JsonObject ?? throw QmpException.Generic($"Invalid parameter type for '{prefix}set-state[{i}]', expected: object");
            ArgSchema.Validate(o, [new("event", ArgType.Enum, false, Strata.Block.Blkdebug.KnownEvents), new("state", ArgType.Int, true), new("new_state", ArgType.Int)], $"{prefix}set-state[{i}].");
            states.Add(new BlkdebugStateRule(ArgSchema.Str(o, "event"), (int)(ArgSchema.OptLong(o, "state") ?? 0), (int)ArgSchema.OptLong(o, "new_state")!));
            i++;
        }
        i = 0;
        foreach (var r in List(a, "inject-error", prefix))
        {
            var o = r as JsonObject ?? throw QmpException.Generic($"Invalid parameter type for '{prefix}inject-error[{i}]', expected: object");
            ArgSchema.Validate(o, [new("event", ArgType.Enum, false, Strata.Block.Blkdebug.KnownEvents), new("iotype", ArgType.Str, true), new("errno", ArgType.Int, true),
                new("sector", ArgType.Int, true), new("once", ArgType.Bool, true), new("immediately", ArgType.Bool, true), new("state", ArgType.Int, true)], $"{prefix}inject-error[{i}].");
            errors.Add(new BlkdebugErrorRule(ArgSchema.Str(o, "event"), (int)(ArgSchema.OptLong(o, "errno") ?? 5), (int?)ArgSchema.OptLong(o, "state"),
                ArgSchema.OptLong(o, "sector"), ArgSchema.Bool(o, "once")));
            i++;
        }
        if (image is not { Driver: "file" }) throw QmpException.Generic($"Parameter '{prefix}image': only an inline file node is supported under blkdebug");
        if (a.ContainsKey("config")) throw QmpException.Generic($"Parameter '{prefix}config': blkdebug config files are not supported");
        return spec with { Filename = image.Filename, Faults = new Strata.Block.Blkdebug(states, errors) };
    }

    /// <summary>A BlockdevRef member (a node's name, or an inline definition: <paramref name="orNull"/> allows null
    /// too), its types checked as QEMU's visitor checks them before anything else.</summary>
    public static (string? Name, BlockNodeSpec? Inline) BlockdevRef(JsonNode? value, string prefix, string member, bool orNull = false) => value switch
    {
        null when orNull => (null, null),
        JsonValue v when v.GetValueKind() == JsonValueKind.String => (v.GetValue<string>(), null),
        JsonObject o => (null, Parse(o, prefix + member + ".")),
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
}
