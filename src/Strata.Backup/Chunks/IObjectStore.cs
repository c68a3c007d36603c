namespace Strata.Backup.Chunks;

/// <summary>One stored object as a listing or a head request sees it.</summary>
public sealed record StoredObject(string Key, long Size, DateTimeOffset LastModified);

/// <summary>
/// The few operations a chunk repository needs of where it lives: an S3 bucket (prefix) or a local folder with the same
/// key layout. Keys are relative, '/'-separated, without a leading slash. Every object the repository writes is
/// immutable except the lease objects; the one atomic primitive it relies on is the create-only put.
/// </summary>
public interface IObjectStore : IDisposable
{
    /// <summary>Where the store is, for messages: <c>s3://BUCKET/PREFIX</c> or a folder path.</summary>
    string Location { get; }

    /// <summary>Creates the object only when no object has the key (S3's <c>If-None-Match: *</c>); false when one
    /// already did, whoever wrote it. Readers never see a partly written object.</summary>
    Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default);

    /// <summary>Creates or replaces the object (leases only: everything else is written once).</summary>
    Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default);

    /// <summary>The object's bytes, or null when there is none.</summary>
    Task<byte[]?> GetAsync(string key, CancellationToken cancel = default);

    /// <summary>The object's size and time, or null when there is none.</summary>
    Task<StoredObject?> HeadAsync(string key, CancellationToken cancel = default);

    /// <summary>Every object whose key starts with <paramref name="prefix"/>, in key order.</summary>
    IAsyncEnumerable<StoredObject> ListAsync(string prefix, CancellationToken cancel = default);

    /// <summary>Removes the object; no error when there is none.</summary>
    Task DeleteAsync(string key, CancellationToken cancel = default);
}

/// <summary>The store failed (unreachable, refused, or answered what it should not); the message says which.</summary>
public sealed class ObjectStoreException(string message, Exception? inner = null) : Exception(message, inner);
