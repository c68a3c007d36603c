using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Block;

/// <summary>A backing chain that cannot be opened (loop, too deep, a layer missing); reported as it is.</summary>
public sealed class BackingChainException(string message) : BlockException(message);

/// <summary>How an opener takes QEMU's image locks (see <see cref="FileLocks"/>).</summary>
public enum ImageLocking
{
    /// <summary>No locks: the library's own files, or locking=off.</summary>
    Off,
    /// <summary>The locks qemu-img takes: a qcow2 layer keeps writers and resizers off; a raw one only reads
    /// (or writes) and shares everything.</summary>
    Normal,
    /// <summary>Like <see cref="Normal"/>, and a raw top must not change either (qemu-img convert's sources).</summary>
    Stable,
    /// <summary>Like <see cref="Normal"/> writable, and the size may change (qemu-img resize).</summary>
    Resize,
    /// <summary>-U: read while others may do anything.</summary>
    ForceShare,
    /// <summary>Only what format drivers claim for themselves: qcow2 layers lock, raw layers take nothing (a
    /// daemon's backing chain below a node nobody uses yet, as qemu-storage-daemon opens it).</summary>
    FormatOnly,
}

/// <summary>Opens images by format (probed or given) together with their whole backing chain.</summary>
public static class ImageOpener
{
    /// <summary>QEMU refuses chains deeper than this; so do we.</summary>
    public const int MaxChainDepth = 1000;

    /// <summary>Guesses the format from the first bytes: qcow2 by its magic, anything else is raw.</summary>
    public static string ProbeFormat(string path)
    {
        if (BlockSpec.IsSpecial(path))
        {
            using var image = OpenSingle(path, null, readOnly: true);
            return image.FormatName == "qcow2" ? "qcow2" : "raw";
        }
        using var f = HostFile.Open(path, readOnly: true);
        Span<byte> head = stackalloc byte[8];
        f.Read(0, head);
        return Qcow2Header.HasMagic(head) ? "qcow2" : "raw";
    }

    /// <summary>Opens <paramref name="path"/> and its backing chain (backing files always read-only).</summary>
    /// <remarks><paramref name="forCheck"/>: the top image is opened for <c>check</c> (see <see cref="Qcow2OpenOptions.ForCheck"/>).</remarks>
    public static BlockImage Open(string path, string? format = null, bool readOnly = true, bool openBacking = true,
        ImageLocking locking = ImageLocking.Off, bool forCheck = false)
    {
        if (locking == ImageLocking.ForceShare && !readOnly) throw new BlockException("force-share=on can only be used with read-only images");
        var seen = new HashSet<string>(StringComparer.Ordinal);
        try
        {
            return OpenLayer(path, format, readOnly, openBacking, seen, 0, locking, forCheck);
        }
        catch (BackingChainException e) when (e.Message.StartsWith(BackingFailed, StringComparison.Ordinal))
        {
            // As qemu-img's open: the top image's name, then the block layer's chain of reasons.
            throw new BackingChainException($"Could not open '{path}': {e.Message}");
        }
    }

    private const string BackingFailed = "Could not open backing file: ";

    /// <summary>The claim an opener takes on a layer's file.</summary>
    public static LockClaim ClaimFor(string format, bool readOnly, ImageLocking locking, bool isBacking = false) => locking switch
    {
        ImageLocking.Off => LockClaim.None,
        ImageLocking.ForceShare => LockClaim.SharedRead,
        _ when format == "qcow2" => LockClaim.Qcow2(readOnly),
        ImageLocking.FormatOnly => LockClaim.None,
        // A backing file is read; others may still write it (QEMU shares that, so that a commit can).
        _ when isBacking => new(BlockPermissions.ConsistentRead, BlockPermissions.None),
        ImageLocking.Stable => new(BlockPermissions.ConsistentRead, BlockPermissions.Write),
        ImageLocking.Resize => new(BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.None),
        _ => new(BlockPermissions.ConsistentRead | (readOnly ? 0 : BlockPermissions.Write), BlockPermissions.None),
    };

    /// <summary>The claim an opener takes on a qcow2 layer's external data file: the guest data is the opener's, so
    /// its claim as on a raw image passes through (<see cref="LockClaim.Qcow2DataFile"/>); -U shares everything.</summary>
    public static LockClaim DataFileClaimFor(bool readOnly, ImageLocking locking, bool isBacking = false) => locking switch
    {
        ImageLocking.Off => LockClaim.None,
        ImageLocking.ForceShare => LockClaim.SharedRead,
        _ => LockClaim.Qcow2DataFile(ClaimFor("raw", readOnly, locking, isBacking)),
    };

