using System.Collections.Concurrent;
using System.Text;
using Strata.Backup.Chunks;
using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// What the chunk repository relies on of an object store, checked the same way on every implementation: the folder
/// store and the S3 store against a real radosgw. Above all the create-only put: of many writers racing for one key
/// exactly one wins, and the stored bytes are the winner's.
/// </summary>
public abstract class ObjectStoreContract : IDisposable
{
    protected abstract IObjectStore Store { get; }

    private static byte[] Bytes(string text) => Encoding.UTF8.GetBytes(text);

    /// <summary>Distinct bytes per writer and key, long enough that a mix of two writes would show.</summary>
    private static byte[] Payload(int writer, int key)
    {
        var bytes = new byte[8192];
        new Random(writer * 1000 + key).NextBytes(bytes);
        Encoding.ASCII.GetBytes($"writer {writer} key {key}").CopyTo(bytes, 0);
        return bytes;
    }

    [Fact]
    public async Task CreateOnlyPutWritesOnceAndKeepsTheFirstBytes()
    {
        Assert.True(await Store.PutIfAbsentAsync("points/p1", Bytes("first")));
        Assert.False(await Store.PutIfAbsentAsync("points/p1", Bytes("second")));
        Assert.Equal("first", Encoding.UTF8.GetString((await Store.GetAsync("points/p1"))!));
    }

    [Fact]
    public async Task PutReplacesAndGetReturnsTheBytes()
    {
        var big = new byte[5 << 20];
        new Random(7).NextBytes(big);
        await Store.PutAsync("locks/shared/a", Bytes("one"));
        await Store.PutAsync("locks/shared/a", big);
        Assert.Equal(big, await Store.GetAsync("locks/shared/a"));
        await Store.PutAsync("empty", Array.Empty<byte>());
        Assert.Equal(Array.Empty<byte>(), await Store.GetAsync("empty"));
        // A slice of a larger array: only the slice is stored.
        await Store.PutAsync("slice", big.AsMemory(100, 1000));
        Assert.Equal(big.AsSpan(100, 1000).ToArray(), await Store.GetAsync("slice"));
    }

    [Fact]
    public async Task MissingKeysReadAsNull()
    {
        Assert.Null(await Store.GetAsync("chunks/00/00/none"));
        Assert.Null(await Store.HeadAsync("chunks/00/00/none"));
        Assert.Empty(await ToListAsync(Store.ListAsync("chunks/")));
    }

    [Fact]
    public async Task HeadGivesSizeAndModificationTime()
    {
        var before = DateTimeOffset.UtcNow.AddMinutes(-5);
        await Store.PutAsync("config", new byte[1234]);
        var head = await Store.HeadAsync("config");
        Assert.NotNull(head);
        Assert.Equal("config", head.Key);
        Assert.Equal(1234, head.Size);
        Assert.InRange(head.LastModified, before, DateTimeOffset.UtcNow.AddMinutes(5));
    }

    [Fact]
    public async Task ListGivesTheKeysUnderAPrefixInKeyOrder()
    {
        string[] keys = ["chunks/ab/cd/2", "chunks/ab/cd/10", "chunks/ab/ce/1", "chunks/abc", "chunks/ab/cd/1", "points/x", "chunksx"];
        foreach (var k in keys) await Store.PutAsync(k, Bytes(k));
        var all = await ToListAsync(Store.ListAsync(""));
        Assert.Equal(keys.Order(StringComparer.Ordinal), all.Select(o => o.Key));
        Assert.Equal(all.Select(o => (long)o.Key.Length), all.Select(o => o.Size));
        Assert.Equal(["chunks/ab/cd/1", "chunks/ab/cd/10", "chunks/ab/cd/2", "chunks/ab/ce/1", "chunks/abc"],
            (await ToListAsync(Store.ListAsync("chunks/"))).Select(o => o.Key));
        // A prefix is a string prefix, not a folder: "chunks/ab" matches "chunks/abc" too.
        Assert.Equal(["chunks/ab/cd/1", "chunks/ab/cd/10", "chunks/ab/cd/2", "chunks/ab/ce/1", "chunks/abc"],
            (await ToListAsync(Store.ListAsync("chunks/ab"))).Select(o => o.Key));
        Assert.Equal(["chunks/ab/cd/1", "chunks/ab/cd/10"], (await ToListAsync(Store.ListAsync("chunks/ab/cd/1"))).Select(o => o.Key));
        Assert.Empty(await ToListAsync(Store.ListAsync("chunks/zz/")));
    }

    [Fact]
    public async Task DeleteRemovesAndIsIdempotent()
    {
        await Store.PutAsync("locks/exclusive", Bytes("lease"));
        await Store.DeleteAsync("locks/exclusive");
        Assert.Null(await Store.GetAsync("locks/exclusive"));
        await Store.DeleteAsync("locks/exclusive");
        await Store.DeleteAsync("never/was/here");
        // Deleted, the key can be created again.
        Assert.True(await Store.PutIfAbsentAsync("locks/exclusive", Bytes("next")));
    }

