using System.Collections.Concurrent;

namespace Strata.Backup.Chunks;

/// <summary>What storing one chunk did: its id, and the encoded bytes uploaded (0 when the repository had it).</summary>
public readonly record struct ChunkPut(ChunkId Id, long UploadedBytes);

/// <summary>
/// One backup run's writes into a chunk repository, under a shared lease: chunks first (each stored once), then the
/// point index, published last. Disposed without a commit it leaves only unreferenced chunks, which garbage
/// collection removes after its grace period.
/// </summary>
public sealed class ChunkBackupSession : IAsyncDisposable
{
    private readonly ChunkRepository _repo;
    private readonly RepositoryLease _lease;
    /// <summary>Chunks known to be stored: those the points reference, and those this session stored or found.</summary>
    private readonly ConcurrentDictionary<ChunkId, byte> _known;
    /// <summary>Chunks an interrupted run uploaded (its journal says so) that no point references: stored unless garbage
    /// collection took them since, which one request per chunk tells.</summary>
    private readonly IReadOnlySet<ChunkId> _leftByInterruptedRuns;
    private readonly UploadJournal _journal;
    private long _uploadedBytes, _uploadedChunks, _reusedChunks;

    internal ChunkBackupSession(ChunkRepository repo, RepositoryLease lease, ConcurrentDictionary<ChunkId, byte> known, IReadOnlySet<ChunkId> leftByInterruptedRuns)
    {
        _repo = repo;
        _lease = lease;
        _known = known;
        _leftByInterruptedRuns = leftByInterruptedRuns;
        _journal = new UploadJournal(repo.Store, SessionName(lease.Record));
    }

    /// <summary>A session's name in the journal: the random part of its lease's owner.</summary>
    internal static string SessionName(Strata.Formats.Chunks.ChunkLeaseRecord lease) => lease.Owner[(lease.Owner.LastIndexOf(' ') + 1)..];

    public ChunkRepository Repository => _repo;
    /// <summary>Encoded bytes sent to the store.</summary>
    public long UploadedBytes => Interlocked.Read(ref _uploadedBytes);
    public long UploadedChunks => Interlocked.Read(ref _uploadedChunks);
    /// <summary>Non-zero chunks that were already stored (no upload).</summary>
    public long ReusedChunks => Interlocked.Read(ref _reusedChunks);

    /// <summary>Stores one chunk (<see cref="ChunkRepository.ChunkSize"/> bytes; a disk's last chunk may be shorter) and
    /// returns its id: all-zero → <see cref="ChunkId.Zero"/>, nothing stored; already stored → nothing sent; else
    /// encoded and put create-only (someone else having stored it meanwhile is success). Thread-safe.</summary>
    public async Task<ChunkId> PutChunkAsync(ReadOnlyMemory<byte> plaintext, CancellationToken cancel = default) =>
        (await StoreChunkAsync(plaintext, cancel).ConfigureAwait(false)).Id;

    /// <summary><see cref="PutChunkAsync"/>, saying how many encoded bytes this call stored (0 when none).</summary>
    public async Task<ChunkPut> StoreChunkAsync(ReadOnlyMemory<byte> plaintext, CancellationToken cancel = default)
    {
        if (plaintext.Length == 0 || plaintext.Length > _repo.ChunkSize)
            throw new ArgumentException($"a chunk is 1 to {_repo.ChunkSize} bytes, not {plaintext.Length}", nameof(plaintext));
        var id = _repo.IdOf(plaintext.Span);
        if (id.IsZero) return new ChunkPut(id, 0);
        if (_known.ContainsKey(id))
        {
            Interlocked.Increment(ref _reusedChunks);
            return new ChunkPut(id, 0);
        }
        if (_leftByInterruptedRuns.Contains(id) && await _repo.Store.HeadAsync(ChunkRepository.ChunkKey(id), cancel).ConfigureAwait(false) is not null)
        {
            Interlocked.Increment(ref _reusedChunks);
            _known.TryAdd(id, 0);
            return new ChunkPut(id, 0);
        }
        byte[] blob = _repo.EncodeChunk(id, plaintext.Span);
        long stored = 0;
        if (await _repo.Store.PutIfAbsentAsync(ChunkRepository.ChunkKey(id), blob, cancel).ConfigureAwait(false))
        {
            stored = blob.Length;
            Interlocked.Add(ref _uploadedBytes, blob.Length);
            Interlocked.Increment(ref _uploadedChunks);
            await _journal.AddAsync(id, cancel).ConfigureAwait(false);
        }
        else
        {
            Interlocked.Increment(ref _reusedChunks);
        }
        _known.TryAdd(id, 0);
        return new ChunkPut(id, stored);
    }

    /// <summary>Records the last uploads in the journal: a run killed from now on (while it waits to publish) costs
    /// the next one no upload.</summary>
    public Task FlushJournalAsync(CancellationToken cancel = default) => _journal.FlushAsync(cancel);

    /// <summary>Publishes the point: every chunk it names must be stored (known to this session), the lease must still be
    /// held, and the point id must be free (the index is put create-only).</summary>
    public async Task CommitAsync(ChunkPoint point, CancellationToken cancel = default)
    {
        foreach (var d in point.Disks)
            foreach (var id in d.Chunks)
                if (!id.IsZero && !_known.ContainsKey(id))
                    throw new InvalidOperationException($"disk '{d.Disk}' of point {point.Id} names chunk {id}, which this session did not store");
        byte[] index = _repo.EncodePoint(point);
        await _lease.CheckAsync(cancel).ConfigureAwait(false);
        if (!await _repo.Store.PutIfAbsentAsync(ChunkRepository.PointKey(point.Id), index, cancel).ConfigureAwait(false))
            throw new BackupException($"point {point.Id} already exists in '{_repo.Store.Location}'", "another run published the same id; run again");
        _repo.Remember(point);
        try
        {
            await _journal.DeleteAsync(cancel).ConfigureAwait(false);
        }
        catch (ObjectStoreException)
        {
            // Only a few small objects left behind: garbage collection removes the journals of finished sessions.
        }
    }

    public ValueTask DisposeAsync() => _lease.DisposeAsync();
}
