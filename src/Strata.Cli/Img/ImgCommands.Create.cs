using System.CommandLine;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img create`: qemu-img create's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command CreateCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var backing = LastWins("-b", "backing file");
        var backingFormat = LastWins("-F", "backing file format");
        var opts = new Option<string[]>("-o") { Description = "format options (cluster_size=…,compression_type=…,refcount_bits=…)", AllowMultipleArgumentsPerToken = false };
        var quiet = QuietOption();
        var unsafeBacking = new Option<bool>("-u") { Description = "do not open the backing file" };
        // qemu-img 7.2 always creates data_file anew, which empties an existing raw disk; QEMU adopts one only through
        // blockdev-create. This is the offline way to do that.
        var adopt = new Option<bool>("--adopt-data-file")
        {
            Description = "(Strata) keep an existing data_file's bytes: with -o data_file=DISK,data_file_raw=on the new qcow2 holds only " +
                          "metadata over DISK, which is never truncated or zeroed; SIZE defaults to DISK's size (qemu-img would overwrite DISK)",
        };
        var file = new Argument<string?>("filename") { Arity = ArgumentArity.ZeroOrOne };
        var size = new Argument<string?>("size") { Arity = ArgumentArity.ZeroOrOne };
        var cmd = new Command("create", "Create a new image") { format, backing, backingFormat, opts, quiet, unsafeBacking, adopt, file, size };
        cmd.SetAction(r => Run(stderr, () =>
        {
            // -o help lists the options, with the file protocol's once a file is named; no file is created.
            ImgOptionHelp.CheckLists(r.GetValue(opts) ?? []);
            if (ImgOptionHelp.Requested(r.GetValue(opts) ?? []))
            {
                stdout.Write(ImgOptionHelp.ForCreate(r.GetValue(format) ?? "raw", fileNamed: r.GetValue(file) is not null));
                return 0;
            }
            string target = r.GetValue(file) ?? throw new UsageException("Expecting image file name");
            return Create(stdout, target, r.GetValue(format) ?? "raw", r.GetValue(backing), r.GetValue(backingFormat),
                r.GetValue(opts) ?? [], r.GetValue(size), r.GetValue(quiet), r.GetValue(unsafeBacking), r.GetValue(adopt));
        }));
        return cmd;
    }

    internal static int Create(TextWriter stdout, string file, string format, string? backing, string? backingFormat, string[] options, string? sizeText, bool quiet, bool unsafeBacking,
        bool adoptDataFile = false)
    {
        if (format == "luks") return CreateLuks(stdout, file, options, sizeText, quiet);
        if (format is not ("qcow2" or "raw" or "file")) throw new BlockException($"{file}: Unknown file format '{format}'");
        // -f file is the protocol driver itself: a plain file, as raw, under its own name in the Formatting line.
        string shownFormat = format;
        if (format == "file") format = "raw";
        var kv = ParseOptions(options, file);
        // "file:NAME" names the host file NAME outright (a colon later in NAME is then just a character); messages
        // keep the name as given.
        string path = file.StartsWith("file:", StringComparison.Ordinal) ? file["file:".Length..] : file;
        long clusterSize = 65536;
        var compression = Qcow2CompressionType.Deflate;
        string refcountBitsText = "16";
        string? compat = null, lazyRefcounts = null, preallocation = null, dataFile = null, dataFileRaw = null, extendedL2 = null;
        var encrypt = new Dictionary<string, string>(StringComparer.Ordinal);
        long? size = null, extentSizeHint = null;
        if (sizeText is not null)
        {
            if (!SizeText.TryParse(sizeText, out long s))
                throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
            size = s;
        }
        foreach (var (key, value) in kv)
        {
            switch (key)
            {
                case "cluster_size" when format == "qcow2":
                    // A number is an option-parsing matter; whether it is a usable cluster size the driver judges,
                    // after the Formatting line (as in qemu-img).
                    if (!SizeText.TryParse(value, out long cs))
                        throw new BlockException($"{file}: Parameter 'cluster_size' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.");
                    clusterSize = cs;
                    break;
                case "compression_type" when format == "qcow2":
                    compression = value switch
                    {
                        "zlib" => Qcow2CompressionType.Deflate,
                        "zstd" => Qcow2CompressionType.Zstd,
                        _ => throw new BlockException($"{file}: Parameter 'compression_type' does not accept value '{value}'"),
                    };
                    break;
                case "refcount_bits" when format == "qcow2":
                    // Whether the width is usable the driver judges, after the Formatting line (as in qemu-img).
                    refcountBitsText = value;
                    break;
                case "compat" when format == "qcow2":
                    compat = value;
                    break;
                case "lazy_refcounts" when format == "qcow2":
                    if (value is not ("on" or "off" or "true" or "false"))
                        throw new BlockException($"{file}: Parameter 'lazy_refcounts' expects 'on' or 'off'");
                    lazyRefcounts = value;
                    break;
                case "preallocation":
                    preallocation = value;
                    break;
                case "extended_l2" when format == "qcow2":
                    if (!BoolOptionValue(value).HasValue)
                        throw new BlockException($"{file}: Parameter 'extended_l2' expects 'on' or 'off'");
                    extendedL2 = value;
                    break;
                case "encryption" or "encrypt.format" or "encrypt.key-secret" or "encrypt.cipher-alg" or "encrypt.cipher-mode"
                    or "encrypt.ivgen-alg" or "encrypt.ivgen-hash-alg" or "encrypt.hash-alg" or "encrypt.iter-time" when format == "qcow2":
                    encrypt[key] = value;
                    break;
                case "backing_file" when format == "qcow2":
                    backing = value;
                    break;
                case "backing_fmt" when format == "qcow2":
                    backingFormat = value;
                    break;
                case "data_file" when format == "qcow2":
                    dataFile = value;
                    break;
                case "data_file_raw" when format == "qcow2":
                    if (value is not ("on" or "off" or "true" or "false"))
                        throw new BlockException($"{file}: Parameter 'data_file_raw' expects 'on' or 'off'");
                    dataFileRaw = value;
                    break;
                case "extent_size_hint":
                    // The file driver's hint for btrfs-like extent sizes; on other file systems it does nothing.
                    if (!SizeText.TryParse(value, out long hint))
                        throw new BlockException($"{file}: Parameter 'extent_size_hint' expects a non-negative number below 2^64\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.");
                    extentSizeHint = hint;
                    break;
                case "size":
                    if (!SizeText.TryParse(value, out long os)) throw new BlockException($"{file}: Parameter 'size' expects a size");
                    size = os;
                    break;
                default:
                    throw new BlockException($"{file}: Invalid parameter '{key}'");
            }
        }
        if (backing is not null && format != "qcow2")
            throw new BlockException($"{file}: Backing file not supported for file format '{format}'");
        if (backing is not null)
        {
            // As qemu-img 7.2's bdrv_img_create: unless -u with a size, the backing chain is opened first (probing
            // when no format is given), and only then is a missing backing format an error.
            if (!unsafeBacking || size is null)
            {
                if (backingFormat is not null && !QemuFormatNames.Contains(backingFormat))
                    throw new BlockException($"{file}: Unknown driver '{backingFormat}'\nCould not open backing image.");
                string backingPath = ImageOpener.ResolveBackingPath(path, backing);
                try
                {
                    using var b = ImageOpener.Open(backingPath, backingFormat);
                    if (backingFormat is null)
                        throw new BlockException($"{file}: Backing file specified without backing format\nDetected format of {b.FormatName}.");
                    size ??= b.Size;
                }
                catch (BlockException e) when (!e.Message.StartsWith(file + ": ", StringComparison.Ordinal))
                {
                    // The opener words its errors as qemu-img's own open does ("Could not open 'B': …"); here QEMU
                    // reports the block layer's error bare.
                    string prefix = $"Could not open '{backingPath}': ";
                    string reason = e.Message.StartsWith(prefix, StringComparison.Ordinal) ? e.Message[prefix.Length..] : e.Message;
                    throw new BlockException($"{file}: {reason}\nCould not open backing image.");
                }
            }
            else if (backingFormat is null)
                throw new BlockException($"{file}: Backing file specified without backing format");
        }
        if (adoptDataFile) size = AdoptedDiskSize(file, format, dataFile, dataFileRaw, preallocation, size);
        if (size is null) throw new BlockException($"{file}: Image creation needs a size parameter");
        if (!quiet)
        {
            string prealloc = preallocation is null ? "" : $" preallocation={preallocation}";
            string hint = extentSizeHint is null ? "" : $" extent_size_hint={extentSizeHint}";
            string line = format == "raw"
                ? $"Formatting '{file}', fmt={shownFormat} size={size}{prealloc}{hint}"
                : $"Formatting '{file}', fmt=qcow2{EncryptionOptionsText(encrypt)} cluster_size={clusterSize} extended_l2={extendedL2 ?? "off"}{prealloc} compression_type={(compression == Qcow2CompressionType.Zstd ? "zstd" : "zlib")} size={size}" +
                  (compat is null ? "" : $" compat={compat}") +
                  (backing is null ? "" : $" backing_file={backing.Replace(",", ",,")} backing_fmt={backingFormat}") +
                  (dataFile is null ? "" : $" data_file={dataFile.Replace(",", ",,")}") +
                  (dataFileRaw is null ? "" : $" data_file_raw={dataFileRaw}") +
                  $" lazy_refcounts={lazyRefcounts ?? "off"} refcount_bits={refcountBitsText}{hint}";
            stdout.WriteLine(line);
        }
        if (backingFormat is not null && !QemuFormatNames.Contains(backingFormat))
            throw new BlockException($"{file}: Parameter 'backing-fmt' does not accept value '{backingFormat}'");
        if (!int.TryParse(refcountBitsText, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int refcountBits)
            || refcountBits is not (1 or 2 or 4 or 8 or 16 or 32 or 64))
            throw new BlockException($"{file}: Refcount width must be a power of two and may not exceed 64 bits");
        if (format == "qcow2" && (clusterSize < 512 || clusterSize > 2 << 20 || (clusterSize & (clusterSize - 1)) != 0))
            throw new BlockException($"{file}: Cluster size must be a power of two between 512 and 2048k");
        if (extentSizeHint > uint.MaxValue) throw new BlockException($"{file}: Extent size hint is too large");
        // The line above shows the size as given; the image gets it rounded up to whole sectors, as qemu-img does.
        long sectorSize = (size.Value + 511) & ~511L;
        var preallocMode = preallocation switch
        {
            null or "off" => Preallocation.Off,
            "metadata" when format == "qcow2" => Preallocation.Metadata,
            "falloc" => Preallocation.Falloc,
            "full" => Preallocation.Full,
            "metadata" => throw new BlockException($"{file}: Unsupported preallocation mode: metadata"),
            _ => throw new BlockException($"{file}: Parameter 'preallocation' does not accept value '{preallocation}'"),
        };
        int version = compat switch
        {
            null or "1.1" or "v3" => 3,
            "0.10" or "v2" => 2,
            _ => throw new BlockException($"{file}: Parameter 'version' does not accept value '{compat}'"),
        };
        Qcow2Encryption? encryption;
        try
        {
            encryption = format == "qcow2" ? EncryptionOf(encrypt) : null;
        }
        catch (BlockException e)
        {
            throw new BlockException($"{file}: {e.Message}");
        }
        if (format == "raw")
        {
            try
            {
                using var r = RawImage.Create(path, sectorSize);
                if (preallocMode != Preallocation.Off) WriteZeros(r, sectorSize);
                r.Flush();
            }
            catch (BlockException e)
            {
                throw new BlockException($"{file}: {e.Message}");
            }
        }
        else
        {
            try
            {
                using var q = Qcow2Image.Create(path, new Qcow2CreateOptions
                {
                    Size = sectorSize,
                    ClusterSize = (int)clusterSize,
                    CompressionType = compression,
                    RefcountBits = refcountBits,
                    BackingFile = backing,
                    BackingFormat = backingFormat,
                    Version = version,
                    LazyRefcounts = lazyRefcounts is "on" or "true",
                    DataFile = dataFile,
                    DataFileRaw = dataFileRaw is "on" or "true",
                    ExtendedL2 = extendedL2 is not null && BoolOptionValue(extendedL2)!.Value,
                    Encryption = encryption,
                    AdoptDataFile = adoptDataFile,
                    DataFileLockClaim = ImageOpener.DataFileClaimFor(readOnly: false, ImageLocking.Normal),
                });
                q.Preallocate(preallocMode);
            }
            catch (BlockException e)
            {
                throw new BlockException($"{file}: {e.Message}");
            }
        }
        return 0;
    }

    /// <summary>--adopt-data-file: the disk size a new qcow2 over an existing raw disk gets (its size unless one is given),
    /// refused before anything is written when adopting could lose or hide data.</summary>
    private static long AdoptedDiskSize(string file, string format, string? dataFile, string? dataFileRaw, string? preallocation, long? size)
    {
        if (format != "qcow2" || dataFile is null || dataFileRaw is not ("on" or "true"))
            throw new BlockException($"{file}: --adopt-data-file needs -f qcow2 -o data_file=DISK,data_file_raw=on");
        // falloc and full would write zeros over the disk's data.
        if (preallocation is not (null or "off" or "metadata"))
            throw new BlockException($"{file}: --adopt-data-file keeps the data file's bytes; preallocation={preallocation} would overwrite them");
        long diskSize;
        try
        {
            using var disk = HostFile.Open(dataFile, readOnly: true);
            diskSize = disk.Length;
        }
        catch (BlockException e)
        {
            throw new BlockException($"{file}: {e.Message}");
        }
        if (diskSize % 512 != 0)
            throw new BlockException($"{file}: The data file '{dataFile}' is {diskSize} bytes, not a multiple of 512: a qcow2 disk cannot map all of it");
        if (size < diskSize)
            throw new BlockException($"{file}: The size {size} is smaller than the data file '{dataFile}' ({diskSize} bytes): the disk would not show all of it");
        return size ?? diskSize;
    }

    /// <summary>A boolean option's value as QEMU's option parser reads it (null when it is no boolean).</summary>
    private static bool? BoolOptionValue(string value) => value switch
    {
        "on" or "yes" or "true" or "y" => true,
        "off" or "no" or "false" or "n" => false,
        _ => null,
    };

    /// <summary>The encryption options qcow2's creation takes, in the order qemu-img prints them.</summary>
    private static readonly string[] EncryptionOptionOrder =
        ["encryption", "encrypt.format", "encrypt.key-secret", "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
         "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time"];

    private static string EncryptionOptionsText(Dictionary<string, string> given) =>
        string.Concat(EncryptionOptionOrder.Where(given.ContainsKey).Select(k => $" {k}={given[k]}"));

    /// <summary>How the encrypt.* options (and the legacy encryption=on) ask a new qcow2 image to be encrypted;
    /// null for no encryption. Errors are qemu-img's.</summary>
    private static Qcow2Encryption? EncryptionOf(Dictionary<string, string> given)
    {
        string? legacy = given.GetValueOrDefault("encryption");
        if (legacy is not (null or "on" or "off" or "true" or "false"))
            throw new BlockException($"Parameter 'encryption' expects 'on' or 'off'");
        bool legacyOn = legacy is "on" or "true";
        string? format = given.GetValueOrDefault("encrypt.format");
        if (legacyOn && format is not null && format != "aes")
            throw new BlockException("Encryption option 'encryption' conflicts with encrypt.format=" + format);
        format ??= legacyOn ? "aes" : null;
        if (format is null)
        {
            if (given.Keys.Any(k => k.StartsWith("encrypt.", StringComparison.Ordinal)))
                throw new BlockException("Parameter 'encrypt.format' is required");
            return null;
        }
        if (format is not ("aes" or "luks")) throw new BlockException($"Parameter 'encrypt.format' does not accept value '{format}'");
        if (format == "aes" && given.Keys.FirstOrDefault(k => k.StartsWith("encrypt.", StringComparison.Ordinal) && k is not ("encrypt.format" or "encrypt.key-secret")) is { } extra)
            throw new BlockException($"Parameter '{extra}' is unexpected");
        string secretId = given.GetValueOrDefault("encrypt.key-secret") ?? throw new BlockException("Parameter 'encrypt.key-secret' is required for cipher");
        var luks = new Strata.Formats.Crypto.LuksFormatOptions();
        if (given.GetValueOrDefault("encrypt.cipher-alg") is { } alg)
            luks = luks with { CipherAlg = alg is "aes-128" or "aes-192" or "aes-256" ? alg : throw new BlockException($"Parameter 'encrypt.cipher-alg' does not accept value '{alg}'") };
        if (given.GetValueOrDefault("encrypt.cipher-mode") is { } mode)
            luks = luks with { CipherMode = mode is "xts" or "cbc" ? mode : throw new BlockException($"Parameter 'encrypt.cipher-mode' does not accept value '{mode}'") };
        if (given.GetValueOrDefault("encrypt.ivgen-alg") is { } ivgen)
            luks = luks with { IvGenAlg = ivgen == "plain64" ? ivgen : throw new BlockException($"Parameter 'encrypt.ivgen-alg' does not accept value '{ivgen}'") };
        if (given.GetValueOrDefault("encrypt.hash-alg") is { } hash)
            luks = luks with { HashAlg = Strata.Formats.Crypto.Luks.Hash(hash) is not null ? hash : throw new BlockException($"Parameter 'encrypt.hash-alg' does not accept value '{hash}'") };
        if (given.GetValueOrDefault("encrypt.iter-time") is { } iterTime)
            luks = luks with { IterTimeMs = long.TryParse(iterTime, out long ms) && ms >= 0 ? ms : throw new BlockException("Parameter 'encrypt.iter-time' expects a number") };
        return new Qcow2Encryption(format, Secrets.Get(secretId), luks);
    }

    /// <summary>create -f luks: a bare LUKS volume (the header and key material, then the payload), as qemu-img's luks
    /// driver makes one. The payload is left sparse: nothing has been written to the volume yet.</summary>
    private static int CreateLuks(TextWriter stdout, string file, string[] options, string? sizeText, bool quiet)
    {
        var given = new Dictionary<string, string>(StringComparer.Ordinal) { ["encrypt.format"] = "luks" };
        long? size = null;
        if (sizeText is not null)
            size = SizeText.TryParse(sizeText, out long s) ? s : throw new BlockException("Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n" + Prog + ": kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        foreach (var (key, value) in ParseOptions(options, file))
        {
            if (key == "size") size = SizeText.TryParse(value, out long os) ? os : throw new BlockException($"{file}: Parameter 'size' expects a size");
            else if (Array.IndexOf(EncryptionOptionOrder, "encrypt." + key) > 0) given["encrypt." + key] = value;
            else throw new BlockException($"{file}: Invalid parameter '{key}'");
        }
        if (size is null) throw new BlockException($"{file}: Image creation needs a size parameter");
        if (!quiet)
            stdout.WriteLine($"Formatting '{file}', fmt=luks size={size}" + string.Concat(EncryptionOptionOrder.Skip(2).Where(given.ContainsKey).Select(k => $" {k["encrypt.".Length..]}={given[k]}")));
        try
        {
            var encryption = EncryptionOf(given)!;
            var (_, area, masterKey) = Strata.Formats.Crypto.Luks.Format(encryption.Secret, encryption.Luks);
            System.Security.Cryptography.CryptographicOperations.ZeroMemory(masterKey);
            using var volume = HostFile.Create(file);
            volume.Write(0, area);
            volume.SetLength(area.Length + ((size.Value + 511) & ~511L));
            volume.Flush();
        }
        catch (BlockException e)
        {
            throw new BlockException($"{file}: {e.Message.Replace("'encrypt.", "'")}");
        }
        return 0;
    }

    /// <summary>Raw falloc/full preallocation: every byte gets a disk block.</summary>
    private static void WriteZeros(BlockImage image, long size)
    {
        var zeros = new byte[Math.Min(size, 1L << 20)];
        for (long at = 0; at < size; at += zeros.Length)
            image.Write(at, zeros.AsSpan(0, (int)Math.Min(zeros.Length, size - at)));
    }

    private static List<(string Key, string Value)> ParseOptions(IEnumerable<string> options, string file)
    {
        var list = new List<(string, string)>();
        foreach (var group in options)
        {
            // ",," is a comma inside a value (a file name), as in all of QEMU's option strings.
            foreach (var part in ImgOptionHelp.SplitUnescaped(group))
            {
                if (part.Length == 0) continue;
                int eq = part.IndexOf('=');
                if (eq <= 0) throw new BlockException($"{file}: Invalid parameter '{part}'");
                list.Add((part[..eq], part[(eq + 1)..]));
            }
        }
        return list;
    }
}
