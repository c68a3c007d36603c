using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>QAPI-like argument types, checked the way QEMU's input visitor checks them.</summary>
public enum ArgType { Str, Bool, Int, UInt16, UInt32, UInt64, Enum, Any, Object, StrOrNull }

/// <summary>One member of a command's arguments.</summary>
public sealed record ArgSpec(string Name, ArgType Type, bool Optional = false, string[]? Values = null)
{
    public string SchemaType => Type switch
    {
        ArgType.Str => "str",
        ArgType.Bool => "bool",
        ArgType.Int or ArgType.UInt16 or ArgType.UInt32 or ArgType.UInt64 => "int",
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
                if (!spec.Values!.Contains(v)) throw QmpException.Generic($"Parameter '{LastName(name)}' does not accept value '{v}'");
                break;
            case ArgType.Bool:
                if (!IsKind(value, JsonValueKind.True) && !IsKind(value, JsonValueKind.False)) throw TypeError(name, "boolean");
                break;
            case ArgType.Int:
                // QEMU's JSON parser makes a number with a fraction, an exponent or past int64 a double.
                if (value is not JsonValue iv || iv.GetValueKind() != JsonValueKind.Number || !iv.TryGetValue<long>(out _)) throw TypeError(name, "integer");
                break;
            case ArgType.UInt16:
            case ArgType.UInt32:
            case ArgType.UInt64:
                // QEMU visits every unsigned member as uint64 first (any non-integer: "expects uint64"), then
                // checks the narrower range. A negative number is refused here; QEMU would take it modulo 2^64.
                if (!IsInteger(value)) throw QmpException.Generic($"Parameter '{name}' expects uint64");
                var uv = (JsonValue)value!;
                ulong max = spec.Type switch { ArgType.UInt16 => ushort.MaxValue, ArgType.UInt32 => uint.MaxValue, _ => ulong.MaxValue };
                if (!TryGetUnsigned(uv, out ulong u) || u > max)
                    throw QmpException.Generic(spec.Type == ArgType.UInt64 ? $"Parameter '{name}' expects uint64" : $"Parameter '{LastName(name)}' expects {(spec.Type == ArgType.UInt16 ? "uint16_t" : "uint32_t")}");
                break;
            case ArgType.Object:
                if (value is not JsonObject) throw TypeError(name, "object");
                break;
        }
    }

    /// <summary>A list of BlockDirtyBitmapOrStr (a bitmap's name, or {node, name}), checked as QEMU's visitor checks
    /// it before the command runs.</summary>
    public static void CheckBitmapList(JsonNode? list, string name)
    {
        if (list is not JsonArray array) throw TypeError(name, "array");
        for (int i = 0; i < array.Count; i++)
        {
            if (array[i] is JsonObject o) Validate(o, [new("node", ArgType.Str), new("name", ArgType.Str)], $"{name}[{i}].");
            else if (!IsKind(array[i], JsonValueKind.String)) throw AlternateError(null, "BlockDirtyBitmapOrStr");
        }
    }

    /// <summary>A value that fits none of an alternate's branches (BlockdevRef, BlockDirtyBitmapOrStr, …). QEMU names
    /// it by the member's own name, and a list item by no name at all, which its message prints as 'null'.</summary>
    public static QmpException AlternateError(string? name, string type) =>
        QmpException.Generic($"Invalid parameter type for '{(name is null ? "null" : LastName(name))}', expected: {type}");

    /// <summary>QEMU's core visitor names an enum value it does not know, or a number past a narrow unsigned type,
    /// by the member's own name, not its path ('type', not 'actions[0].type'); the input visitor's errors (types,
    /// missing and unexpected members) give the path.</summary>
    private static string LastName(string name) => name[(name.LastIndexOf('.') + 1)..];

    private static bool IsKind(JsonNode? node, JsonValueKind kind) => node is JsonValue v && v.GetValueKind() == kind;

    private static bool IsInteger(JsonNode? node) =>
        node is JsonValue v && v.GetValueKind() == JsonValueKind.Number && (v.TryGetValue<long>(out _) || v.TryGetValue<ulong>(out _));

    /// <summary>Parsed JSON converts between number types; a value built in code (the command line's keyval) holds
    /// a long and converts to nothing else.</summary>
    private static bool TryGetUnsigned(JsonValue v, out ulong u)
    {
        if (v.TryGetValue(out u)) return true;
        if (v.TryGetValue(out long l) && l >= 0)
        {
            u = (ulong)l;
            return true;
        }
        return false;
    }

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
