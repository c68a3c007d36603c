using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Lets the tests write QMP arguments as anonymous objects, dictionaries or parsed JSON. The client itself takes only
/// a <see cref="JsonObject"/> so that the product stays free of reflection-based serialisation (native AOT); the
/// reflection lives here, in test code that is never trimmed.
/// </summary>
public static class QmpArguments
{
    public static Task<JsonNode?> ExecuteAsync(this QmpClient client, string command, object? arguments, CancellationToken ct = default) =>
        client.ExecuteAsync(command, ToObject(arguments), ct);

    private static JsonObject? ToObject(object? arguments) => arguments switch
    {
        null => null,
        JsonObject o => o,
        JsonNode n => throw new ArgumentException($"QMP arguments must be a JSON object, not {n.GetValueKind()}"),
        _ => JsonSerializer.SerializeToNode(arguments)!.AsObject(),
    };
}