    private static BlockImage OpenLayer(string path, string? format, bool readOnly, bool openBacking, HashSet<string> seen, int depth,
        ImageLocking locking, bool forCheck = false)
    {
        if (depth > MaxChainDepth)
            throw new BackingChainException($"Backing chain of '{path}' is deeper than {MaxChainDepth} images");
        if (!seen.Add(BlockSpec.IsSpecial(path) ? path : Path.GetFullPath(path)))
            throw new BackingChainException($"Backing file '{path}' creates an infinite loop.");
        BlockImage image;
        try
        {
            image = OpenSingle(path, format, readOnly, locking, isBacking: depth > 0, forCheck: forCheck);
        }
        catch (BlockException e) when (depth > 0 && e.Message.StartsWith($"Could not open '{path}': ", StringComparison.Ordinal))
        {
            // Below the top, the block layer's own reason (QEMU prefixes the image name once, at the top).
            throw new BlockException(e.Message[$"Could not open '{path}': ".Length..]);
        }
        if (!openBacking || image.BackingFileName is not { } backing || (BlockSpec.ProtocolOf(path) == "json" && NoBacking(BlockSpec.FromFilename(path)))) return image;
        try
        {
            string backingPath = ResolveBackingPath(path, backing);
            var backingImage = OpenLayer(backingPath, image.BackingFormat, readOnly: true, openBacking: true, seen, depth + 1,
                locking == ImageLocking.Stable ? ImageLocking.Normal : locking);
            image.ReplaceBacking(backingImage);
            return image;
        }
        catch (BackingChainException)
        {
            image.Dispose();
            throw;
        }
        catch (BlockException e)
        {
            image.Dispose();
            throw new BackingChainException(BackingFailed + e.Message);
        }
    }

    /// <summary>Opens one image without its backing chain; errors read "Could not open 'PATH': reason" as in QEMU.
    /// <paramref name="metadataOnly"/>: for reading metadata alone (a qcow2 external data file stays closed);
    /// <paramref name="forCheck"/>: opened by check, a dirty or corrupt image as it is.</summary>
    public static BlockImage OpenSingle(string path, string? format, bool readOnly, ImageLocking locking = ImageLocking.Off, bool isBacking = false,
        bool metadataOnly = false, bool forCheck = false)
    {
        if (BlockSpec.IsSpecial(path)) return OpenSpec(path, null, format, readOnly, locking, isBacking);
        try
        {
            format ??= ProbeFormat(path);
            var file = HostFile.Open(path, readOnly);
            try
            {
                // Locked before the format driver reads or marks anything: a qcow2 opened writable sets in-use flags.
                if (format is "raw" or "qcow2") file.SetLockClaim(ClaimFor(format, readOnly, locking, isBacking));
                return format switch
                {
                    "raw" => new RawImage(file),
                    "qcow2" => Qcow2Image.Open(file, new Qcow2OpenOptions
                    {
                        WithoutDataFile = metadataOnly, ForCheck = forCheck, DataFileLockClaim = DataFileClaimFor(readOnly, locking, isBacking),
                    }),
                    _ => throw new BlockException($"Unknown driver '{format}'"),
                };
            }
            catch
            {
                file.Dispose();
                throw;
            }
        }
        catch (ImageFormatException e)
        {
            throw new BlockException($"Could not open '{path}': {e.Message}");
        }
        catch (BlockException e) when (e is not Bitmaps.BitmapException)
        {
            throw new BlockException($"Could not open '{path}': {e.Message}");
        }
    }

    /// <summary>Unlocks every encrypted layer of a chain (for a command that reads or writes guest data); errors name
    /// the layer as qemu-img's open does.</summary>
    public static void UnlockChain(string path, BlockImage top)
    {
        int depth = 0;
        for (BlockImage? layer = top; layer is not null; layer = layer.Backing, depth++)
        {
            if (layer is not Qcow2Image q) continue;
            try
            {
                q.Unlock();
            }
            catch (BlockException e)
            {
                throw new BlockException(depth == 0 ? $"Could not open '{path}': {e.Message}"
                    : $"Could not open backing file: Could not open '{q.FileName}': {e.Message}");
            }
        }
    }

