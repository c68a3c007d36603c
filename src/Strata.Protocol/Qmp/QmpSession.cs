using System.Buffers;
using System.IO.Pipelines;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Formats.Json;

namespace Strata.Protocol.Qmp;

/// <summary>
/// One QMP conversation over a pipe pair (it never touches a socket): greeting, capabilities negotiation,
/// commands with their replies, and events between replies once negotiated. Protocol errors get an error reply,
/// and so does a command whatever its handler throws; only an input that breaks the framing limits (or the
/// connection's end) closes the session, and this session only.
/// </summary>
public sealed class QmpSession
{
    private readonly IQmpBackend _backend;
    private readonly PipeWriter _output;
    private readonly SemaphoreSlim _writeLock = new(1, 1);
    private readonly QmpFramer _framer;
    private static readonly UTF8Encoding StrictUtf8 = new(false, throwOnInvalidBytes: true);
    private bool _negotiated;
    private bool _oob;
    /// <summary>The session's event subscription, from negotiation to the end of the session.</summary>
    private IDisposable? _events;

    public QmpSession(IQmpBackend backend, PipeWriter output, QmpFramer? framer = null)
    {
        _backend = backend;
        _output = output;
        _framer = framer ?? new QmpFramer();
    }

    public async Task RunAsync(PipeReader input, CancellationToken cancellationToken)
    {
        try
        {
            await WriteAsync(new QDict().Add("QMP", new QDict().Add("version", _backend.Version).Add("capabilities", new List<object?> { "oob" })), cancellationToken);
            while (true)
            {
                var result = await input.ReadAsync(cancellationToken);
                var buffer = result.Buffer;
                while (true)
                {
                    bool framed = _framer.TryReadFrame(buffer, out var frame, out var consumed, out var error);
                    if (error != FrameError.None)
                    {
                        await WriteErrorAsync(null, "GenericError", error == FrameError.TooLarge ? "JSON token size limit exceeded" : "JSON nesting depth limit exceeded", cancellationToken);
                        return;
                    }
                    if (!framed)
                    {
                        buffer = buffer.Slice(consumed);
                        break;
                    }
                    buffer = buffer.Slice(consumed);
                    await HandleAsync(frame, cancellationToken);
                }
                input.AdvanceTo(buffer.Start, buffer.End);
                if (result.IsCompleted || result.IsCanceled) return;
            }
        }
        catch (OperationCanceledException)
        {
        }
        catch (IOException)
        {
        }
        finally
        {
            _events?.Dispose();
            await input.CompleteAsync();
            await _output.CompleteAsync();
        }
    }

    private async Task HandleAsync(ReadOnlySequence<byte> frame, CancellationToken ct)
    {
        JsonNode? node;
        try
        {
            // Decode strictly first: the JSON reader would only notice bad UTF-8 later, when a member is read.
            string text = StrictUtf8.GetString(QmpText.Normalize(frame));
            node = JsonNode.Parse(text, documentOptions: QmpValues.ParseOptions);
        }
        catch (Exception e) when (e is JsonException or DecoderFallbackException or ArgumentException or InvalidOperationException)
        {
            await WriteErrorAsync(null, "GenericError", "JSON parse error, " + QmpText.Describe(e), ct);
            return;
        }
        if (node is not JsonObject request)
        {
            await WriteErrorAsync(null, "GenericError", "QMP input must be a JSON object", ct);
            return;
        }
        object? id = request.TryGetPropertyValue("id", out var idNode) ? QmpValues.ToModel(idNode) : null;
        bool hasId = request.ContainsKey("id");
        string? command = null;
        bool oobRequest = false;
        foreach (var (key, value) in request)
        {
            switch (key)
            {
                case "execute":
                case "exec-oob" when _oob:
                    if (value is not JsonValue v || v.GetValueKind() != JsonValueKind.String)
                    {
                        await WriteErrorAsync(hasId ? id : null, "GenericError", $"QMP input member '{key}' must be a string", ct, hasId);
                        return;
                    }
                    command = v.GetValue<string>();
                    oobRequest = key == "exec-oob";
                    break;
                case "arguments":
                    if (value is not JsonObject)
                    {
                        await WriteErrorAsync(id, "GenericError", "QMP input member 'arguments' must be an object", ct, hasId);
                        return;
                    }
                    break;
                case "id":
                    break;
                default:
                    await WriteErrorAsync(id, "GenericError", $"QMP input member '{key}' is unexpected", ct, hasId);
                    return;
            }
        }
        if (command is null)
        {
            await WriteErrorAsync(id, "GenericError", "QMP input lacks member 'execute'", ct, hasId);
            return;
        }
        var arguments = request["arguments"] as JsonObject ?? new JsonObject();
        if (oobRequest)
        {
            await WriteErrorAsync(id, "GenericError", $"The command {command} does not support OOB", ct, hasId);
            return;
        }
        if (!_negotiated)
        {
            if (command != "qmp_capabilities")
            {
                await WriteErrorAsync(id, "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'", ct, hasId);
                return;
            }
            try
            {
                _oob = Capabilities(arguments);
            }
            catch (QmpException e)
            {
                await WriteErrorAsync(id, e.ErrorClass, e.Message, ct, hasId);
                return;
            }
            _negotiated = true;
            // Subscribed before the reply goes out, and holding the writer: an event emitted the moment the client
            // has its reply reaches it (QEMU switches the monitor to command mode inside the command), and one emitted
            // meanwhile waits for the writer, so the reply still comes first.
            await _writeLock.WaitAsync(ct);
            try
            {
                _events = _backend.SubscribeEvents(e => new ValueTask(WriteAsync(e, CancellationToken.None)));
                var reply = new QDict().Add("return", new QDict());
                if (hasId) reply.Add("id", id);
                await _output.WriteAsync(Encoding.ASCII.GetBytes(QemuJson.Compact(reply, asciiOnly: true) + "\r\n"), ct);
            }
            finally
            {
                _writeLock.Release();
            }
            return;
        }
        if (command == "qmp_capabilities")
        {
            await WriteErrorAsync(id, "CommandNotFound", "Capabilities negotiation is already complete, command ignored", ct, hasId);
            return;
        }
        object? result;
        try
        {
            result = await _backend.ExecuteAsync(command, arguments, ct);
        }
        catch (QmpException e)
        {
            await WriteErrorAsync(id, e.ErrorClass, e.Message, ct, hasId);
            return;
        }
        catch (Exception e) when (!(e is OperationCanceledException && ct.IsCancellationRequested))
        {
            // QEMU's monitor never goes away because a command went wrong: whatever a handler throws is that
            // command's error (an IOException from an image must not pass for this connection's own end).
            _backend.CommandFailed(command, e);
            await WriteErrorAsync(id, "GenericError", string.IsNullOrEmpty(e.Message) ? e.GetType().Name : e.Message, ct, hasId);
            return;
        }
        await WriteReplyAsync(id, result ?? new QDict(), ct, hasId);
        _backend.ReplySent(command);
    }

