using System.Text.Json;
using System.Text.Json.Nodes;

namespace Strata.Daemon;

/// <summary>A QMP monitor socket (--chardev socket,… plus --monitor chardev=…); <paramref name="Text"/> is the
/// --chardev option's value, for errors.</summary>
public sealed record MonitorSpec(string Id, string? Path, string? Host, int Port, string Text = "")
{
    /// <summary>--chardev stdio: QMP on the daemon's own stdin and stdout.</summary>
    public bool Stdio { get; init; }
    /// <summary>server=off: the daemon connects to the address instead of listening on it.</summary>
    public bool Client { get; init; }
}

/// <summary>What qemu-storage-daemon's command line says, parsed.</summary>
public sealed class DaemonOptions
{
    public List<(string Text, JsonObject Value)> Blockdevs { get; } = new();
    public Dictionary<string, MonitorSpec> Chardevs { get; } = new(StringComparer.Ordinal);
    public List<(string Text, string ChardevId)> Monitors { get; } = new();
    public List<string> Objects { get; } = new();
    public List<string> NbdServers { get; } = new();
    public List<string> Exports { get; } = new();
    public string? PidFile { get; set; }
    /// <summary>--crash-safe-bitmaps on|off: the default for qcow2 nodes (Strata's own option).</summary>
    public bool CrashSafeBitmaps { get; set; } = true;
    public bool Daemonize { get; set; }
    public bool Help { get; set; }
    public bool Version { get; set; }
}

/// <summary>Thrown for a bad command line; the message is printed after "strata daemon: ".</summary>
public sealed class DaemonUsageException(string message) : Exception(message);

/// <summary>
/// Parses qemu-storage-daemon's options (getopt_long style: "--opt value" or "--opt=value") and its
/// key=value,… syntax (",," escapes a comma, dotted keys nest, "a.0=" builds lists) or the JSON form.
/// </summary>
public static class DaemonCommandLine
{
    private static readonly string[] WithValue = ["--blockdev", "--chardev", "--monitor", "--nbd-server", "--export", "--object", "--pidfile", "--trace", "-T", "--crash-safe-bitmaps"];

