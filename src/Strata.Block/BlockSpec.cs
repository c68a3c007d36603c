using System.Globalization;
using System.Text;

namespace Strata.Block;

/// <summary>A filename or option string that does not describe a block device as QEMU reads it; the message is
/// QEMU's reason (the caller frames it with "Could not open 'NAME': ").</summary>
public sealed class BlockSpecException(string message) : BlockException(message);

/// <summary>
/// Block device options as QEMU holds them after parsing: a flat map of dotted keys ("file.filename",
/// "inject-error.0.event") to text values, null for JSON's null ("backing": null means no backing file).
/// </summary>
public sealed class BlockOptions
{
    private readonly SortedDictionary<string, string?> _values;

    public BlockOptions(IEnumerable<KeyValuePair<string, string?>> values)
    {
        _values = new SortedDictionary<string, string?>(StringComparer.Ordinal);
        foreach (var (k, v) in values) _values[k] = v;
    }

    public IReadOnlyDictionary<string, string?> Values => _values;

    public bool Contains(string key) => _values.ContainsKey(key);

    public string? this[string key] => _values.TryGetValue(key, out var v) ? v : null;

    /// <summary>The options of a child (e.g. "file"): every "CHILD.x" key as "x".</summary>
    public BlockOptions Child(string name) =>
        new(_values.Where(kv => kv.Key.StartsWith(name + ".", StringComparison.Ordinal))
            .Select(kv => KeyValuePair.Create(kv.Key[(name.Length + 1)..], kv.Value)));

    /// <summary>Whether any key lives under the child <paramref name="name"/>.</summary>
    public bool HasChild(string name) => _values.Keys.Any(k => k.StartsWith(name + ".", StringComparison.Ordinal));

    /// <summary>The names of the top-level members (the part of each key before its first dot).</summary>
    public IEnumerable<string> TopLevelKeys => _values.Keys.Select(k => k.Split('.')[0]).Distinct();

    /// <summary>QEMU's boolean spellings; <paramref name="fallback"/> when the key is absent.</summary>
    public bool Flag(string key, bool fallback) => this[key] switch
    {
        null => fallback,
        "on" or "true" or "yes" => true,
        "off" or "false" or "no" => false,
        var v => throw new BlockSpecException($"Parameter '{key}' expects 'on' or 'off'"),
    };
}

/// <summary>
/// Parses image names the way qemu-img and qemu-io take them: <c>json:{...}</c> (QEMU's JSON, single quotes
/// allowed, nested or dotted keys), protocol prefixes (<c>file:</c>, <c>blkdebug:CONF:IMAGE</c>, <c>nbd://</c>,
/// <c>nbd+unix:///EXPORT?socket=PATH</c>, <c>nbd:unix:PATH</c>, <c>null-co://</c>) and --image-opts key=value
/// strings. A filename with a protocol yields the options of that protocol node (the format above it is probed);
/// json: and key=value strings yield the options of the top node.
/// </summary>
public static class BlockSpec
{
    /// <summary>Protocols QEMU recognises in a filename prefix (those Strata does not implement are still named, so
    /// that a path like "ssh:x" is not mistaken for a relative file name).</summary>
    private static readonly string[] KnownProtocols =
        ["file", "host_device", "host_cdrom", "blkdebug", "blkverify", "nbd", "nbd+tcp", "nbd+unix", "null-co", "null-aio",
         "http", "https", "ftp", "ftps", "ssh", "iscsi", "rbd", "gluster", "nfs", "vvfat", "fat", "json"];

    /// <summary>Whether <paramref name="name"/> is more than a plain host path: a json: name or a protocol prefix
    /// (a colon before any slash, as QEMU's path_has_protocol decides).</summary>
    public static bool IsSpecial(string name) => ProtocolOf(name) is not null;

    /// <summary>The protocol prefix of a name (text before a colon that comes before any slash), or null.</summary>
    public static string? ProtocolOf(string name)
    {
        int i = name.AsSpan().IndexOfAny(':', '/');
        return i > 0 && name[i] == ':' ? name[..i] : null;
    }

