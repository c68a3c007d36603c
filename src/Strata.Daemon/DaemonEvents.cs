using Strata.Formats.Json;

namespace Strata.Daemon;

/// <summary>The daemon's event bus: every event goes, stamped with QMP's timestamp, to every negotiated session.</summary>
public sealed class DaemonEvents
{
    private readonly List<Func<QDict, ValueTask>> _subscribers = new();

    public IDisposable Subscribe(Func<QDict, ValueTask> onEvent)
    {
        lock (_subscribers) _subscribers.Add(onEvent);
        return new Unsubscriber(() => { lock (_subscribers) _subscribers.Remove(onEvent); });
    }

    private sealed class Unsubscriber(Action action) : IDisposable
    {
        public void Dispose() => action();
    }

    /// <summary>Sends an event to every subscriber (each session queues it; none is waited for).</summary>
    public void Emit(string name, QDict? data)
    {
        var now = DateTimeOffset.UtcNow;
        long micros = now.ToUnixTimeMilliseconds() * 1000 + now.Ticks / 10 % 1000;
        var e = new QDict()
            .Add("timestamp", new QDict().Add("seconds", micros / 1_000_000).Add("microseconds", micros % 1_000_000))
            .Add("event", name);
        if (data is not null) e.Add("data", data);
        Func<QDict, ValueTask>[] subscribers;
        lock (_subscribers) subscribers = _subscribers.ToArray();
        foreach (var s in subscribers) _ = s(e);
    }
}