    private static bool Capabilities(JsonObject arguments)
    {
        bool oob = false;
        foreach (var (key, value) in arguments)
        {
            if (key != "enable") throw QmpException.Generic($"Parameter '{key}' is unexpected");
            if (value is not JsonArray list) throw QmpException.Generic("Invalid parameter type for 'enable', expected: array");
            foreach (var item in list)
            {
                if (item is not JsonValue v || v.GetValueKind() != JsonValueKind.String)
                    throw QmpException.Generic("Invalid parameter type for 'enable[0]', expected: string");
                string cap = v.GetValue<string>();
                if (cap != "oob") throw QmpException.Generic($"Parameter 'enable' does not accept value '{cap}'");
                oob = true;
            }
        }
        return oob;
    }

    private Task WriteReplyAsync(object? id, object? value, CancellationToken ct, bool hasId = true)
    {
        var d = new QDict().Add("return", value);
        if (hasId) d.Add("id", id);
        return WriteAsync(d, ct);
    }

    private Task WriteErrorAsync(object? id, string errorClass, string description, CancellationToken ct, bool hasId = false)
    {
        var d = new QDict();
        if (hasId) d.Add("id", id);
        d.Add("error", new QDict().Add("class", errorClass).Add("desc", description));
        return WriteAsync(d, ct);
    }

    /// <summary>Writes one message, ASCII only and CRLF-terminated; replies and events never interleave.</summary>
    private async Task WriteAsync(QDict message, CancellationToken ct)
    {
        var bytes = Encoding.ASCII.GetBytes(QemuJson.Compact(message, asciiOnly: true) + "\r\n");
        await _writeLock.WaitAsync(ct);
        try
        {
            await _output.WriteAsync(bytes, ct);
        }
        finally
        {
            _writeLock.Release();
        }
    }
}

/// <summary>Input text helpers: QEMU's single-quoted strings, and short error descriptions.</summary>
internal static class QmpText
{
    /// <summary>Rewrites single-quoted strings (a QMP extension) as JSON strings; other bytes pass through.</summary>
    public static byte[] Normalize(ReadOnlySequence<byte> frame)
    {
        var bytes = frame.ToArray();
        if (Array.IndexOf(bytes, (byte)'\'') < 0) return bytes;
        var output = new List<byte>(bytes.Length + 8);
        bool inDouble = false, inSingle = false, escape = false;
        foreach (byte b in bytes)
        {
            if (inDouble)
            {
                output.Add(b);
                if (escape) escape = false;
                else if (b == '\\') escape = true;
                else if (b == '"') inDouble = false;
                continue;
            }
            if (inSingle)
            {
                if (escape)
                {
                    if (b != '\'') output.Add((byte)'\\');
                    output.Add(b);
                    escape = false;
                }
                else if (b == '\\') escape = true;
                else if (b == '\'') { output.Add((byte)'"'); inSingle = false; }
                else if (b == '"') { output.Add((byte)'\\'); output.Add(b); }
                else output.Add(b);
                continue;
            }
            if (b == '"') inDouble = true;
            if (b == '\'') { inSingle = true; output.Add((byte)'"'); continue; }
            output.Add(b);
        }
        return output.ToArray();
    }

    public static string Describe(Exception e) => e switch
    {
        DecoderFallbackException => "invalid UTF-8 sequence",
        JsonException j when j.Message.Contains("depth", StringComparison.OrdinalIgnoreCase) => "nesting too deep",
        _ => "expecting value",
    };
}
