using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Protocol.Daemon;

/// <summary>QAPI-like argument types, checked the way QEMU's input visitor checks them.</summary>
public enum ArgType { Str, Bool, Int, UInt32, UInt64, Enum, Any, Object, StrOrNull }

/// <summary>One member of a command's arguments.</summary>
public sealed record ArgSpec(string Name, ArgType Type, bool Optional = false, string[]? Values = null)
{
    public string SchemaType => Type switch
    {
        ArgType.Str => "str",
        ArgType.Bool => "bool",
        ArgType.Int or ArgType.UInt32 or ArgType.UInt64 => "int",
        ArgType.Enum => "str",
        _ => "any",
    };
}

/// <summary>Validates arguments against a member list: in declaration order, missing and wrongly typed members
/// first, then members that should not be there — the order and wording of QEMU's errors.</summary>
public static class ArgSchema
{
    public static void Validate(JsonObject args, IReadOnlyList<ArgSpec> specs, string prefix = "")
    {
        foreach (var spec in specs)
        {
            string name = prefix + spec.Name;
            if (!args.TryGetPropertyValue(spec.Name, out var value))
            {
                if (!spec.Optional) throw QmpException.Generic($"Parameter '{name}' is missing");
                continue;
            }
            CheckType(name, value, spec);
        }
        foreach (var (key, _) in args)
            if (!specs.Any(s => s.Name == key))
                throw QmpException.Generic($"Parameter '{prefix}{key}' is unexpected");
    }

    public static void CheckType(string name, JsonNode? value, ArgSpec spec)
    {
        switch (spec.Type)
        {
            case ArgType.Str:
                if (!IsKind(value, JsonValueKind.String)) throw TypeError(name, "string");
                break;
            case ArgType.StrOrNull:
                if (value is not null && !IsKind(value, JsonValueKind.String)) throw TypeError(name, "string");
                break;
            case ArgType.Enum:
                if (!IsKind(value, JsonValueKind.String)) throw TypeError(name, "string");
                string v = value!.GetValue<string>();
                if (!spec.Values!.Contains(v)) throw QmpException.Generic($"Parameter '{name}' does not accept value '{v}'");
                break;
            case ArgType.Bool:
                if (!IsKind(value, JsonValueKind.True) && !IsKind(value, JsonValueKind.False)) throw TypeError(name, "boolean");
                break;
            case ArgType.Int:
                if (!IsInteger(value)) throw TypeError(name, "integer");
                if (!((JsonValue)value!).TryGetValue<long>(out _)) throw QmpException.Generic($"Parameter '{name}' expects int64_t");
                break;
            case ArgType.UInt32:
                if (!IsInteger(value)) throw TypeError(name, "integer");
                if (!((JsonValue)value!).TryGetValue<uint>(out _)) throw QmpException.Generic($"Parameter '{name}' expects uint32_t");
                break;
            case ArgType.UInt64:
                if (!IsInteger(value)) throw TypeError(name, "integer");
                if (!((JsonValue)value!).TryGetValue<ulong>(out _)) throw QmpException.Generic($"Parameter '{name}' expects uint64_t");
                break;
            case ArgType.Object:
                if (value is not JsonObject) throw TypeError(name, "object");
                break;
        }
    }

    private static bool IsKind(JsonNode? node, JsonValueKind kind) => node is JsonValue v && v.GetValueKind() == kind;

    private static bool IsInteger(JsonNode? node) =>
        node is JsonValue v && v.GetValueKind() == JsonValueKind.Number && (v.TryGetValue<long>(out _) || v.TryGetValue<ulong>(out _) || IsWhole(v));

    private static bool IsWhole(JsonValue v) => v.TryGetValue<double>(out double d) && Math.Floor(d) == d && !v.ToJsonString().Contains('.') && !v.ToJsonString().Contains('e', StringComparison.OrdinalIgnoreCase);

    private static QmpException TypeError(string name, string expected) =>
        QmpException.Generic($"Invalid parameter type for '{name}', expected: {expected}");

    public static string Str(JsonObject a, string name) => a[name]!.GetValue<string>();
    public static string? OptStr(JsonObject a, string name) => a[name] is JsonValue v ? v.GetValue<string>() : null;
    public static bool Bool(JsonObject a, string name, bool fallback = false) => a[name] is JsonValue v ? v.GetValue<bool>() : fallback;
    public static long? OptLong(JsonObject a, string name) => a[name] is JsonValue v ? v.GetValue<long>() : null;

    /// <summary>query-qmp-schema entries for a command and its argument object.</summary>
    public static IEnumerable<QDict> SchemaEntries(string command, IReadOnlyList<ArgSpec> specs, string returnType)
    {
        string argType = $"q_obj_{command}-arg";
        yield return new QDict().Add("name", command).Add("meta-type", "command").Add("arg-type", argType).Add("ret-type", returnType);
        var members = specs.Select(s =>
        {
            var m = new QDict().Add("name", s.Name).Add("type", s.SchemaType);
            if (s.Optional) m.Add("default", null);
            return (object?)m;
        }).ToList();
        yield return new QDict().Add("name", argType).Add("meta-type", "object").Add("members", members);
    }
}
