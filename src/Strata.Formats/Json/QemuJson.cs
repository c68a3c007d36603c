using System.Globalization;
using System.Text;

namespace Strata.Formats.Json;

/// <summary>
/// A JSON object whose keys come out in the order QEMU's QDict iterates them: by hash bucket
/// (tdb hash modulo 512), and within a bucket the most recently inserted key first. Writing our
/// objects in that order makes <c>--output=json</c> and QMP replies byte-identical to QEMU's.
/// </summary>
public sealed class QDict
{
    private const int Buckets = 512;
    private readonly List<KeyValuePair<string, object?>> _entries = new();

    public QDict Add(string key, object? value)
    {
        int i = _entries.FindIndex(e => e.Key == key);
        if (i >= 0) _entries.RemoveAt(i);
        _entries.Add(new(key, value));
        return this;
    }

    public int Count => _entries.Count;

    public object? this[string key] => _entries.FirstOrDefault(e => e.Key == key).Value;

    /// <summary>Entries in QDict iteration order.</summary>
    public IEnumerable<KeyValuePair<string, object?>> Ordered =>
        _entries.Select((e, index) => (e, index))
            .OrderBy(t => Hash(t.e.Key) % Buckets)
            .ThenByDescending(t => t.index)
            .Select(t => t.e);

    /// <summary>QEMU's qdict hash (the tdb hash).</summary>
    public static uint Hash(string key)
    {
        var bytes = Encoding.UTF8.GetBytes(key);
        uint value = unchecked(0x238F13AFu * (uint)bytes.Length);
        for (int i = 0; i < bytes.Length; i++)
            value = unchecked(value + ((uint)bytes[i] << (i * 5 % 24)));
        return unchecked(1103515243u * value + 12345u);
    }
}

/// <summary>QEMU's human-readable dump of a QDict (qemu-img info's "Format specific information").</summary>
public static class QemuHumanDump
{
    public static void Write(System.Text.StringBuilder sb, QDict dict, int indent)
    {
        foreach (var (key, value) in dict.Ordered) WriteEntry(sb, key.Replace('-', ' '), value, indent);
    }

    private static void WriteEntry(System.Text.StringBuilder sb, string label, object? value, int indent)
    {
        sb.Append(' ', indent * 4).Append(label).Append(':');
        switch (value)
        {
            case QDict d:
                sb.Append('\n');
                Write(sb, d, indent + 1);
                break;
            case string s:
                sb.Append(' ').Append(s).Append('\n');
                break;
            case System.Collections.IEnumerable list:
                sb.Append('\n');
                int i = 0;
                foreach (var item in list) WriteEntry(sb, $"[{i++}]", item, indent + 1);
                break;
            case bool b:
                sb.Append(' ').Append(b ? "true" : "false").Append('\n');
                break;
            default:
                sb.Append(' ').Append(Convert.ToString(value, CultureInfo.InvariantCulture)).Append('\n');
                break;
        }
    }
}

/// <summary>Serialises QDict / lists / scalars the way QEMU's JSON writer does.</summary>
public static class QemuJson
{
    /// <summary>Pretty form used by qemu-img (4-space indent, "key": value).</summary>
    public static string Pretty(object? value)
    {
        var sb = new StringBuilder();
        Write(sb, value, pretty: true, indent: 0);
        return sb.ToString();
    }

    /// <summary>Compact form used on the QMP wire: {"a": 1, "b": [1, 2]}.</summary>
    public static string Compact(object? value, bool asciiOnly = false)
    {
        var sb = new StringBuilder();
        Write(sb, value, pretty: false, indent: 0, asciiOnly);
        return sb.ToString();
    }

    private static void Write(StringBuilder sb, object? value, bool pretty, int indent, bool asciiOnly = false)
    {
        switch (value)
        {
            case null:
                sb.Append("null");
                break;
            case bool b:
                sb.Append(b ? "true" : "false");
                break;
            case string s:
                WriteString(sb, s, asciiOnly);
                break;
            case int or long or uint or ulong or short or ushort or byte or sbyte:
                sb.Append(Convert.ToString(value, CultureInfo.InvariantCulture));
                break;
            case double d:
                sb.Append(d.ToString("R", CultureInfo.InvariantCulture));
                break;
            case System.Text.Json.Nodes.JsonNode node:
                sb.Append(node.ToJsonString());
                break;
            case QDict dict:
                WriteObject(sb, dict.Ordered, pretty, indent, asciiOnly);
                break;
            case System.Collections.IEnumerable list:
                WriteList(sb, list, pretty, indent, asciiOnly);
                break;
            default:
                throw new ArgumentException($"cannot serialise {value.GetType()}");
        }
    }

    private static void WriteObject(StringBuilder sb, IEnumerable<KeyValuePair<string, object?>> entries, bool pretty, int indent, bool asciiOnly)
    {
        sb.Append('{');
        bool first = true;
        foreach (var (k, v) in entries)
        {
            if (!first) sb.Append(',');
            if (pretty) { sb.Append('\n'); sb.Append(' ', (indent + 1) * 4); }
            else if (!first) sb.Append(' ');
            first = false;
            WriteString(sb, k, asciiOnly);
            sb.Append(": ");
            Write(sb, v, pretty, indent + 1, asciiOnly);
        }
        if (pretty) { sb.Append('\n'); sb.Append(' ', indent * 4); }
        sb.Append('}');
    }

    private static void WriteList(StringBuilder sb, System.Collections.IEnumerable list, bool pretty, int indent, bool asciiOnly)
    {
        sb.Append('[');
        bool first = true;
        foreach (var v in list)
        {
            if (!first) sb.Append(',');
            if (pretty) { sb.Append('\n'); sb.Append(' ', (indent + 1) * 4); }
            else if (!first) sb.Append(' ');
            first = false;
            Write(sb, v, pretty, indent + 1, asciiOnly);
        }
        if (pretty) { sb.Append('\n'); sb.Append(' ', indent * 4); } // QEMU prints an empty list as "[" newline "]"
        sb.Append(']');
    }

    private static void WriteString(StringBuilder sb, string s, bool asciiOnly = false)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                default:
                    if (c < 0x20 || c == 0x7f || (asciiOnly && c > 0x7e)) sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    else sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }
}
