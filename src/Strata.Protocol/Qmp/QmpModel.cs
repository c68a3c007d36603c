using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Formats.Json;

namespace Strata.Protocol.Qmp;

/// <summary>A QMP error reply: class (GenericError, CommandNotFound, DeviceNotActive, DeviceNotFound) and text.</summary>
public sealed class QmpException(string errorClass, string description) : Exception(description)
{
    public string ErrorClass { get; } = errorClass;

    public static QmpException Generic(string description) => new("GenericError", description);
}

/// <summary>Conversions between System.Text.Json nodes (input) and the QDict model (output in QEMU's key order).</summary>
public static class QmpValues
{
    public static readonly JsonDocumentOptions ParseOptions = new() { MaxDepth = QmpFramer.DefaultMaxDepth + 8 };

    /// <summary>Input JSON to our output model: QDict, List&lt;object?&gt;, long, ulong, double, bool, string, null.</summary>
    public static object? ToModel(JsonNode? node) => node switch
    {
        null => null,
        JsonObject o => o.Aggregate(new QDict(), (d, kv) => d.Add(kv.Key, ToModel(kv.Value))),
        JsonArray a => a.Select(ToModel).ToList(),
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => v.GetValue<string>(),
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            JsonValueKind.Number => v.TryGetValue<long>(out long l) ? l : v.TryGetValue<ulong>(out ulong u) ? u : v.GetValue<double>(),
            _ => null,
        },
        _ => null,
    };

    /// <summary>Our output model back to JSON text and then a node (for in-process clients).</summary>
    public static JsonNode? ToNode(object? model) => JsonNode.Parse(QemuJson.Compact(model));
}