    /// <summary>A relative backing name is relative to the folder of the image that names it.</summary>
    public static string ResolveBackingPath(string imagePath, string backing)
    {
        // A name with a protocol (json:, nbd://, blkdebug:…) stands for itself; beside a json: or protocol image,
        // a relative name is relative to the folder of the host file underneath.
        if (Path.IsPathRooted(backing) || BlockSpec.IsSpecial(backing)) return backing;
        if (BlockSpec.IsSpecial(imagePath))
        {
            try
            {
                imagePath = HostPathOf(TopOptions(imagePath)) ?? "";
            }
            catch (BlockException)
            {
                imagePath = "";
            }
        }
        string dir = Path.GetDirectoryName(imagePath) ?? "";
        return dir.Length == 0 ? backing : Path.Combine(dir, backing);
    }

    /// <summary>Connects an NBD export (set by the host program, which has the NBD client): unix socket path or
    /// host and port, export name, read-only, and the context block status comes from (null: base:allocation).</summary>
    public static Func<string?, string?, int, string, bool, string?, BlockImage>? NbdConnector { get; set; }

    private static readonly string[] ProtocolDrivers = ["file", "host_device", "blkdebug", "nbd", "null-co", "null-aio", "ssh"];

    /// <summary>Options every node takes, whatever its driver.</summary>
    private static readonly string[] CommonOptions =
        ["driver", "node-name", "read-only", "auto-read-only", "discard", "cache", "detect-zeroes", "force-share"];

    private static readonly Dictionary<string, string[]> DriverOptions = new(StringComparer.Ordinal)
    {
        ["qcow2"] = ["file", "backing", "data-file", "lazy-refcounts", "pass-discard-request", "pass-discard-snapshot",
            "pass-discard-other", "overlap-check", "cache-size", "l2-cache-size", "l2-cache-entry-size", "refcount-cache-size",
            "cache-clean-interval", "encrypt", "filename"],
        ["raw"] = ["file", "offset", "size", "filename"],
        ["file"] = ["filename", "locking", "aio", "aio-max-batch", "pr-manager", "drop-cache", "x-check-cache-dropped"],
        ["host_device"] = ["filename", "locking", "aio", "aio-max-batch", "pr-manager", "drop-cache", "x-check-cache-dropped"],
        ["blkdebug"] = ["config", "x-image", "image", "align", "max-transfer", "opt-write-zero", "max-write-zero", "opt-discard",
            "max-discard", "inject-error", "set-state", "take-child-perms", "unshare-child-perms"],
        ["nbd"] = ["server", "export", "tls-creds", "tls-hostname", "x-dirty-bitmap", "reconnect-delay", "open-timeout", "host", "port", "path"],
        ["ssh"] = ["server", "path", "user", "host-key-check", "host", "port"],
        ["null-co"] = ["size", "latency-ns", "read-zeroes", "filename"],
        ["null-aio"] = ["size", "latency-ns", "read-zeroes", "filename"],
    };

    /// <summary>Opens the node a json:/protocol name or an --image-opts string describes (one layer: the format,
    /// probed unless named, over its protocol node). Errors read "Could not open 'NAME': reason" as in QEMU.</summary>
    public static BlockImage OpenSpec(string name, BlockOptions? options, string? format, bool readOnly,
        ImageLocking locking = ImageLocking.Off, bool isBacking = false)
    {
        try
        {
            return OpenNode(options ?? TopOptions(name), format, readOnly, locking, isBacking);
        }
        catch (ImageFormatException e)
        {
            throw new BlockException($"Could not open '{name}': {e.Message}");
        }
        catch (BlockException e) when (e is not Bitmaps.BitmapException)
        {
            throw new BlockException($"Could not open '{name}': {e.Message}");
        }
    }

