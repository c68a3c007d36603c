using System.Diagnostics;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Backup;

/// <summary>A dirty bitmap as query-named-block-nodes shows it.</summary>
public sealed record SourceBitmap(string Name, bool Recording, bool Busy, bool Persistent, bool Inconsistent, long Count, long Granularity);

/// <summary>A node of the source as query-named-block-nodes shows it.</summary>
public sealed record SourceNode(string Name, string Driver, long VirtualSize, IReadOnlyList<SourceBitmap> Bitmaps);

/// <summary>How a block job ended.</summary>
public sealed record JobOutcome(string Id, bool Completed, string? Error)
{
    public bool Ok => Completed && Error is null;
}

/// <summary>
/// The backup source: `strata daemon`, qemu-storage-daemon or a QEMU VM, over QMP. Keeps every event so that
/// a job's end is never missed between the command that starts it and the wait.
/// </summary>
public sealed class QmpSource : IAsyncDisposable
{
    private readonly QmpClient _qmp;
    private readonly List<JsonObject> _events = [];
    private readonly Task _pump;
    private readonly SemaphoreSlim _eventArrived = new(0);

    public string Address { get; }

    /// <summary>Reached over a unix socket: the source runs on this host and writes through this kernel's page cache,
    /// so an fsync made here covers its writes. Over TCP it may be another host sharing the storage.</summary>
    public bool OnThisHost { get; }

    /// <summary>The QEMU version the source's greeting gives, once a command has completed (null if none).</summary>
    public Version? ServerVersion => _qmp.ServerVersion;

    /// <summary>How long a source that accepted the connection may take to greet. QEMU greets at once; one whose monitor
    /// already has a client (qemu-storage-daemon and QEMU serve one per monitor) leaves the next waiting in its queue
    /// without a word, and a backup would wait there for good.</summary>
    public TimeSpan GreetingTimeout { get; }

    public static readonly TimeSpan DefaultGreetingTimeout = TimeSpan.FromSeconds(10);

    /// <summary>The negotiation, bounded by <see cref="GreetingTimeout"/> from the moment of connecting.</summary>
    private readonly Task _greeted;

    private QmpSource(QmpClient qmp, string address, bool onThisHost, TimeSpan greetingTimeout)
    {
        GreetingTimeout = greetingTimeout;
        _greeted = qmp.Negotiated.WaitAsync(greetingTimeout);
        Observe(_greeted);
        _qmp = qmp;
        Address = address;
        OnThisHost = onThisHost;
        _pump = Task.Run(async () =>
        {
            await foreach (var e in qmp.Events())
            {
                lock (_events) _events.Add(e);
                _eventArrived.Release();
            }
        });
    }

    /// <summary>Connects to "PATH" (a unix socket) or "HOST:PORT" (TCP).</summary>
    public static async Task<QmpSource> ConnectAsync(string address, CancellationToken ct = default) =>
        await ConnectAsync(address, null, ct);

    /// <summary>Connects as <see cref="ConnectAsync(string, CancellationToken)"/>, with another greeting timeout.</summary>
    public static async Task<QmpSource> ConnectAsync(string address, TimeSpan? greetingTimeout, CancellationToken ct = default)
    {
        try
        {
            int colon = address.LastIndexOf(':');
            bool tcp = !address.Contains('/') && colon > 0 && int.TryParse(address[(colon + 1)..], out int port);
            QmpClient client = tcp
                ? await QmpClient.ConnectTcpAsync(address[..colon], int.Parse(address[(colon + 1)..]), ct)
                : await QmpClient.ConnectUnixAsync(address, ct);
            return new QmpSource(client, address, onThisHost: !tcp, greetingTimeout ?? DefaultGreetingTimeout);
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            throw new BackupException($"cannot reach QMP at '{address}': {e.Message}",
                "is the daemon or VM running with a --monitor/-qmp socket there? (qemu-storage-daemon serves one QMP client at a time)", BackupExitCodes.Source);
        }
    }