    /// <summary>Parses an image name into the options of the node it names. A plain path gives
    /// <c>driver=file, filename=PATH</c> without a format (probed by the opener).</summary>
    public static BlockOptions FromFilename(string name)
    {
        string? protocol = ProtocolOf(name);
        if (protocol is null) return FileOptions(name);
        string rest = name[(protocol.Length + 1)..];
        switch (protocol)
        {
            case "json":
                return FromJson(rest);
            case "file":
                return FileOptions(rest);
            case "blkdebug":
            {
                // blkdebug:CONFIG:IMAGE — the image may itself carry a protocol (blkdebug::json:{...}).
                int colon = rest.IndexOf(':');
                if (colon < 0) throw new BlockSpecException("blkdebug requires both config file and image path");
                var opts = new List<KeyValuePair<string, string?>> { new("driver", "blkdebug"), new("x-image", rest[(colon + 1)..]) };
                if (colon > 0) opts.Add(new("config", rest[..colon]));
                return new BlockOptions(opts);
            }
            case "nbd" or "nbd+tcp" or "nbd+unix":
                return NbdOptions(name, protocol, rest);
            case "null-co" or "null-aio":
                if (rest != "//") throw new BlockSpecException($"The only allowed filename for this driver is '{protocol}://'");
                return new BlockOptions([new("driver", protocol)]);
            default:
                if (Array.IndexOf(KnownProtocols, protocol) >= 0) throw new BlockSpecException($"Unknown driver '{protocol}'");
                throw new BlockSpecException($"Unknown protocol '{protocol}'");
        }
    }

    private static BlockOptions FileOptions(string path) => new([new("driver", "file"), new("filename", path)]);

    /// <summary>nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH and the legacy nbd:unix:PATH[:exportname=E] /
    /// nbd:HOST:PORT[:exportname=E].</summary>
    private static BlockOptions NbdOptions(string name, string protocol, string rest)
    {
        var opts = new List<KeyValuePair<string, string?>> { new("driver", "nbd") };
        if (rest.StartsWith("//", StringComparison.Ordinal))
        {
            string url = rest[2..];
            string? query = null;
            int q = url.IndexOf('?');
            if (q >= 0) (url, query) = (url[..q], url[(q + 1)..]);
            int slash = url.IndexOf('/');
            string authority = slash < 0 ? url : url[..slash];
            string export = slash < 0 ? "" : Uri.UnescapeDataString(url[(slash + 1)..]);
            string? socket = null;
            foreach (var param in (query ?? "").Split('&', StringSplitOptions.RemoveEmptyEntries))
            {
                int eq = param.IndexOf('=');
                if (eq > 0 && param[..eq] == "socket" && protocol == "nbd+unix") socket = Uri.UnescapeDataString(param[(eq + 1)..]);
                else throw new BlockSpecException("No valid URL specified");
            }
            if (protocol == "nbd+unix")
            {
                if (authority.Length > 0 || socket is null) throw new BlockSpecException("No valid URL specified");
                opts.Add(new("server.type", "unix"));
                opts.Add(new("server.path", socket));
            }
            else
            {
                if (authority.Length == 0) throw new BlockSpecException("No valid URL specified");
                int colon = authority.LastIndexOf(':');
                string host = colon < 0 ? authority : authority[..colon];
                string port = colon < 0 ? "10809" : authority[(colon + 1)..];
                opts.Add(new("server.type", "inet"));
                opts.Add(new("server.host", host.Trim('[', ']')));
                opts.Add(new("server.port", port));
            }
            if (export.Length > 0) opts.Add(new("export", export));
            return new BlockOptions(opts);
        }
        if (protocol != "nbd") throw new BlockSpecException("No valid URL specified");
        // Legacy syntax: fields separated by colons; the last may be exportname=NAME.
        string? exportName = null;
        int ex = rest.IndexOf(":exportname=", StringComparison.Ordinal);
        if (ex >= 0) (rest, exportName) = (rest[..ex], rest[(ex + ":exportname=".Length)..]);
        if (rest.StartsWith("unix:", StringComparison.Ordinal))
        {
            opts.Add(new("server.type", "unix"));
            opts.Add(new("server.path", rest["unix:".Length..]));
        }
        else
        {
            int colon = rest.LastIndexOf(':');
            if (colon <= 0) throw new BlockSpecException($"Could not open '{name}': No valid URL specified");
            opts.Add(new("server.type", "inet"));
            opts.Add(new("server.host", rest[..colon]));
            opts.Add(new("server.port", rest[(colon + 1)..]));
        }
        if (exportName is not null) opts.Add(new("export", exportName));
        return new BlockOptions(opts);
    }

