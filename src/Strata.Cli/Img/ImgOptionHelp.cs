using System.Text;
using Strata.Block;

namespace Strata.Cli.Img;

/// <summary>
/// qemu-img's <c>-o help</c> (or <c>-o ?</c>, alone or among other options): the options a format takes for
/// create/convert, merged with the file protocol's once a target file is named, and those amend takes — listed in
/// qemu-img's layout, so scripts that read them (and QEMU's own tests) see what they expect.
/// </summary>
internal static class ImgOptionHelp
{
    private sealed record Entry(string Name, string Type, string Help);

    private static readonly Entry Size = new("size", "size", "Virtual disk size");

    private static readonly Entry[] Qcow2Create =
    [
        new("backing_file", "str", "File name of a base image"),
        new("backing_fmt", "str", "Image format of the base image"),
        new("cluster_size", "size", "qcow2 cluster size"),
        new("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        new("compression_type", "str", "Compression method used for image cluster compression"),
        new("data_file", "str", "File name of an external data file"),
        new("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
        new("encrypt.cipher-alg", "str", "Name of encryption cipher algorithm"),
        new("encrypt.cipher-mode", "str", "Name of encryption cipher mode"),
        new("encrypt.format", "str", "Encrypt the image, format choices: 'aes', 'luks'"),
        new("encrypt.hash-alg", "str", "Name of encryption hash algorithm"),
        new("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
        new("encrypt.ivgen-alg", "str", "Name of IV generator algorithm"),
        new("encrypt.ivgen-hash-alg", "str", "Name of IV generator hash algorithm"),
        new("encrypt.key-secret", "str", "ID of secret providing qcow AES key or LUKS passphrase"),
        new("encryption", "bool (on/off)", "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
        new("extended_l2", "bool (on/off)", "Extended L2 tables"),
        new("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
        new("preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"),
        new("refcount_bits", "num", "Width of a reference count entry in bits"),
        Size,
    ];

    private static readonly Entry[] Qcow2Amend =
    [
        new("backing_file", "str", "File name of a base image"),
        new("backing_fmt", "str", "Image format of the base image"),
        new("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
        new("data_file", "str", "File name of an external data file"),
        new("data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"),
        new("encrypt.iter-time", "num", "Time to spend in PBKDF in milliseconds"),
        new("encrypt.keyslot", "num", "Select a single keyslot to modify explicitly"),
        new("encrypt.new-secret", "str", "New secret to set in the matching keyslots. Empty string to erase"),
        new("encrypt.old-secret", "str", "Select all keyslots that match this password"),
        new("encrypt.state", "str", "Select new state of affected keyslots (active/inactive)"),
        new("lazy_refcounts", "bool (on/off)", "Postpone refcount updates"),
        new("refcount_bits", "num", "Width of a reference count entry in bits"),
        Size,
    ];

    private static readonly Entry[] FileProtocol =
    [
        new("extent_size_hint", "size", "Extent size hint for the image file, 0 to disable"),
        new("nocow", "bool (on/off)", "Turn off copy-on-write (valid only on btrfs)"),
        new("preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"),
        Size,
    ];

    /// <summary>Whether any -o value asks for help: an element "help" or "?" between unescaped commas (",," is a
    /// comma inside a value, so "backing_file=a,,help" names a file).</summary>
    public static bool Requested(IEnumerable<string> optionValues)
    {
        foreach (var value in optionValues)
            foreach (var element in SplitUnescaped(value))
                if (element is "help" or "?") return true;
        return false;
    }

    /// <summary>qemu-img refuses an -o value that is empty, starts with a comma or ends in an odd run of commas (a
    /// dangling separator), before it looks at anything else.</summary>
    public static void CheckLists(IEnumerable<string> optionValues)
    {
        foreach (var value in optionValues)
        {
            int trailing = value.Length - value.TrimEnd(',').Length;
            if (value.Length == 0 || value[0] == ',' || trailing % 2 == 1)
                throw new BlockException($"Invalid option list: {value}");
        }
    }

    /// <summary>The elements of a QEMU option string: split at single commas, ",," kept as one comma.</summary>
    public static IEnumerable<string> SplitUnescaped(string value)
    {
        var current = new StringBuilder();
        for (int i = 0; i < value.Length; i++)
        {
            if (value[i] != ',') current.Append(value[i]);
            else if (i + 1 < value.Length && value[i + 1] == ',') { current.Append(','); i++; }
            else { yield return current.ToString(); current.Clear(); }
        }
        yield return current.ToString();
    }

    /// <summary>Formats qemu-img knows but cannot create (read-only formats, filters, network clients).</summary>
    private static readonly HashSet<string> NotCreatable =
    [
        "blkdebug", "blklogwrites", "blkverify", "bochs", "cloop", "compress", "copy-before-write", "copy-on-read", "dmg", "ftp",
        "ftps", "http", "https", "nbd", "null-aio", "null-co", "nvme", "preallocate", "quorum", "replication", "snapshot-access",
        "throttle", "vvfat",
    ];

    /// <summary>create/convert: the format's options, with the file protocol's merged in when a file is named.</summary>
    public static string ForCreate(string format, bool fileNamed)
    {
        if (NotCreatable.Contains(format)) throw new BlockException($"Format driver '{format}' does not support image creation");
        var own = format == "qcow2" ? Qcow2Create : [Size];
        var sb = new StringBuilder();
        if (!fileNamed)
        {
            sb.Append($"Supported {format} options:\n");
            Append(sb, own);
            sb.Append("\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n");
            return sb.ToString();
        }
        // The format's own entry wins where both define a name; the list is sorted by name.
        var merged = own.Concat(FileProtocol.Where(p => own.All(o => o.Name != p.Name))).OrderBy(e => e.Name, StringComparer.Ordinal);
        sb.Append("Supported options:\n");
        Append(sb, merged);
        return sb.ToString();
    }

    /// <summary>amend: the qcow2 options that can change on an existing image; null for a format that has none.</summary>
    public static string? ForAmend(string format)
    {
        if (format != "qcow2") return null;
        var sb = new StringBuilder($"Amend options for '{format}':\n");
        Append(sb, Qcow2Amend);
        return sb.ToString();
    }

    private static void Append(StringBuilder sb, IEnumerable<Entry> entries)
    {
        foreach (var e in entries)
            sb.Append("  ").Append($"{e.Name}=<{e.Type}>".PadRight(22)).Append(" - ").Append(e.Help).Append('\n');
    }
}
