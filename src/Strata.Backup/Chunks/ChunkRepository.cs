using System.Diagnostics.CodeAnalysis;
using System.Collections.Concurrent;
using System.Globalization;
using System.Security.Cryptography;
using System.Text;
using Strata.Block;
using Strata.Formats.Chunks;

namespace Strata.Backup.Chunks;

/// <summary>Where the repository's key comes from: a passphrase or a key file's bytes (null/empty both: none).</summary>
public sealed record ChunkKeySource(string? Passphrase, string? KeyFile)
{
    public bool IsEmpty => string.IsNullOrEmpty(Passphrase) && string.IsNullOrEmpty(KeyFile);
}

/// <summary>What <c>init</c> fixes for the repository's life.</summary>
public sealed record ChunkRepositoryInit
{
    public int ChunkSize { get; init; } = 4 << 20;
    public bool Encrypt { get; init; }
    public ChunkKeySource? Key { get; init; }
}

/// <summary>One disk of a point: its manifest (as the point index's header records it) and its full chunk map
/// (<see cref="ChunkId.Zero"/> = a hole).</summary>
public sealed record ChunkDisk : PointIndexDisk
{
    private readonly IReadOnlyList<ChunkId> _chunks = [];

    public ChunkDisk()
    {
    }

    [SetsRequiredMembers]
    public ChunkDisk(PointIndexDisk header, IReadOnlyList<ChunkId> chunks) : base(header) => Chunks = chunks;

    /// <summary>Setting it sets <see cref="PointIndexDisk.ChunkCount"/>: the two never disagree.</summary>
    public required IReadOnlyList<ChunkId> Chunks
    {
        get => _chunks;
        init
        {
            _chunks = value;
            ChunkCount = value.Count;
        }
    }
}

/// <summary>A published point: every disk of one run at one point in time.</summary>
public sealed record ChunkPoint
{
    public required string Id { get; init; }
    public required DateTimeOffset Time { get; init; }
    public required IReadOnlyList<ChunkDisk> Disks { get; init; }

    public ChunkDisk? Disk(string name) => Disks.FirstOrDefault(d => d.Disk == name);
}

/// <summary>A chunk or point index is missing, changed or unreadable; the message names which.</summary>
public sealed class ChunkIntegrityException(string message) : BackupException(message, "run `strata backup verify` to see what else is damaged");

/// <summary>
/// A repository of deduplicated, compressed, optionally encrypted fixed-size chunks in an object store (issue 17; the
/// layout is in prompts/chunks-design.md): <c>config</c>, <c>chunks/h0h1/h2h3/ID</c>, <c>points/POINT</c>,
/// <c>locks/…</c>. Every object but the leases is written once; a point exists once its index is published.
/// </summary>
public sealed class ChunkRepository : IDisposable
{
    public const string ConfigKey = "config";
    public const string ChunksPrefix = "chunks/";
    public const string PointsPrefix = "points/";

    private readonly ChunkRepositoryConfig _config;
    private readonly byte[] _dataKey;
    private readonly byte[] _idKey;
    private readonly ConcurrentDictionary<string, ChunkPoint> _pointCache = new();

    private ChunkRepository(IObjectStore store, ChunkRepositoryConfig config, byte[] dataKey, byte[] idKey)
    {
        Store = store;
        _config = config;
        _dataKey = dataKey;
        _idKey = idKey;
    }

    public IObjectStore Store { get; }
    public string Tag => _config.Tag;
    public string BitmapPrefix => $"strata-{Tag}-";
    public int ChunkSize => _config.ChunkSize;
    public bool Encrypted => _config.Encryption is not null;

    public static string ChunkKey(ChunkId id)
    {
        string hex = id.ToString();
        return $"{ChunksPrefix}{hex[..2]}/{hex[2..4]}/{hex}";
    }

    public static string PointKey(string pointId) => PointsPrefix + pointId;

    /// <summary>True when the store holds a chunk repository's config (whatever it says): what the CLI tests to pick
    /// the repository kind of a folder.</summary>
    public static async Task<bool> ExistsAsync(IObjectStore store, CancellationToken cancel = default) =>
        await store.HeadAsync(ConfigKey, cancel).ConfigureAwait(false) is not null;