    /// <summary>Opens the chain an --image-opts string (or a json: name) describes; backing files as QEMU finds them,
    /// unless the options say "backing": null.</summary>
    public static BlockImage OpenSpecChain(string name, BlockOptions options, string? format = null, bool readOnly = true,
        bool openBacking = true, ImageLocking locking = ImageLocking.Off)
    {
        if (locking == ImageLocking.ForceShare && !readOnly) throw new BlockException("force-share=on can only be used with read-only images");
        var image = OpenSpec(name, options, format, readOnly, locking);
        if (!openBacking || NoBacking(options) || image.BackingFileName is not { } backing) return image;
        try
        {
            // backing.* options describe the backing node themselves (its file, its key secret).
            var backingOptions = options.Child("backing");
            if (backingOptions.HasChild("file") || backingOptions["driver"] is not null)
            {
                image.ReplaceBacking(OpenSpecChain(backing, backingOptions, image.BackingFormat, readOnly: true, openBacking: true,
                    locking == ImageLocking.Stable ? ImageLocking.Normal : locking));
                return image;
            }
            string backingPath = ResolveBackingPath(HostPathOf(options) ?? "", backing);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            if (HostPathOf(options) is { } top) seen.Add(Path.GetFullPath(top));
            image.ReplaceBacking(OpenLayer(backingPath, image.BackingFormat, readOnly: true, openBacking: true, seen, 1,
                locking == ImageLocking.Stable ? ImageLocking.Normal : locking));
            return image;
        }
        catch (BackingChainException)
        {
            image.Dispose();
            throw;
        }
        catch (BlockException e)
        {
            image.Dispose();
            throw new BackingChainException(BackingFailed + e.Message);
        }
    }

    /// <summary>The options of the top node a filename names: a json: name says them all; a protocol name
    /// (file:, blkdebug:, nbd://, null-co://) names the protocol node, with the format probed above it.</summary>
    public static BlockOptions TopOptions(string name)
    {
        var parsed = BlockSpec.FromFilename(name);
        if (BlockSpec.ProtocolOf(name) == "json") return parsed;
        return new BlockOptions(parsed.Values.Select(kv => KeyValuePair.Create("file." + kv.Key, kv.Value)));
    }

    /// <summary>The name QEMU shows for an image (qemu-img info's "image:"): a json: or option string that only
    /// names a host file under a format shows as that file, "file:PATH" as PATH; anything else as given.</summary>
    public static string DisplayName(string name, BlockOptions? options = null)
    {
        try
        {
            options ??= BlockSpec.IsSpecial(name) ? TopOptions(name) : null;
        }
        catch (BlockException)
        {
            return name;
        }
        if (options is null) return name;
        var nbd = options["driver"] == "nbd" ? options
            : options["file.driver"] == "nbd" && options["driver"] is null or "raw" && options.TopLevelKeys.All(k => k is "driver" or "file") ? options.Child("file")
            : null;
        if (nbd is not null) return NbdDisplayName(nbd) ?? name;
        if (options["driver"] == "blkdebug" && !options.HasChild("inject-error") && !options.HasChild("set-state"))
        {
            var image = options.Child("image");
            string? inner = options["x-image"] ?? image["driver"] switch { "null-co" => "null-co://", "file" => image["filename"], _ => null };
            if (inner is not null) return $"blkdebug:{options["config"]}:{inner}";
        }
        // A qcow2 data-file child does not change the name (QEMU names the node after its metadata file).
        var plain = options.Values.Keys.Where(k => k is not ("driver" or "file.driver" or "file.filename" or "filename" or "backing"
            or "force-share" or "data-file.driver" or "data-file.filename")).ToList();
        if (plain.Count == 0 && options["driver"] == "null-co") return "null-co://";
        bool fileBelow = options["file.driver"] is null or "file" && options["driver"] is null or "qcow2" or "raw";
        if (plain.Count == 0 && fileBelow && (options["file.filename"] ?? options["filename"]) is { } file) return Unprefixable(file);
        if (plain.Count == 0 && options["driver"] == "file" && options["filename"] is { } direct) return Unprefixable(direct);
        // A format node with options of its own (an encrypted image's key secret) over a host file: QEMU names it by
        // all its options, as a json: filename.
        if (!BlockSpec.IsSpecial(name) && options["driver"] is "qcow2" && options["file.filename"] is not null &&
            plain.All(k => k.StartsWith("encrypt.", StringComparison.Ordinal)))
            return "json:" + Formats.Json.QemuJson.Compact(JsonOptions(options));
        return name;
    }

    /// <summary>A host file whose name would read as a protocol prefix ("image:top.qcow2") is shown as QEMU shows
    /// it, "./image:top.qcow2", so that the name can be given back as it is.</summary>
    private static string Unprefixable(string file)
    {
        int colon = file.IndexOf(':'), slash = file.IndexOf('/');
        return colon > 0 && (slash < 0 || colon < slash) ? "./" + file : file;
    }