    /// <summary>Waits for the source to have accepted the connection's negotiation (<see cref="QmpClient.Negotiated"/>):
    /// before a step that leaves something behind on this side.</summary>
    public async Task NegotiatedAsync()
    {
        try
        {
            await Greeted();
            await _qmp.Negotiated;
        }
        catch (QmpGreetingException e)
        {
            throw NotQmp(e);
        }
        catch (IOException e)
        {
            throw new BackupException($"lost the QMP connection to '{Address}' while negotiating: {e.Message}", "is the daemon still running?", BackupExitCodes.Source);
        }
    }

    private BackupException NotQmp(QmpGreetingException e) =>
        new($"cannot reach QMP at '{Address}': {e.Message}",
            "is the daemon or VM running with a --monitor/-qmp socket there? (qemu-storage-daemon serves one QMP client at a time)", BackupExitCodes.Source);

    /// <summary>Returns once the negotiation has ended (either way: a failed one is reported by what awaits it), or
    /// throws when the source stayed silent for <see cref="GreetingTimeout"/> after the connection. Commands are sent
    /// before the greeting arrives; this only bounds the wait for it.</summary>
    private async Task Greeted()
    {
        if (_qmp.Negotiated.IsCompleted) return;
        try
        {
            await _greeted;
        }
        catch (TimeoutException)
        {
            throw new BackupException($"QMP at '{Address}' accepted the connection but sent no greeting within {GreetingTimeout.TotalSeconds:0.#} s",
                "another client may be connected to its monitor: qemu-storage-daemon and QEMU serve one client per monitor at a time (give the source a monitor of its own for strata)",
                BackupExitCodes.Source);
        }
        catch (Exception)
        {
            // The negotiation failed: the command's own await (or NegotiatedAsync's) reports why.
        }
    }

    /// <summary>A task whose failure nobody else awaits: observed, so it never surfaces as unobserved.</summary>
    private static void Observe(Task task) =>
        task.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

    public async Task<JsonNode?> ExecuteAsync(string command, JsonObject? arguments = null)
    {
        try
        {
            var reply = _qmp.ExecuteAsync(command, arguments);
            try
            {
                await Greeted();
            }
            catch (BackupException)
            {
                Observe(reply); // abandoned: it fails when the connection is closed
                throw;
            }
            return await reply;
        }
        catch (QmpGreetingException e)
        {
            // The connection's first command is the first to hear that the address is no QMP monitor.
            throw NotQmp(e);
        }
        catch (IOException e)
        {
            throw new BackupException($"lost the QMP connection to '{Address}' during {command}: {e.Message}", "is the daemon still running?", BackupExitCodes.Source);
        }
    }

    public async Task<IReadOnlyList<SourceNode>> NodesAsync()
    {
        var nodes = (await ExecuteAsync("query-named-block-nodes"))!.AsArray();
        return nodes.Select(n => new SourceNode(
            n!["node-name"]!.GetValue<string>(),
            n["drv"]!.GetValue<string>(),
            n["image"]?["virtual-size"]?.GetValue<long>() ?? 0,
            (n["dirty-bitmaps"]?.AsArray() ?? []).Where(b => b!["name"] is not null).Select(b => new SourceBitmap(
                b!["name"]!.GetValue<string>(),
                b["recording"]?.GetValue<bool>() ?? false,
                b["busy"]?.GetValue<bool>() ?? false,
                b["persistent"]?.GetValue<bool>() ?? false,
                b["inconsistent"]?.GetValue<bool>() ?? false,
                b["count"]?.GetValue<long>() ?? 0,
                b["granularity"]?.GetValue<long>() ?? 0)).ToList())).ToList();
    }

    public async Task<SourceNode> NodeAsync(string name) =>
        (await NodesAsync()).FirstOrDefault(n => n.Name == name)
        ?? throw new BackupException($"the source has no node '{name}'", "pass a node name from query-named-block-nodes with --disk", BackupExitCodes.Usage);

    public async Task<IReadOnlyList<(string Id, string Status, long Offset, long Length)>> JobsAsync() =>
        (await ExecuteAsync("query-block-jobs"))!.AsArray()
            .Select(j => (j!["device"]!.GetValue<string>(), j["status"]?.GetValue<string>() ?? "", j["offset"]!.GetValue<long>(), j["len"]!.GetValue<long>())).ToList();