    /// <summary>--image-opts and qemu-io's <c>open -o</c>: QEMU's key=value list (",," is a literal comma; a first
    /// item without '=' takes <paramref name="impliedKey"/> when one is given).</summary>
    public static BlockOptions FromKeyValues(string text, string? impliedKey = null)
    {
        var opts = new List<KeyValuePair<string, string?>>();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var item = new StringBuilder();
        bool first = true;
        for (int i = 0; i <= text.Length; i++)
        {
            if (i < text.Length && text[i] == ',' && i + 1 < text.Length && text[i + 1] == ',')
            {
                item.Append(',');
                i++;
                continue;
            }
            if (i < text.Length && text[i] != ',')
            {
                item.Append(text[i]);
                continue;
            }
            string part = item.ToString();
            item.Clear();
            if (part.Length == 0 && i == text.Length) break;
            int eq = part.IndexOf('=');
            string key, value;
            if (eq < 0)
            {
                if (!first || impliedKey is null) throw new BlockSpecException($"Invalid parameter '{part}'");
                (key, value) = (impliedKey, part);
            }
            else (key, value) = (part[..eq], part[(eq + 1)..]);
            if (key.Length == 0) throw new BlockSpecException($"Invalid parameter '{part}'");
            if (!seen.Add(key)) opts.RemoveAll(kv => kv.Key == key); // the last one wins, as in QemuOpts
            opts.Add(new(key, value));
            first = false;
        }
        return new BlockOptions(opts);
    }

    /// <summary>The text after "json:": a JSON object (QEMU's dialect: single-quoted strings too), flattened into
    /// dotted keys. Scalars become text (true/false as on/off), null stays null.</summary>
    public static BlockOptions FromJson(string text)
    {
        var reader = new JsonReader(text);
        reader.SkipSpace();
        if (reader.AtEnd) throw new BlockSpecException("Could not parse the JSON options: Expecting a JSON value");
        var flat = new List<KeyValuePair<string, string?>>();
        try
        {
            if (reader.Peek != '{')
            {
                reader.SkipValue();
                throw new BlockSpecException("Invalid JSON object given");
            }
            reader.ReadValue("", flat);
            reader.SkipSpace();
            if (!reader.AtEnd) throw new JsonSyntaxException("JSON parse error, expecting value");
        }
        catch (JsonSyntaxException e)
        {
            throw new BlockSpecException($"Could not parse the JSON options: {e.Message}");
        }
        // Dotted keys and nested objects meet in one map; a key given twice keeps its first spelling's value.
        var result = new Dictionary<string, string?>(StringComparer.Ordinal);
        foreach (var (k, v) in flat) result.TryAdd(k, v);
        return new BlockOptions(result);
    }

    private sealed class JsonSyntaxException(string message) : Exception(message);

