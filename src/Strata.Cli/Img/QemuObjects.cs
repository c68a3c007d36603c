using Strata.Block;

namespace Strata.Cli.Img;

/// <summary>
/// qemu-img's and qemu-io's <c>--object</c>: user-creatable objects given as key=value strings. Only secrets mean
/// something to Strata (the keys of encrypted images); a definition is checked the way QEMU checks it (the same
/// messages for a bad one) and a secret is then defined for <c>encrypt.key-secret</c> to name.
/// </summary>
internal static class QemuObjects
{
    /// <summary>Object types QEMU's tools create from --object; only secrets make sense to Strata.</summary>
    private static readonly string[] KnownTypes =
        ["secret", "secret_keyring", "iothread", "throttle-group", "tls-creds-anon", "tls-creds-psk", "tls-creds-x509", "tls-cipher-suites",
         "authz-simple", "authz-list", "authz-listfile", "authz-pam", "memory-backend-file", "memory-backend-ram", "memory-backend-memfd"];

    /// <summary>Checks one definition and defines its secret; throws a <see cref="BlockException"/> with QEMU's
    /// message when it is wrong. <paramref name="seenIds"/> collects the ids of one command line (a duplicate is refused).</summary>
    public static void Define(string definition, ISet<string> seenIds)
    {
        var options = BlockSpec.FromKeyValues(definition, impliedKey: "qom-type");
        string type = options["qom-type"] ?? throw new BlockException("Parameter 'qom-type' is missing");
        if (Array.IndexOf(KnownTypes, type) < 0) throw new BlockException($"Parameter 'qom-type' does not accept value '{type}'");
        string id = options["id"] ?? throw new BlockException("Parameter 'id' is missing");
        if (id.Length == 0 || !char.IsAsciiLetter(id[0]) || !id.All(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' or '.'))
            throw new BlockException("Parameter 'id' expects an identifier");
        if (type != "secret") throw new BlockException($"invalid object type: {type}");
        foreach (var key in options.Values.Keys)
            if (key is not ("qom-type" or "id" or "data" or "file" or "format" or "keyid" or "iv" or "loaded"))
                throw new BlockException($"Parameter '{key}' is unexpected");
        if (options["format"] is { } format and not ("raw" or "base64"))
            throw new BlockException($"Parameter 'format' does not accept value '{format}'");
        string? data = options["data"], file = options["file"];
        if (data is not null && file is not null) throw new BlockException("'file' and 'data' are mutually exclusive");
        if (data is null && file is null) throw new BlockException("Either 'file' or 'data' must be provided");
        if (file is not null && !File.Exists(file))
            throw new BlockException($"Unable to read {file}: Failed to open file \u201c{file}\u201d: No such file or directory");
        if (!seenIds.Add(id)) throw new BlockException($"attempt to add duplicate property '{id}' to object (type 'container')");
        byte[] value = file is not null ? File.ReadAllBytes(file) : System.Text.Encoding.UTF8.GetBytes(data!);
        if (options["format"] == "base64")
        {
            try
            {
                value = Convert.FromBase64String(System.Text.Encoding.ASCII.GetString(value));
            }
            catch (FormatException)
            {
                throw new BlockException("Invalid base64 data");
            }
        }
        Secrets.Define(id, value);
    }
}