    /// <summary>Options as the nested dictionary of a json: filename: the file child a dictionary of its own.</summary>
    private static Formats.Json.QDict JsonOptions(BlockOptions options)
    {
        var dict = new Formats.Json.QDict();
        foreach (var (key, value) in options.Values)
            if (!key.StartsWith("file.", StringComparison.Ordinal)) dict.Add(key, value);
        var file = new Formats.Json.QDict();
        foreach (var (key, value) in options.Child("file").Values) file.Add(key, value);
        if (file["driver"] is null) file.Add("driver", "file");
        return dict.Add("file", file);
    }

    /// <summary>How QEMU names an NBD node: nbd://HOST:PORT[/EXPORT] or nbd+unix://[/EXPORT]?socket=PATH.</summary>
    private static string? NbdDisplayName(BlockOptions nbd)
    {
        var server = nbd.Child("server");
        string export = nbd["export"] is { Length: > 0 } e ? "/" + e : "";
        if ((server["path"] ?? nbd["path"]) is { } path) return $"nbd+unix://{export}?socket={path}";
        if ((server["host"] ?? nbd["host"]) is { } host) return $"nbd://{host}:{server["port"] ?? nbd["port"] ?? "10809"}{export}";
        return null;
    }

    /// <summary>"backing": null in a json: name or backing=null... keeps the backing file closed.</summary>
    private static bool NoBacking(BlockOptions options) => options.Contains("backing") && options["backing"] is null;

    /// <summary>The host file at the bottom of a node's options (through file, image and x-image), or null (nbd, null-co).</summary>
    public static string? HostPathOf(BlockOptions options)
    {
        for (int depth = 0; depth < 16; depth++)
        {
            switch (options["driver"])
            {
                case "file" or "host_device":
                    return options["filename"];
                case "blkdebug":
                    options = BlkdebugImage(options);
                    continue;
                case "nbd" or "null-co" or "null-aio":
                    return null;
                default:
                    if (options.HasChild("file")) options = FileChild(options.Child("file"));
                    else if (options["filename"] is { } f) options = BlockSpec.FromFilename(f);
                    else return null;
                    continue;
            }
        }
        return null;
    }

    /// <summary>blkdebug's image: the x-image filename (from "blkdebug:CONF:IMAGE") and the image.* options together,
    /// as QEMU opens a child from a filename plus options.</summary>
    private static BlockOptions BlkdebugImage(BlockOptions options)
    {
        var image = options.Child("image");
        if (options["x-image"] is not { } x) return FileChild(image);
        if (image["driver"] is null) return FileChild(new BlockOptions(image.Values.Append(KeyValuePair.Create("filename", (string?)x))));
        return WithFilename(image, x);
    }

    /// <summary>Options given with a filename (qemu-io's <c>open -o OPTIONS NAME</c>): a json: name adds its options;
    /// under a protocol driver the name is that protocol's (blkdebug::IMAGE); otherwise it names the file below.</summary>
    public static BlockOptions WithFilename(BlockOptions given, string filename)
    {
        BlockOptions parsed;
        if (BlockSpec.ProtocolOf(filename) == "json") parsed = BlockSpec.FromFilename(filename);
        else if (given["driver"] is { } driver && Array.IndexOf(ProtocolDrivers, driver) >= 0)
            parsed = new BlockOptions(BlockSpec.FromFilename(filename).Values.Where(kv => kv.Key != "driver"));
        else parsed = TopOptions(filename);
        return new BlockOptions(given.Values.Concat(parsed.Values.Where(kv => !given.Contains(kv.Key))));
    }

    /// <summary>A child's options: without a driver, its filename names the protocol (file.filename=nbd://…).</summary>
    private static BlockOptions FileChild(BlockOptions child)
    {
        if (child["driver"] is not null || child["filename"] is not { } filename) return child;
        var parsed = BlockSpec.FromFilename(filename);
        return new BlockOptions(parsed.Values.Concat(child.Values.Where(kv => kv.Key != "filename" && !parsed.Contains(kv.Key))));
    }

    private static void CheckOptions(string driver, BlockOptions options)
    {
        if (!DriverOptions.TryGetValue(driver, out var known)) throw new BlockException($"Unknown driver '{driver}'");
        foreach (var key in options.TopLevelKeys)
        {
            if (CommonOptions.Contains(key) || known.Contains(key)) continue;
            // The rest of the key ("bogus" of "file.bogus") is reported by the node it belongs to.
            throw new BlockException(Array.IndexOf(ProtocolDrivers, driver) >= 0
                ? $"Block protocol '{driver}' doesn't support the option '{key}'"
                : $"Block format '{driver}' does not support the option '{key}'");
        }
    }

