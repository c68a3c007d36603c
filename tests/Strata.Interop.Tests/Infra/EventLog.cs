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
    /// <summary>Completed (and replaced) whenever an event arrives: waiters wake on events, not on a timer.</summary>
    private TaskCompletionSource _arrived = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public EventLog(QmpClient qmp)
    {
        Client = qmp;
        _reader = Task.Run(async () =>
        {
            await foreach (var e in qmp.Events())
            {
                TaskCompletionSource arrived;
                lock (_events)
                {
                    _events.Add(e);
                    arrived = _arrived;
                    _arrived = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                }
                arrived.TrySetResult();
            }
        });
    }

    /// <summary>The client whose events these are (the one to query when an event alone cannot tell).</summary>
    public QmpClient Client { get; }

    /// <summary>Completes when the client's event stream ends (the connection closed).</summary>
    public Task Completion => _reader;

    public List<JsonObject> Snapshot() { lock (_events) return [.. _events]; }

    public void Clear() { lock (_events) _events.Clear(); }

    /// <summary>The first event named <paramref name="name"/> that matches, waiting up to 10 s; throws on timeout.</summary>
    public async Task<JsonObject> WaitAsync(string name, Func<JsonObject, bool>? match = null)
    {
        if (await WaitForAsync(list => list.FirstOrDefault(e => e["event"]!.GetValue<string>() == name && (match is null || match(e))), TimeSpan.FromSeconds(10)) is { } hit)
            return hit;
        throw new TimeoutException($"no {name} event within 10 s; got: {string.Join(", ", Snapshot().Select(e => e["event"]))}");
    }

    /// <summary>Waits until <paramref name="find"/> returns something for the events so far (looked at again as each
    /// event arrives); null when <paramref name="timeout"/> passed first.</summary>
    public async Task<T?> WaitForAsync<T>(Func<List<JsonObject>, T?> find, TimeSpan timeout) where T : class
    {
        var deadline = DateTime.UtcNow + timeout;
        while (true)
        {
            Task arrived;
            lock (_events)
            {
                if (find(_events) is { } hit) return hit;
                arrived = _arrived.Task;
            }
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero) return null;
            await Task.WhenAny(arrived, Task.Delay(left));
        }
    }
}