    public static DaemonOptions Parse(IReadOnlyList<string> args)
    {
        var o = new DaemonOptions();
        for (int i = 0; i < args.Count; i++)
        {
            string arg = args[i];
            string opt = arg;
            string? value = null;
            int eq = arg.IndexOf('=');
            if (arg.StartsWith("--", StringComparison.Ordinal) && eq > 0)
            {
                opt = arg[..eq];
                value = arg[(eq + 1)..];
            }
            if (WithValue.Contains(opt) && value is null)
            {
                if (i + 1 >= args.Count) throw new DaemonUsageException($"option '{opt}' requires an argument");
                value = args[++i];
            }
            switch (opt)
            {
                case "-h" or "--help": o.Help = true; break;
                case "-V" or "--version": o.Version = true; break;
                case "--daemonize": o.Daemonize = true; break;
                case "--pidfile": o.PidFile = value; break;
                case "--crash-safe-bitmaps":
                    o.CrashSafeBitmaps = value switch
                    {
                        "on" or "true" or "yes" => true,
                        "off" or "false" or "no" => false,
                        _ => throw new DaemonUsageException($"--crash-safe-bitmaps: Parameter expects 'on' or 'off', not '{value}'"),
                    };
                    break;
                case "-T" or "--trace": break; // tracing is QEMU's own; accepted and ignored
                case "--object": o.Objects.Add(value!); break;
                case "--nbd-server": o.NbdServers.Add(value!); break;
                case "--export": o.Exports.Add(value!); break;
                case "--blockdev":
                    o.Blockdevs.Add((value!, ParseValue(value!, "driver", $"--blockdev {value}")));
                    break;
                case "--chardev":
                {
                    var c = ParseValue(value!, "backend", $"--chardev {value}");
                    string backend = Text(c, "backend") ?? throw new DaemonUsageException($"--chardev {value}: chardev: \"backend\" missing");
                    if (backend is not ("socket" or "stdio")) throw new DaemonUsageException($"--chardev {value}: chardev backend '{backend}' is not supported (only socket and stdio)");
                    string id = Text(c, "id") ?? throw new DaemonUsageException($"--chardev {value}: Parameter 'id' is missing");
                    if (o.Chardevs.ContainsKey(id)) throw new DaemonUsageException($"--chardev {value}: attempt to add duplicate property '{id}' to object (type 'container')");
                    if (backend == "stdio")
                    {
                        if (o.Chardevs.Values.Any(x => x.Stdio)) throw new DaemonUsageException($"--chardev {value}: cannot use stdio by multiple character devices");
                        o.Chardevs[id] = new MonitorSpec(id, null, null, 0, value!) { Stdio = true };
                        break;
                    }
                    string? path = Text(c, "path");
                    string? host = Text(c, "host");
                    string? port = Text(c, "port");
                    if (path is null && (host is null || port is null))
                        throw new DaemonUsageException($"--chardev {value}: chardev: socket: no local or remote address");
                    bool client = Text(c, "server") is null or "off" or "false" or "no";
                    int portNumber = 0;
                    if (path is null)
                    {
                        try
                        {
                            portNumber = SocketAddressArg.ParsePort(host!, port!);
                        }
                        catch (Strata.Protocol.Qmp.QmpException e)
                        {
                            throw new DaemonUsageException($"--chardev {value}: {e.Message}");
                        }
                    }
                    o.Chardevs[id] = new MonitorSpec(id, path, host, portNumber, value!) { Client = client };
                    break;
                }
                case "--monitor":
                {
                    var m = ParseValue(value!, "chardev", $"--monitor {value}");
                    string id = Text(m, "chardev") ?? throw new DaemonUsageException($"--monitor {value}: Parameter 'chardev' is missing");
                    if (Text(m, "mode") is { } mode && mode != "control") throw new DaemonUsageException($"--monitor {value}: Only QMP is supported");
                    o.Monitors.Add((value!, id));
                    break;
                }
                default:
                    if (opt.StartsWith('-')) throw new DaemonUsageException($"unrecognized option '{arg}'");
                    throw new DaemonUsageException($"Unexpected argument: {arg}");
            }
        }
        foreach (var (text, id) in o.Monitors)
            if (!o.Chardevs.ContainsKey(id)) throw new DaemonUsageException($"--monitor {text}: chardev \"{id}\" not found");
        return o;
    }

    private static string? Text(JsonObject o, string key) => o[key] is JsonValue v ? v.ToString() : null;

    /// <summary>JSON (starts with '{') or key=value,… with an implied first key.</summary>
    /// <summary>The error an option's value gets, worded as qemu-storage-daemon words it: a keyval value is text,
    /// so a type mismatch reads "expects integer" where QMP's JSON says "Invalid parameter type".</summary>
    public static string OptionError(string text, string message)
    {
        if (text.TrimStart().StartsWith('{')) return message;
        var u = System.Text.RegularExpressions.Regex.Match(message, @"^Parameter '(.+)' expects uint64$");
        if (u.Success) return $"Parameter '{u.Groups[1].Value}' expects integer";
        var m = System.Text.RegularExpressions.Regex.Match(message, @"^Invalid parameter type for '(.+)', expected: (integer|number|boolean)$");
        if (!m.Success) return message;
        return m.Groups[2].Value == "boolean" ? $"Parameter '{m.Groups[1].Value}' expects 'on' or 'off'" : $"Parameter '{m.Groups[1].Value}' expects {m.Groups[2].Value}";
    }