    private static BlockImage OpenNode(BlockOptions options, string? format, bool readOnly, ImageLocking locking, bool isBacking)
    {
        string? driver = options["driver"];
        if (driver is null && options["filename"] is null && !options.HasChild("file"))
            throw new BlockException("A block device must be specified for \"file\"");
        // A protocol named as the top node is the image itself (QEMU shows it as "file format: file").
        if (driver is not null && Array.IndexOf(ProtocolDrivers, driver) >= 0 && format is null)
        {
            CheckOptions(driver, options);
            return OpenProtocol(options, readOnly, locking, isBacking, asTop: true);
        }
        driver ??= format;
        if (driver is not null) CheckOptions(driver, options);
        if (driver is not (null or "qcow2" or "raw")) throw new BlockException($"Unknown driver '{driver}'");
        if (options["file"] is { } reference) throw new BlockException($"Cannot find device='{reference}' nor node-name='{reference}'");
        BlockOptions fileOptions;
        if (options.HasChild("file")) fileOptions = FileChild(options.Child("file"));
        else if (options["filename"] is { } f) fileOptions = BlockSpec.FromFilename(f);
        else throw new BlockException("A block device must be specified for \"file\"");
        if (fileOptions["driver"] is not { } fileDriver) throw new BlockException("A block device must be specified for \"file\"");
        CheckOptions(fileDriver, fileOptions);
        var protocol = OpenProtocol(fileOptions, readOnly, locking, isBacking, asTop: false);
        if (protocol is not RawImage { File: var file })
        {
            // nbd and null-co carry raw data; Strata reads qcow2 only from host files.
            if (driver is null or "raw") return new RawOverNode(protocol);
            protocol.Dispose();
            throw new BlockException($"Strata opens {driver} images only over host files, not over '{fileDriver}'");
        }
        try
        {
            if (driver is null)
            {
                Span<byte> head = stackalloc byte[8];
                file.Read(0, head);
                driver = Qcow2Header.HasMagic(head) ? "qcow2" : "raw";
            }
            if (fileOptions.Flag("locking", true)) file.SetLockClaim(ClaimFor(driver, readOnly, locking, isBacking));
            if (driver != "qcow2") return new RawImage(file);
            var dataFile = DataFileChild(options, readOnly, locking, isBacking);
            try
            {
                return Qcow2Image.Open(file, new Qcow2OpenOptions
                {
                    DataFile = dataFile, KeySecret = KeySecret(options),
                    // An implicit data file locks as its image's file does; a data-file child by its own locking option.
                    DataFileLockClaim = (options.HasChild("data-file") ? FileChild(options.Child("data-file")) : fileOptions).Flag("locking", true)
                        ? DataFileClaimFor(readOnly, locking, isBacking) : LockClaim.None,
                });
            }
            catch
            {
                dataFile?.Dispose();
                throw;
            }
        }
        catch
        {
            file.Dispose();
            throw;
        }
    }

    /// <summary>A qcow2 node's data-file child (data-file.filename=…), opened as a host file; null when not given.</summary>
    private static HostFile? DataFileChild(BlockOptions options, bool readOnly, ImageLocking locking, bool isBacking)
    {
        if (options["data-file"] is { } reference) throw new BlockException($"Cannot find device='{reference}' nor node-name='{reference}'");
        if (!options.HasChild("data-file")) return null;
        var child = FileChild(options.Child("data-file"));
        if (child["driver"] is not { } driver) throw new BlockException("A block device must be specified for \"data-file\"");
        CheckOptions(driver, child);
        var node = OpenProtocol(child, readOnly, locking, isBacking, asTop: false);
        if (node is RawImage { File: var file }) return file;
        node.Dispose();
        throw new BlockException($"Strata opens qcow2 data files only over host files, not over '{driver}'");
    }

    /// <summary>The lookup of the secret an encrypted image's encrypt.key-secret names (null when none is named).</summary>
    private static Func<byte[]>? KeySecret(BlockOptions options) => options["encrypt.key-secret"] is { } id ? () => Secrets.Get(id) : null;