    [Fact]
    public async Task RacingCreateOnlyWritersGetExactlyOneWinnerPerKey()
    {
        const int writers = 8, keys = 50;
        var wins = new ConcurrentDictionary<int, ConcurrentBag<int>>();
        using var start = new Barrier(writers);
        var tasks = Enumerable.Range(0, writers).Select(w => Task.Run(async () =>
        {
            start.SignalAndWait();
            for (int k = 0; k < keys; k++)
            {
                if (await Store.PutIfAbsentAsync($"race/{k:D3}", Payload(w, k)))
                    wins.GetOrAdd(k, _ => []).Add(w);
            }
        })).ToArray();
        await Task.WhenAll(tasks);
        for (int k = 0; k < keys; k++)
        {
            Assert.True(wins.TryGetValue(k, out var winners) && winners.Count == 1,
                $"key {k}: winners {(winners is null ? "none" : string.Join(",", winners))}");
            Assert.Equal(Payload(winners!.Single(), k), await Store.GetAsync($"race/{k:D3}"));
        }
        Assert.Equal(keys, (await ToListAsync(Store.ListAsync("race/"))).Count);
    }

    protected static async Task<List<StoredObject>> ToListAsync(IAsyncEnumerable<StoredObject> objects)
    {
        var list = new List<StoredObject>();
        await foreach (var o in objects) list.Add(o);
        return list;
    }

    public virtual void Dispose()
    {
        Store.Dispose();
        GC.SuppressFinalize(this);
    }
}

public sealed class FolderObjectStoreContractTests : ObjectStoreContract
{
    private readonly TempDir _dir = new();
    private readonly FolderObjectStore _store;

    public FolderObjectStoreContractTests()
    {
        _store = new FolderObjectStore(_dir["repo"]);
    }

    protected override IObjectStore Store => _store;

    [Fact]
    public void OpenOfAnythingButAnS3AddressIsAFolder()
    {
        using var store = ObjectStores.Open(_dir["elsewhere"]);
        Assert.Equal(_dir["elsewhere"], Assert.IsType<FolderObjectStore>(store).Root);
        var e = Assert.Throws<ObjectStoreException>(() => ObjectStores.Open(_dir["elsewhere"], "http://127.0.0.1:1"));
        Assert.Contains("--endpoint is for s3://", e.Message);
    }

    public override void Dispose()
    {
        base.Dispose();
        _dir.Dispose();
    }
}

/// <summary>The contract on radosgw (a fresh bucket per test), plus what only S3 has: paging, buckets, the probe,
/// prefixes sharing a bucket, and the errors a user sees.</summary>
[Collection(CephCollection.Name)]
public sealed class S3ObjectStoreContractTests : ObjectStoreContract
{
    private readonly CephCluster _ceph;
    private readonly string _bucket;
    private readonly S3ObjectStore _store;

    public S3ObjectStoreContractTests(CephCluster ceph)
    {
        _ceph = ceph;
        _bucket = ceph.NewBucket("contract");
        _store = ceph.OpenStore(_bucket, "repo/one");
    }

    protected override IObjectStore Store => _store;

    [Fact]
    public async Task ListingPagesPastAThousandKeys()
    {
        const int count = 1050;
        await Parallel.ForEachAsync(Enumerable.Range(0, count), new ParallelOptions { MaxDegreeOfParallelism = 16 },
            async (i, c) => await _store.PutAsync($"chunks/{i:D5}", Bytes4(i), c));
        var listed = await ToListAsync(_store.ListAsync("chunks/"));
        Assert.Equal(Enumerable.Range(0, count).Select(i => $"chunks/{i:D5}"), listed.Select(o => o.Key));
        Assert.All(listed, o => Assert.Equal(4, o.Size));
    }

    private static byte[] Bytes4(int i) => BitConverter.GetBytes(i);

    [Fact]
    public async Task KeysLiveUnderThePrefixAndOtherPrefixesDoNotSeeThem()
    {
        Assert.Equal($"s3://{_bucket}/repo/one", _store.Location);
        await _store.PutAsync("config", "a"u8.ToArray());
        using var other = _ceph.OpenStore(_bucket, "repo/one-more/");
        using var whole = _ceph.OpenStore(_bucket);
        Assert.Null(await other.GetAsync("config"));
        Assert.Empty(await ToListAsync(other.ListAsync("")));
        Assert.Equal(["repo/one/config"], (await ToListAsync(whole.ListAsync(""))).Select(o => o.Key));
        Assert.Equal("a"u8.ToArray(), await whole.GetAsync("repo/one/config"));
    }

