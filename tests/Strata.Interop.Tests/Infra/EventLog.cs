using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>Collects a QMP client's events in the background. Events reach the client's channel before
/// the reply that follows them on the wire, but this collector may lag: tests that need an event wait
/// for it rather than assume it has already been copied.</summary>
public sealed class EventLog
{
    private readonly List<JsonObject> _events = [];
    private readonly Task _reader;

    public EventLog(QmpClient qmp) =>
        _reader = Task.Run(async () => { await foreach (var e in qmp.Events()) lock (_events) _events.Add(e); });

    public List<JsonObject> Snapshot() { lock (_events) return [.. _events]; }

    public void Clear() { lock (_events) _events.Clear(); }

    /// <summary>The first event named <paramref name="name"/> that matches, waiting up to 10 s; throws on timeout.</summary>
    public async Task<JsonObject> WaitAsync(string name, Func<JsonObject, bool>? match = null)
    {
        for (var deadline = DateTime.UtcNow.AddSeconds(10); DateTime.UtcNow < deadline; await Task.Delay(20))
            lock (_events)
                if (_events.FirstOrDefault(e => e["event"]!.GetValue<string>() == name && (match is null || match(e))) is { } hit)
                    return hit;
        throw new TimeoutException($"no {name} event within 10 s; got: {string.Join(", ", Snapshot().Select(e => e["event"]))}");
    }
}