    /// <summary>A reader for QEMU's JSON dialect that flattens as it goes.</summary>
    private ref struct JsonReader(string text)
    {
        private readonly string _text = text;
        private int _pos;

        public readonly bool AtEnd => _pos >= _text.Length;
        public readonly char Peek => _text[_pos];

        public void SkipSpace()
        {
            while (_pos < _text.Length && char.IsWhiteSpace(_text[_pos])) _pos++;
        }

        public void SkipValue() => ReadValue("", []);

        /// <summary>Reads one value; scalars land in <paramref name="flat"/> under <paramref name="key"/>, containers
        /// under "key.member" / "key.index".</summary>
        public void ReadValue(string key, List<KeyValuePair<string, string?>> flat)
        {
            SkipSpace();
            if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
            char c = Peek;
            if (c == '{')
            {
                _pos++;
                SkipSpace();
                if (!AtEnd && Peek == '}')
                {
                    _pos++;
                    return;
                }
                while (true)
                {
                    SkipSpace();
                    if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                    if (Peek is not ('"' or '\''))
                    {
                        if (char.IsAsciiLetter(Peek)) throw new JsonSyntaxException($"JSON parse error, invalid keyword '{Word()}'");
                        throw new JsonSyntaxException("JSON parse error, key is not a string in object");
                    }
                    string member = ReadString();
                    SkipSpace();
                    if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                    if (Peek != ':') throw new JsonSyntaxException("JSON parse error, missing : in object pair");
                    _pos++;
                    SkipSpace();
                    if (!AtEnd && Peek is '}' or ',') throw new JsonSyntaxException("JSON parse error, expecting value");
                    ReadValue(key.Length == 0 ? member : key + "." + member, flat);
                    SkipSpace();
                    if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                    if (Peek == ',') { _pos++; continue; }
                    if (Peek == '}') { _pos++; return; }
                    throw new JsonSyntaxException("JSON parse error, expected separator in dict");
                }
            }
            if (c == '[')
            {
                _pos++;
                SkipSpace();
                if (!AtEnd && Peek == ']')
                {
                    _pos++;
                    return;
                }
                for (int index = 0; ; index++)
                {
                    ReadValue(key + "." + index.ToString(CultureInfo.InvariantCulture), flat);
                    SkipSpace();
                    if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                    if (Peek == ',') { _pos++; continue; }
                    if (Peek == ']') { _pos++; return; }
                    throw new JsonSyntaxException("JSON parse error, expected separator in list");
                }
            }
            if (c is '"' or '\'')
            {
                flat.Add(new(key, ReadString()));
                return;
            }
            if (c == '-' || char.IsAsciiDigit(c))
            {
                int start = _pos++;
                while (!AtEnd && (char.IsAsciiDigit(Peek) || Peek is '.' or 'e' or 'E' or '+' or '-')) _pos++;
                flat.Add(new(key, _text[start.._pos]));
                return;
            }
            if (char.IsAsciiLetter(c))
            {
                string word = Word();
                flat.Add(new(key, word switch
                {
                    "true" => "on",
                    "false" => "off",
                    "null" => null,
                    _ => throw new JsonSyntaxException($"JSON parse error, invalid keyword '{word}'"),
                }));
                return;
            }
            throw new JsonSyntaxException($"JSON parse error, stray '{c}'");
        }

        private string Word()
        {
            int start = _pos;
            while (!AtEnd && char.IsAsciiLetterOrDigit(Peek)) _pos++;
            return _text[start.._pos];
        }

        private string ReadString()
        {
            char quote = _text[_pos++];
            var sb = new StringBuilder();
            while (true)
            {
                if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                char c = _text[_pos++];
                if (c == quote) return sb.ToString();
                if (c != '\\')
                {
                    sb.Append(c);
                    continue;
                }
                if (AtEnd) throw new JsonSyntaxException("JSON parse error, premature EOI");
                char e = _text[_pos++];
                switch (e)
                {
                    case 'n': sb.Append('\n'); break;
                    case 't': sb.Append('\t'); break;
                    case 'r': sb.Append('\r'); break;
                    case 'b': sb.Append('\b'); break;
                    case 'f': sb.Append('\f'); break;
                    case 'u':
                        if (_pos + 4 > _text.Length || !int.TryParse(_text.AsSpan(_pos, 4), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out int code))
                            throw new JsonSyntaxException("JSON parse error, invalid escape sequence in string");
                        sb.Append((char)code);
                        _pos += 4;
                        break;
                    default: sb.Append(e); break;
                }
            }
        }
    }
}