    public async Task<IReadOnlyList<string>> ExportsAsync() =>
        (await ExecuteAsync("query-block-exports"))!.AsArray().Select(e => e!["id"]!.GetValue<string>()).ToList();

    private static readonly TimeSpan TickInterval = TimeSpan.FromMilliseconds(250);

    /// <summary>Where the events received so far end: taken before starting or cancelling a job, it keeps a wait from
    /// taking an earlier job's end for this one's. Job ids are reused: a run that recovers from a killed one cancels
    /// the old job, and its BLOCK_JOB_CANCELLED stays in the list the new job's wait reads.</summary>
    public int EventMark
    {
        get { lock (_events) return _events.Count; }
    }

    /// <summary>Waits until every listed job has ended (BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED) in an event after
    /// <paramref name="since"/> (an <see cref="EventMark"/>), calling <paramref name="tick"/> about four times a second
    /// meanwhile.</summary>
    public async Task<IReadOnlyDictionary<string, JobOutcome>> WaitJobsAsync(IEnumerable<string> ids, int since, Func<Task>? tick = null, TimeSpan? timeout = null)
    {
        var pending = ids.ToHashSet();
        var outcomes = new Dictionary<string, JobOutcome>();
        var deadline = DateTime.UtcNow + (timeout ?? TimeSpan.FromHours(24));
        int seen = since;
        long lastTick = Stopwatch.GetTimestamp();
        while (pending.Count > 0)
        {
            lock (_events)
            {
                for (; seen < _events.Count; seen++)
                {
                    var e = _events[seen];
                    string name = e["event"]!.GetValue<string>();
                    if (name is not ("BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED")) continue;
                    string device = e["data"]!["device"]!.GetValue<string>();
                    if (!pending.Remove(device)) continue;
                    outcomes[device] = new JobOutcome(device, name == "BLOCK_JOB_COMPLETED", e["data"]!["error"]?.GetValue<string>());
                }
            }
            if (pending.Count == 0) break;
            if (DateTime.UtcNow > deadline) throw new BackupException($"jobs {string.Join(", ", pending)} did not end in time", exitCode: BackupExitCodes.Source);
            if (_pump.IsCompleted) throw new BackupException($"lost the QMP connection to '{Address}' while jobs ran", "is the daemon still running?", BackupExitCodes.Source);
            await _eventArrived.WaitAsync(TickInterval);
            // Not after every event and not at once: a short job sends several events and is over before the first
            // tick, and each tick is a round trip the source answers between the job's own work.
            if (tick is not null && Stopwatch.GetElapsedTime(lastTick) >= TickInterval)
            {
                lastTick = Stopwatch.GetTimestamp();
                await tick();
            }
        }
        return outcomes;
    }

    /// <summary>The first event (since connecting) that matches, waiting up to <paramref name="timeout"/>; null on
    /// timeout or when the connection is lost.</summary>
    public async Task<JsonObject?> NextEventAsync(Func<JsonObject, bool> match, TimeSpan timeout)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            lock (_events)
                if (_events.FirstOrDefault(match) is { } hit) return hit;
            if (_pump.IsCompleted) return null;
            await _eventArrived.WaitAsync(TimeSpan.FromMilliseconds(100));
        }
        return null;
    }

    /// <summary>Waits (briefly) for an event after <paramref name="since"/> (an <see cref="EventMark"/>) matching the
    /// predicate; false on timeout.</summary>
    public async Task<bool> WaitEventAsync(string name, Func<JsonObject, bool> match, TimeSpan timeout, int since)
    {
        var deadline = DateTime.UtcNow + timeout;
        while (DateTime.UtcNow < deadline)
        {
            lock (_events)
                if (_events.Skip(since).Any(e => e["event"]!.GetValue<string>() == name && match(e))) return true;
            await _eventArrived.WaitAsync(TimeSpan.FromMilliseconds(100));
        }
        return false;
    }

    public async ValueTask DisposeAsync() => await _qmp.DisposeAsync();
}