    [Fact]
    public async Task RadosgwEnforcesCreateOnlyPutAndTheProbeLeavesNothing()
    {
        await _store.ProbeCreateOnlyAsync();
        Assert.Empty(await ToListAsync(_store.ListAsync("")));
    }

    [Fact]
    public async Task EnsureBucketCreatesOnceAndOpenTakesTheEndpointFromTheEnvironment()
    {
        string bucket = "t-ensure-" + Guid.NewGuid().ToString("N")[..10];
        // The fixture has set AWS_ENDPOINT_URL and the keys in this process, as a user's shell would.
        using var store = ObjectStores.Open($"s3://{bucket}/backups");
        var s3 = Assert.IsType<S3ObjectStore>(store);
        Assert.Equal(bucket, s3.Bucket);
        Assert.Equal("backups/", s3.Prefix);
        Assert.True(await s3.EnsureBucketAsync());
        Assert.False(await s3.EnsureBucketAsync());
        Assert.True(await store.PutIfAbsentAsync("config", "c"u8.ToArray()));
        using var explicitEndpoint = ObjectStores.Open($"s3://{bucket}", _ceph.Endpoint);
        Assert.Equal("c"u8.ToArray(), await explicitEndpoint.GetAsync("backups/config"));
    }

    [Fact]
    public async Task AMissingBucketIsAnErrorNotAMissingKey()
    {
        using var store = _ceph.OpenStore("t-no-such-bucket-" + Guid.NewGuid().ToString("N")[..8]);
        var e = await Assert.ThrowsAsync<ObjectStoreException>(() => store.GetAsync("config"));
        Assert.Contains("HTTP 404 NoSuchBucket", e.Message);
        Assert.Contains(_ceph.Endpoint, e.Message);
        e = await Assert.ThrowsAsync<ObjectStoreException>(() => ToListAsync(store.ListAsync("")));
        Assert.Contains("NoSuchBucket", e.Message);
    }

    [Fact]
    public async Task WrongKeysAndAnUnreachableEndpointAreClearErrors()
    {
        using var wrongSecret = new S3ObjectStore(_ceph.Connection with { SecretAccessKey = "wrong" }, _bucket);
        var e = await Assert.ThrowsAsync<ObjectStoreException>(() => wrongSecret.GetAsync("config"));
        Assert.Contains($"GET s3://{_bucket}/config at {_ceph.Endpoint} failed: HTTP 403 SignatureDoesNotMatch", e.Message);

        using var nobody = new S3ObjectStore(_ceph.Connection with { Endpoint = "http://127.0.0.1:1" }, _bucket);
        e = await Assert.ThrowsAsync<ObjectStoreException>(() => nobody.PutIfAbsentAsync("config", "x"u8.ToArray()));
        Assert.Contains($"PUT (create-only) s3://{_bucket}/config at http://127.0.0.1:1 failed: Connection refused", e.Message);
    }

    [Fact]
    public async Task CredentialsComeFromAProfileAndWithoutAnyTheErrorNamesTheVariables()
    {
        // The SDK's credential chain reads this process's environment, which the fixture filled with the keys: clear
        // them for this test (the classes of the Ceph collection run one at a time).
        using var dir = new TempDir();
        string[] names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE"];
        var saved = names.ToDictionary(n => n, Environment.GetEnvironmentVariable);
        try
        {
            foreach (var n in names) Environment.SetEnvironmentVariable(n, null);
            Environment.SetEnvironmentVariable("AWS_SHARED_CREDENTIALS_FILE", dir["credentials"]);
            Environment.SetEnvironmentVariable("AWS_CONFIG_FILE", dir["config"]);
            var e = Assert.Throws<ObjectStoreException>(() => ObjectStores.Open($"s3://{_bucket}/repo/one"));
            Assert.Contains("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", e.Message);
            Assert.Contains("AWS_PROFILE", e.Message);

            File.WriteAllText(dir["credentials"], $"[strata-tests]\naws_access_key_id = {CephCluster.AccessKey}\naws_secret_access_key = {CephCluster.SecretKey}\n");
            Environment.SetEnvironmentVariable("AWS_PROFILE", "strata-tests-missing");
            e = Assert.Throws<ObjectStoreException>(() => ObjectStores.Open($"s3://{_bucket}/repo/one"));
            Assert.Contains("AWS_PROFILE names the profile 'strata-tests-missing'", e.Message);
            Environment.SetEnvironmentVariable("AWS_PROFILE", "strata-tests");
            await _store.PutAsync("config", "from keys"u8.ToArray());
            using var byProfile = ObjectStores.Open($"s3://{_bucket}/repo/one");
            Assert.Equal("from keys"u8.ToArray(), await byProfile.GetAsync("config"));
        }
        finally
        {
            foreach (var (n, v) in saved) Environment.SetEnvironmentVariable(n, v);
        }
    }
}
