using Strata.Formats.Chunks;

namespace Strata.Backup.Chunks;

/// <summary>
/// One held lease object. It is renewed in the background (overwritten with a later expiry) every third of its time to
/// live; <see cref="CheckAsync"/> says whether it is still ours and unexpired (a backup asks right before it publishes
/// its point). Disposing stops the renewal and deletes the object.
/// </summary>
public sealed class RepositoryLease : IAsyncDisposable
{
    private readonly IObjectStore _store;
    private readonly TimeSpan _ttl;
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _renewal;
    private DateTimeOffset _expires;
    private string? _lost;

    internal RepositoryLease(IObjectStore store, string key, ChunkLeaseRecord record, TimeSpan ttl)
    {
        _store = store;
        Key = key;
        Record = record;
        _ttl = ttl;
        _expires = record.Expires;
        _renewal = RenewAsync(_stop.Token);
    }

    public string Key { get; }
    public ChunkLeaseRecord Record { get; private set; }

    private async Task RenewAsync(CancellationToken stop)
    {
        try
        {
            while (true)
            {
                await Task.Delay(_ttl / 3, stop).ConfigureAwait(false);
                try
                {
                    // Someone who took it for expired may have deleted it: then it is lost, not silently recreated.
                    var current = await _store.GetAsync(Key, stop).ConfigureAwait(false);
                    if (current is null || ChunkLeaseRecord.TryParse(current)?.Owner != Record.Owner)
                    {
                        _lost = $"the lease '{Key}' was removed by another process";
                        return;
                    }
                    var renewed = Record with { Expires = DateTimeOffset.UtcNow + _ttl };
                    await _store.PutAsync(Key, renewed.Serialize(), stop).ConfigureAwait(false);
                    Record = renewed;
                    _expires = renewed.Expires;
                }
                catch (ObjectStoreException)
                {
                    // A failed renewal is retried at the next tick; CheckAsync tells whether the lease ran out meanwhile.
                }
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    /// <summary>Throws (exit code 3) unless the lease object is still ours and has not expired.</summary>
    public async Task CheckAsync(CancellationToken cancel = default)
    {
        if (_lost is not null) throw new BackupException(_lost, "the repository was taken over meanwhile (garbage collection?); run again", BackupExitCodes.Locked);
        if (_expires <= DateTimeOffset.UtcNow)
            throw new BackupException($"the lease '{Key}' expired at {_expires:O}", "the process was stalled longer than the lease; run again", BackupExitCodes.Locked);
        var current = await _store.GetAsync(Key, cancel).ConfigureAwait(false);
        if (current is null || ChunkLeaseRecord.TryParse(current)?.Owner != Record.Owner)
            throw new BackupException($"the lease '{Key}' was removed by another process", "the repository was taken over meanwhile (garbage collection?); run again", BackupExitCodes.Locked);
    }

    public async ValueTask DisposeAsync()
    {
        if (_stop.IsCancellationRequested) return;
        _stop.Cancel();
        await _renewal.ConfigureAwait(false);
        _stop.Dispose();
        try
        {
            // Only our own: once expired, the key may have been retaken by another process.
            var current = await _store.GetAsync(Key).ConfigureAwait(false);
            if (current is not null && ChunkLeaseRecord.TryParse(current)?.Owner == Record.Owner)
                await _store.DeleteAsync(Key).ConfigureAwait(false);
        }
        catch (ObjectStoreException)
        {
            // It expires by itself; whoever finds it expired deletes it.
        }
    }
}

/// <summary>
/// The leases that keep garbage collection and backups apart (object-storage §5.4): a backup holds a shared lease
/// <c>locks/shared/UUID</c>, garbage collection the exclusive <c>locks/exclusive</c>, both created with the create-only
/// put. Dekker order: each side creates its own lease first and only then lists the other kind, so with a strongly
/// consistent listing at least one of two racing sides sees the other. Expired leases are ignored and deleted.
/// </summary>
public static class RepositoryLeases
{
    public const string SharedPrefix = "locks/shared/";
    public const string ExclusiveKey = "locks/exclusive";
    public static readonly TimeSpan DefaultTtl = TimeSpan.FromMinutes(10);
    /// <summary>How long past its expiry garbage collection still respects a shared lease: a backup paused just past
    /// its expiry re-checks its lease before publishing, and this covers clock skew between hosts.</summary>
    public static readonly TimeSpan SharedSafetyMargin = TimeSpan.FromMinutes(1);

    private static ChunkLeaseRecord NewRecord(string purpose, TimeSpan ttl) =>
        new($"{purpose} {Guid.NewGuid():N}", Environment.MachineName, Environment.ProcessId, DateTimeOffset.UtcNow + ttl);

    /// <summary>A backup's lease. Refused (exit code 3) while garbage collection holds a live exclusive lease.</summary>
    public static async Task<RepositoryLease> AcquireSharedAsync(IObjectStore store, string purpose, TimeSpan? ttl = null, CancellationToken cancel = default)
    {
        var time = ttl ?? DefaultTtl;
        var record = NewRecord(purpose, time);
        string key = SharedPrefix + Guid.NewGuid().ToString("N");
        if (!await store.PutIfAbsentAsync(key, record.Serialize(), cancel).ConfigureAwait(false))
            throw new BackupException($"lease '{key}' already exists", "a random lease name collided; run again");
        var exclusive = await ReadLiveAsync(store, ExclusiveKey, TimeSpan.Zero, cancel).ConfigureAwait(false);
        if (exclusive is not null)
        {
            await store.DeleteAsync(key, cancel).ConfigureAwait(false);
            throw new BackupException($"the repository is locked by garbage collection ({Describe(exclusive)})",
                "run the backup again when it has finished", BackupExitCodes.Locked);
        }
        return new RepositoryLease(store, key, record, time);
    }

    /// <summary>Garbage collection's lease: taken (an expired one is deleted and retaken), then held while live shared
    /// leases remain, up to <paramref name="waitForBackups"/>; refused with exit code 3 when another holds it or the
    /// backups do not finish in time.</summary>
    public static async Task<RepositoryLease> AcquireExclusiveAsync(IObjectStore store, string purpose, TimeSpan waitForBackups, TimeSpan? ttl = null,
        TimeSpan? pollInterval = null, CancellationToken cancel = default)
    {
        var time = ttl ?? DefaultTtl;
        var record = NewRecord(purpose, time);
        while (!await store.PutIfAbsentAsync(ExclusiveKey, record.Serialize(), cancel).ConfigureAwait(false))
        {
            var holder = await ReadLiveAsync(store, ExclusiveKey, TimeSpan.Zero, cancel).ConfigureAwait(false);
            if (holder is not null)
                throw new BackupException($"the repository is locked by another garbage collection ({Describe(holder)})", "wait for it to finish", BackupExitCodes.Locked);
        }
        var lease = new RepositoryLease(store, ExclusiveKey, record, time);
        var deadline = DateTimeOffset.UtcNow + waitForBackups;
        var poll = pollInterval ?? TimeSpan.FromSeconds(2);
        try
        {
            while (true)
            {
                var backups = await LiveSharedAsync(store, cancel).ConfigureAwait(false);
                if (backups.Count == 0) return lease;
                if (DateTimeOffset.UtcNow >= deadline)
                    throw new BackupException($"{backups.Count} backup(s) still hold the repository ({string.Join("; ", backups.Select(Describe))})",
                        "run garbage collection again when they have finished", BackupExitCodes.Locked);
                await Task.Delay(poll, cancel).ConfigureAwait(false);
            }
        }
        catch
        {
            await lease.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>The live shared leases; expired ones (past expiry plus the safety margin) are deleted on the way.</summary>
    public static async Task<List<ChunkLeaseRecord>> LiveSharedAsync(IObjectStore store, CancellationToken cancel = default)
    {
        var live = new List<ChunkLeaseRecord>();
        await foreach (var o in store.ListAsync(SharedPrefix, cancel).ConfigureAwait(false))
            if (await ReadLiveAsync(store, o.Key, SharedSafetyMargin, cancel).ConfigureAwait(false) is { } lease) live.Add(lease);
        return live;
    }

    /// <summary>The lease at <paramref name="key"/> if it is live; an expired or unreadable one is deleted.</summary>
    private static async Task<ChunkLeaseRecord?> ReadLiveAsync(IObjectStore store, string key, TimeSpan margin, CancellationToken cancel)
    {
        var bytes = await store.GetAsync(key, cancel).ConfigureAwait(false);
        if (bytes is null) return null;
        var lease = ChunkLeaseRecord.TryParse(bytes);
        if (lease is not null && lease.Expires + margin > DateTimeOffset.UtcNow && !HolderIsGone(lease)) return lease;
        await store.DeleteAsync(key, cancel).ConfigureAwait(false);
        return null;
    }

    /// <summary>A lease taken on this machine by a process that no longer runs (killed, crashed): nobody holds it, and
    /// waiting out its time to live would only stall garbage collection or the next backup. A reused pid only makes
    /// the lease look held for longer.</summary>
    private static bool HolderIsGone(ChunkLeaseRecord lease) =>
        lease.Host == Environment.MachineName && OperatingSystem.IsLinux() && !Directory.Exists($"/proc/{lease.Pid}");

    private static string Describe(ChunkLeaseRecord lease) => $"{lease.Owner.Split(' ')[0]} on {lease.Host}, pid {lease.Pid}, until {lease.Expires:O}";
}