    public static JsonObject ParseValue(string text, string impliedKey, string context)
    {
        if (text.TrimStart().StartsWith('{'))
        {
            try
            {
                return JsonNode.Parse(text) as JsonObject ?? throw new DaemonUsageException($"{context}: expected a JSON object");
            }
            catch (JsonException e)
            {
                throw new DaemonUsageException($"{context}: JSON parse error: {e.Message}");
            }
        }
        var root = new JsonObject();
        var parts = SplitKeyval(text);
        for (int i = 0; i < parts.Count; i++)
        {
            string part = parts[i];
            int eq = part.IndexOf('=');
            string key, value;
            if (eq < 0)
            {
                if (i != 0) throw new DaemonUsageException($"{context}: Expected '=' after parameter '{part}'");
                key = impliedKey;
                value = part;
            }
            else
            {
                key = part[..eq];
                value = part[(eq + 1)..];
            }
            Set(root, key.Split('.'), Typed(key, value), context);
        }
        return ListsFromIndexes(root);
    }

    private static List<string> SplitKeyval(string text)
    {
        var parts = new List<string>();
        var current = new System.Text.StringBuilder();
        for (int i = 0; i < text.Length; i++)
        {
            if (text[i] == ',')
            {
                if (i + 1 < text.Length && text[i + 1] == ',')
                {
                    current.Append(',');
                    i++;
                    continue;
                }
                parts.Add(current.ToString());
                current.Clear();
                continue;
            }
            current.Append(text[i]);
        }
        if (current.Length > 0) parts.Add(current.ToString());
        return parts;
    }

    private static readonly string[] StringKeys = ["locking", "filename", "node-name", "name", "id", "path", "file", "backing", "chardev", "host", "port", "target", "export", "bitmap"];

    /// <summary>keyval values are strings; the schema decides their type. Booleans (on/off) and numbers are
    /// converted here except for members that are always strings.</summary>
    private static JsonNode? Typed(string key, string value)
    {
        string last = key.Split('.')[^1];
        if (StringKeys.Contains(last) || char.IsAsciiDigit(last.FirstOrDefault())) return JsonValue.Create(value);
        if (value is "on" or "yes" or "true") return JsonValue.Create(true);
        if (value is "off" or "no" or "false") return JsonValue.Create(false);
        if (value.Length > 0 && value.All(char.IsAsciiDigit) && long.TryParse(value, out long n)) return JsonValue.Create(n);
        return JsonValue.Create(value);
    }

    private static void Set(JsonObject root, string[] path, JsonNode? value, string context)
    {
        var obj = root;
        for (int i = 0; i < path.Length - 1; i++)
        {
            if (obj[path[i]] is not JsonObject child)
            {
                if (obj.ContainsKey(path[i])) throw new DaemonUsageException($"{context}: Parameter '{string.Join('.', path[..(i + 1)])}' used inconsistently");
                child = new JsonObject();
                obj[path[i]] = child;
            }
            obj = child;
        }
        if (obj.ContainsKey(path[^1])) throw new DaemonUsageException($"{context}: Parameter '{string.Join('.', path)}' is set more than once");
        obj[path[^1]] = value;
    }

    /// <summary>Objects whose keys are 0, 1, 2… become lists ("bitmaps.0=a,bitmaps.1=b").</summary>
    private static JsonObject ListsFromIndexes(JsonObject o)
    {
        foreach (var key in o.Select(kv => kv.Key).ToList())
        {
            if (o[key] is not JsonObject child) continue;
            ListsFromIndexes(child);
            var keys = child.Select(kv => kv.Key).ToList();
            // Indexes are compared as text ("0".."n-1"): a huge digit string is simply not a list index.
            var indexes = Enumerable.Range(0, keys.Count).Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToList();
            if (keys.Count > 0 && keys.Order(StringComparer.Ordinal).SequenceEqual(indexes.Order(StringComparer.Ordinal)))
            {
                var list = new JsonArray();
                foreach (var k in indexes)
                {
                    var item = child[k];
                    child.Remove(k);
                    list.Add(item);
                }
                o[key] = list;
            }
        }
        return o;
    }
}