    /// <summary>Opens a protocol node. Host files come back as a RawImage over the file (blkdebug's rules set on
    /// it), so that a format can be put on top of that file.</summary>
    private static BlockImage OpenProtocol(BlockOptions options, bool readOnly, ImageLocking locking, bool isBacking, bool asTop)
    {
        string driver = options["driver"]!;
        switch (driver)
        {
            case "file" or "host_device":
            {
                string path = options["filename"] ?? throw new BlockException("The 'file' block driver requires a file name");
                var file = HostFile.Open(path, readOnly);
                if (asTop && options.Flag("locking", true)) file.SetLockClaim(ClaimFor("raw", readOnly, locking, isBacking));
                return new RawImage(file, asTop ? "file" : "raw");
            }
            case "blkdebug":
            {
                string? config = options["config"];
                string? text = null;
                if (config is not null)
                {
                    try
                    {
                        text = File.ReadAllText(config);
                    }
                    catch (Exception e) when (e is IOException or UnauthorizedAccessException)
                    {
                        throw new BlockException($"Could not read blkdebug config file: {(e is UnauthorizedAccessException ? "Permission denied" : "No such file or directory")}");
                    }
                }
                var faults = Blkdebug.FromOptions(text, options);
                var imageOptions = BlkdebugImage(options);
                if (imageOptions["driver"] is null) throw new BlockException("A block device must be specified for \"image\"");
                if (imageOptions["driver"] is not ("file" or "host_device" or "blkdebug"))
                {
                    // Without rules blkdebug only passes requests on, so any node may sit under it; rules need a host file.
                    if (asTop && faults.IsEmpty) return OpenNode(imageOptions, null, readOnly, locking, isBacking);
                    throw new BlockException($"Strata's blkdebug runs only over host files, not over '{imageOptions["driver"]}'");
                }
                var inner = (RawImage)OpenProtocol(imageOptions, readOnly, locking, isBacking, asTop: false);
                inner.File.Faults = faults;
                if (asTop) inner.File.SetLockClaim(ClaimFor("raw", readOnly, locking, isBacking));
                return asTop ? new RawImage(inner.File, "blkdebug") : inner;
            }
            case "nbd":
            {
                var server = options.Child("server");
                string? path = server["path"] ?? options["path"];
                string? host = server["host"] ?? options["host"];
                string? portText = server["port"] ?? options["port"];
                if (path is null && host is null) throw new BlockException("NBD server address missing");
                int port = 10809;
                if (portText is not null && (!int.TryParse(portText, out port) || port is < 0 or > 65535))
                    throw new BlockException($"address resolution failed for {host}:{portText}: Servname not supported for ai_socktype");
                var connect = NbdConnector ?? throw new BlockException("Unknown driver 'nbd'");
                return connect(path, host, port, options["export"] ?? "", readOnly, options["x-dirty-bitmap"]);
            }
            case "ssh":
            {
                // Strata has no SSH client: the server is only reached, so that a wrong address gets QEMU's answer.
                string host = options["server.host"] ?? options["host"] ?? throw new BlockException("Parameter 'server.host' is missing");
                string portText = options["server.port"] ?? options["port"] ?? "22";
                if (!int.TryParse(portText, System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out int port))
                    throw new BlockException("Parameter 'port' expects a number");
                try
                {
                    using var probe = new System.Net.Sockets.TcpClient();
                    probe.Connect(host, port);
                }
                catch (System.Net.Sockets.SocketException e)
                {
                    string reason = e.SocketErrorCode == System.Net.Sockets.SocketError.ConnectionRefused ? "Connection refused" : e.Message;
                    throw new BlockException($"Failed to connect to '{host}:{port}': {reason}");
                }
                catch (ArgumentOutOfRangeException)
                {
                    throw new BlockException($"Failed to connect to '{host}:{port}': Invalid argument");
                }
                throw new BlockException("Strata has no ssh driver");
            }
            case "null-co" or "null-aio":
            {
                long size = 1L << 30;
                if (options["size"] is { } sizeText && !long.TryParse(sizeText, out size))
                    throw new BlockException("Parameter 'size' expects a non-negative number below 2^64");
                return new NullImage(size, readOnly, options.Flag("read-zeroes", false));
            }
            default:
                throw new BlockException($"Unknown driver '{driver}'");
        }
    }

    /// <summary>The layers of a chain from the top (depth 0) down.</summary>
    public static IReadOnlyList<BlockImage> Layers(BlockImage top)
    {
        var list = new List<BlockImage>();
        for (var i = top; i is not null; i = i.Backing) list.Add(i);
        return list;
    }
}
