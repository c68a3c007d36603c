namespace Strata.Backup.Chunks;

/// <summary>
/// What a backup session has uploaded so far, so that a run killed before its point was published does not upload
/// the same chunks again: fragments <c>journal/SESSION/SEQ</c>, each the ids (32 bytes apiece) of the chunks stored
/// since the one before, written every <see cref="FragmentChunks"/> uploads and immutable. A chunk named only by a
/// journal is unreferenced: garbage collection may have deleted it since, so a later session checks that it still
/// exists before leaving it out. The session deletes its own journal once its point is published; garbage
/// collection deletes the journals of sessions whose lease is gone.
/// </summary>
internal sealed class UploadJournal(IObjectStore store, string session)
{
    public const string Prefix = "journal/";
    public const int FragmentChunks = 16;
    public const int FragmentSeconds = 2;

    private readonly List<ChunkId> _pending = [];
    private readonly SemaphoreSlim _writing = new(1, 1);
    private int _sequence;
    private long _lastWrite = Environment.TickCount64;

    /// <summary>Records an uploaded chunk; every <see cref="FragmentChunks"/> of them, or what came in the last
    /// <see cref="FragmentSeconds"/>, go out as one fragment.</summary>
    public async Task AddAsync(ChunkId id, CancellationToken cancel)
    {
        ChunkId[] fragment;
        lock (_pending)
        {
            _pending.Add(id);
            if (_pending.Count < FragmentChunks && Environment.TickCount64 - _lastWrite < FragmentSeconds * 1000) return;
            fragment = [.. _pending];
            _pending.Clear();
            _lastWrite = Environment.TickCount64;
        }
        await WriteAsync(fragment, cancel).ConfigureAwait(false);
    }

    /// <summary>Writes what is pending (every chunk is stored: a kill from now on loses no upload).</summary>
    public async Task FlushAsync(CancellationToken cancel)
    {
        ChunkId[] fragment;
        lock (_pending)
        {
            if (_pending.Count == 0) return;
            fragment = [.. _pending];
            _pending.Clear();
            _lastWrite = Environment.TickCount64;
        }
        await WriteAsync(fragment, cancel).ConfigureAwait(false);
    }

    private async Task WriteAsync(ChunkId[] ids, CancellationToken cancel)
    {
        await _writing.WaitAsync(cancel).ConfigureAwait(false);
        try
        {
            string key = $"{Prefix}{session}/{_sequence++:D8}";
            await store.PutIfAbsentAsync(key, ChunkId.WriteTable(ids), cancel).ConfigureAwait(false);
        }
        finally
        {
            _writing.Release();
        }
    }

    /// <summary>Removes this session's fragments (its point is published: the index names its chunks now).</summary>
    public async Task DeleteAsync(CancellationToken cancel)
    {
        await foreach (var o in store.ListAsync($"{Prefix}{session}/", cancel).ConfigureAwait(false))
            await store.DeleteAsync(o.Key, cancel).ConfigureAwait(false);
    }

    /// <summary>The sessions that left a journal, by session name.</summary>
    public static async Task<Dictionary<string, List<string>>> ListAsync(IObjectStore store, CancellationToken cancel)
    {
        var sessions = new Dictionary<string, List<string>>();
        await foreach (var o in store.ListAsync(Prefix, cancel).ConfigureAwait(false))
        {
            string rest = o.Key[Prefix.Length..];
            int slash = rest.IndexOf('/');
            if (slash <= 0) continue;
            string name = rest[..slash];
            if (!sessions.TryGetValue(name, out var keys)) sessions[name] = keys = [];
            keys.Add(o.Key);
        }
        return sessions;
    }

    /// <summary>The chunk ids the journals of sessions no longer running (not in <paramref name="live"/>) name.</summary>
    public static async Task<HashSet<ChunkId>> LeftByDeadSessionsAsync(IObjectStore store, IReadOnlySet<string> live, CancellationToken cancel)
    {
        var ids = new HashSet<ChunkId>();
        foreach (var (name, keys) in await ListAsync(store, cancel).ConfigureAwait(false))
        {
            if (live.Contains(name)) continue;
            foreach (string key in keys)
                if (await store.GetAsync(key, cancel).ConfigureAwait(false) is { } table && table.Length % ChunkId.Size == 0)
                    ids.UnionWith(ChunkId.ReadTable(table));
        }
        return ids;
    }
}