    public static async Task<ChunkRepository> InitAsync(IObjectStore store, ChunkRepositoryInit init, CancellationToken cancel = default)
    {
        if (!ChunkRepositoryConfig.IsValidChunkSize(init.ChunkSize))
            throw new BackupException($"invalid chunk size {init.ChunkSize}", "use a power of two from 4K to 64M", BackupExitCodes.Usage);
        if (await ExistsAsync(store, cancel).ConfigureAwait(false))
            throw new BackupException($"'{store.Location}' is already a repository", exitCode: BackupExitCodes.Usage);
        byte[] keys = RandomNumberGenerator.GetBytes(ChunkKeys.KeyMaterialSize);
        byte[] dataKey = keys[..ChunkKeys.KeySize], idKey = keys[ChunkKeys.KeySize..];
        ChunkEncryptionConfig? encryption = null;
        if (init.Encrypt)
        {
            if (init.Key is null || init.Key.IsEmpty)
                throw new BackupException("--encrypt needs a passphrase or a key file", "give --passphrase-file FILE, --key-file FILE or STRATA_PASSPHRASE", BackupExitCodes.Usage);
            byte[] salt = RandomNumberGenerator.GetBytes(ChunkKeys.SaltSize);
            byte[] kek = ChunkKeys.DeriveKek(SecretOf(init.Key), salt, ChunkKeys.DefaultMemoryKib, ChunkKeys.DefaultIterations, ChunkKeys.DefaultParallelism);
            encryption = new ChunkEncryptionConfig
            {
                Salt = salt,
                MemoryKib = ChunkKeys.DefaultMemoryKib,
                Iterations = ChunkKeys.DefaultIterations,
                Parallelism = ChunkKeys.DefaultParallelism,
                WrappedKeys = ChunkKeys.Wrap(kek, keys, RandomNumberGenerator.GetBytes(ChunkKeys.NonceSize)),
            };
        }
        var config = new ChunkRepositoryConfig
        {
            Tag = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(4)),
            ChunkSize = init.ChunkSize,
            Created = DateTimeOffset.UtcNow,
            Encryption = encryption,
            IdKey = encryption is null ? idKey : null,
        };
        if (!await store.PutIfAbsentAsync(ConfigKey, config.Serialize(), cancel).ConfigureAwait(false))
            throw new BackupException($"'{store.Location}' is already a repository (created meanwhile)", exitCode: BackupExitCodes.Usage);
        return new ChunkRepository(store, config, encryption is null ? [] : dataKey, idKey);
    }

    public static async Task<ChunkRepository> OpenAsync(IObjectStore store, ChunkKeySource? key, CancellationToken cancel = default)
    {
        var bytes = await store.GetAsync(ConfigKey, cancel).ConfigureAwait(false)
            ?? throw new BackupException($"'{store.Location}' is not a chunk repository (it has no config)", $"create one with: strata backup init {store.Location} --chunks", BackupExitCodes.Usage);
        ChunkRepositoryConfig config;
        try
        {
            config = ChunkRepositoryConfig.Parse(bytes);
        }
        catch (ChunkFormatException e)
        {
            throw new BackupException($"the config of '{store.Location}' is damaged: {e.Message}");
        }
        if (config.Encryption is not { } enc) return new ChunkRepository(store, config, [], config.IdKey!);
        if (key is null || key.IsEmpty)
            throw new BackupException($"'{store.Location}' is encrypted", "give --passphrase-file FILE, --key-file FILE or STRATA_PASSPHRASE", BackupExitCodes.Usage);
        byte[] kek = ChunkKeys.DeriveKek(SecretOf(key), enc.Salt, enc.MemoryKib, enc.Iterations, enc.Parallelism);
        byte[] keys;
        try
        {
            keys = ChunkKeys.Unwrap(kek, enc.WrappedKeys);
        }
        catch (ChunkKeyException)
        {
            throw new BackupException($"wrong passphrase or key file for '{store.Location}'", "the repository's keys did not decrypt with it", BackupExitCodes.Usage);
        }
        return new ChunkRepository(store, config, keys[..ChunkKeys.KeySize], keys[ChunkKeys.KeySize..]);
    }

    private static byte[] SecretOf(ChunkKeySource key)
    {
        if (!string.IsNullOrEmpty(key.Passphrase) && !string.IsNullOrEmpty(key.KeyFile))
            throw new BackupException("give a passphrase or a key file, not both", exitCode: BackupExitCodes.Usage);
        if (!string.IsNullOrEmpty(key.Passphrase)) return Encoding.UTF8.GetBytes(key.Passphrase);
        try
        {
            byte[] bytes = File.ReadAllBytes(key.KeyFile!);
            if (bytes.Length == 0) throw new BackupException($"key file '{key.KeyFile}' is empty", exitCode: BackupExitCodes.Usage);
            return bytes;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new BackupException($"cannot read key file '{key.KeyFile}': {e.Message}", exitCode: BackupExitCodes.Usage);
        }
    }

    // ------------------------------------------------------------------ chunks

    /// <summary>The id of a chunk's plaintext (zero for an all-zero chunk).</summary>
    public ChunkId IdOf(ReadOnlySpan<byte> plaintext)
    {
        if (ChunkKeys.IsAllZero(plaintext)) return ChunkId.Zero;
        Span<byte> id = stackalloc byte[ChunkId.Size];
        ChunkKeys.ChunkId(_idKey, plaintext, id);
        return ChunkId.FromBytes(id);
    }

    /// <summary>The stored form of a chunk: a chunk blob bound to its id.</summary>
    public byte[] EncodeChunk(ChunkId id, ReadOnlySpan<byte> plaintext) =>
        ChunkBlob.Encode(ChunkBlob.ChunkMagic, plaintext, _dataKey, id.ToBytes(), _dataKey.Length > 0 ? RandomNumberGenerator.GetBytes(ChunkKeys.NonceSize) : default);

    public async Task<byte[]> ReadChunkAsync(ChunkId id, int length, CancellationToken cancel = default)
    {
        if (length < 0 || length > ChunkSize) throw new ArgumentOutOfRangeException(nameof(length));
        if (id.IsZero) return new byte[length];
        var blob = await Store.GetAsync(ChunkKey(id), cancel).ConfigureAwait(false)
            ?? throw new ChunkIntegrityException($"chunk {id} is missing from the repository");
        return DecodeChunk(id, blob, length);
    }

    /// <summary>Opens a stored chunk and checks it is the chunk <paramref name="id"/> names, <paramref name="length"/> bytes.</summary>
    public byte[] DecodeChunk(ChunkId id, ReadOnlySpan<byte> blob, int length)
    {
        byte[] plaintext;
        try
        {
            plaintext = ChunkBlob.Decode(ChunkBlob.ChunkMagic, blob, _dataKey, id.ToBytes(), ChunkSize);
        }
        catch (ChunkFormatException e)
        {
            throw new ChunkIntegrityException($"chunk {id} is corrupt: {e.Message}");
        }
        if (IdOf(plaintext) != id) throw new ChunkIntegrityException($"chunk {id} is corrupt: its contents do not match its id");
        if (plaintext.Length != length) throw new ChunkIntegrityException($"chunk {id} holds {plaintext.Length} bytes where {length} were expected");
        return plaintext;
    }

    // ------------------------------------------------------------------ points

    /// <summary>Every published point, oldest first (index objects are immutable, so they are read once).</summary>
    public async Task<IReadOnlyList<ChunkPoint>> PointsAsync(CancellationToken cancel = default)
    {
        var points = new List<ChunkPoint>();
        var listed = new HashSet<string>();
        await foreach (var o in Store.ListAsync(PointsPrefix, cancel).ConfigureAwait(false))
        {
            listed.Add(o.Key);
            if (!_pointCache.TryGetValue(o.Key, out var point))
            {
                point = await ReadPointAsync(o.Key[PointsPrefix.Length..], cancel).ConfigureAwait(false);
                if (point is null) continue; // pruned between the listing and the read
                _pointCache[o.Key] = point;
            }
            points.Add(point);
        }
        foreach (var stale in _pointCache.Keys.Where(k => !listed.Contains(k))) _pointCache.TryRemove(stale, out _);
        return points.OrderBy(p => p.Time).ThenBy(p => p.Id, StringComparer.Ordinal).ToList();
    }

    /// <summary>One point's index, read and checked (null when there is none).</summary>
    public async Task<ChunkPoint?> ReadPointAsync(string pointId, CancellationToken cancel = default)
    {
        string key = PointKey(pointId);
        var blob = await Store.GetAsync(key, cancel).ConfigureAwait(false);
        return blob is null ? null : DecodePoint(pointId, blob);
    }

    private ChunkPoint DecodePoint(string pointId, byte[] blob)
    {
        string key = PointKey(pointId);
        try
        {
            byte[] body = ChunkBlob.Decode(ChunkBlob.PointIndexMagic, blob, _dataKey, Encoding.UTF8.GetBytes(key), Array.MaxLength);
            var (header, tables) = PointIndexCodec.Decode(body);
            if (header.Id != pointId) throw new ChunkFormatException($"it names point '{header.Id}'");
            if (header.ChunkSize != ChunkSize) throw new ChunkFormatException($"its chunk size {header.ChunkSize} is not the repository's {ChunkSize}");
            return new ChunkPoint
            {
                Id = header.Id,
                Time = header.Time,
                Disks = header.Disks.Select((d, i) => new ChunkDisk(d, ChunkId.ReadTable(tables[i]))).ToList(),
            };
        }
        catch (ChunkFormatException e)
        {
            throw new ChunkIntegrityException($"point index '{key}' is corrupt: {e.Message}");
        }
    }

    /// <summary>The stored form of a point's index (what <see cref="ChunkBackupSession.CommitAsync"/> publishes).</summary>
    public byte[] EncodePoint(ChunkPoint point)
    {
        var header = new PointIndexHeader
        {
            Id = point.Id,
            Time = point.Time,
            ChunkSize = ChunkSize,
            // Written as the header's type: the ids go into the body's tables, not the JSON.
            Disks = point.Disks.Cast<PointIndexDisk>().ToList(),
        };
        foreach (var d in point.Disks)
            if (d.Chunks.Count != PointIndexCodec.ChunkCount(d.VirtualSize, ChunkSize))
                throw new ArgumentException($"disk '{d.Disk}' has {d.Chunks.Count} chunk ids for {d.VirtualSize} bytes in {ChunkSize}-byte chunks");
        byte[] body = PointIndexCodec.Encode(header, point.Disks.Select(d => (ReadOnlyMemory<byte>)ChunkId.WriteTable(d.Chunks)).ToList());
        string key = PointKey(point.Id);
        return ChunkBlob.Encode(ChunkBlob.PointIndexMagic, body, _dataKey, Encoding.UTF8.GetBytes(key),
            _dataKey.Length > 0 ? RandomNumberGenerator.GetBytes(ChunkKeys.NonceSize) : default);
    }

    internal void Remember(ChunkPoint point) => _pointCache[PointKey(point.Id)] = point;

    /// <summary>The newest point holding this disk, or null.</summary>
    public async Task<(ChunkPoint Point, ChunkDisk Disk)?> LatestAsync(string disk, CancellationToken cancel = default)
    {
        var points = await PointsAsync(cancel).ConfigureAwait(false);
        for (int i = points.Count - 1; i >= 0; i--)
            if (points[i].Disk(disk) is { } d) return (points[i], d);
        return null;
    }

    /// <summary>A fresh point id from the time: sortable, unique among the published points.</summary>
    public async Task<string> NewIdAsync(DateTimeOffset now, CancellationToken cancel = default)
    {
        string baseId = now.UtcDateTime.ToString("yyyyMMdd'T'HHmmss'Z'", CultureInfo.InvariantCulture);
        string id = baseId;
        for (int n = 2; await Store.HeadAsync(PointKey(id), cancel).ConfigureAwait(false) is not null; n++) id = $"{baseId}-{n}";
        return id;
    }

    /// <summary>Starts a backup: takes a shared lease (refused while garbage collection holds the exclusive one), then
    /// loads the chunk ids the points reference, so chunks already stored cost no request.</summary>
    public async Task<ChunkBackupSession> BeginBackupAsync(CancellationToken cancel = default)
    {
        var lease = await RepositoryLeases.AcquireSharedAsync(Store, "backup", cancel: cancel).ConfigureAwait(false);
        try
        {
            var known = new ConcurrentDictionary<ChunkId, byte>();
            foreach (var p in await PointsAsync(cancel).ConfigureAwait(false))
                foreach (var d in p.Disks)
                    foreach (var id in d.Chunks)
                        if (!id.IsZero) known.TryAdd(id, 0);
            // A run killed before its point was published left its uploads in its journal: found, they are not sent again.
            var live = (await RepositoryLeases.LiveSharedAsync(Store, cancel).ConfigureAwait(false)).Select(ChunkBackupSession.SessionName).ToHashSet();
            var left = await UploadJournal.LeftByDeadSessionsAsync(Store, live, cancel).ConfigureAwait(false);
            left.ExceptWith(known.Keys);
            return new ChunkBackupSession(this, lease, known, left);
        }
        catch
        {
            await lease.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>One disk of one point as a read-only image; chunks are fetched when read, the last
    /// <paramref name="cacheChunks"/> kept.</summary>
    public BlockImage OpenDisk(ChunkPoint point, string disk, int cacheChunks = 16)
    {
        var d = point.Disk(disk) ?? throw new BackupException($"point {point.Id} has no disk '{disk}'",
            "disks of this point: " + string.Join(", ", point.Disks.Select(x => x.Disk)), BackupExitCodes.Usage);
        return new ChunkDiskImage(this, point, d, cacheChunks);
    }

    public void Dispose() => Store.Dispose();
}
