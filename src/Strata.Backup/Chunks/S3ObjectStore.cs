using System.Net;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Amazon.Runtime;
using Amazon.Runtime.CredentialManagement;
using Amazon.Runtime.Credentials;
using Amazon.S3;
using Amazon.S3.Model;

namespace Strata.Backup.Chunks;

/// <summary>
/// Where an S3 store is and who talks to it. <see cref="Endpoint"/> null = AWS itself (the region's endpoint);
/// keys null = the named profile (else "default") of ~/.aws/credentials, else the SDK's other sources (web identity,
/// container and instance roles).
/// </summary>
public sealed record S3Connection(string? Endpoint, string Region, string? AccessKeyId = null, string? SecretAccessKey = null,
    string? SessionToken = null, string? Profile = null)
{
    public const string DefaultRegion = "us-east-1";

    /// <summary>The connection the usual AWS variables describe: the endpoint given, else AWS_ENDPOINT_URL; the region
    /// from AWS_REGION, else AWS_DEFAULT_REGION, else us-east-1; the keys from AWS_ACCESS_KEY_ID /
    /// AWS_SECRET_ACCESS_KEY (+ AWS_SESSION_TOKEN) when both are set, else the profile AWS_PROFILE names.</summary>
    public static S3Connection FromEnvironment(string? endpoint = null)
    {
        static string? Env(string name) => Environment.GetEnvironmentVariable(name) is { Length: > 0 } v ? v : null;
        string? accessKey = Env("AWS_ACCESS_KEY_ID"), secretKey = Env("AWS_SECRET_ACCESS_KEY");
        bool keys = accessKey is not null && secretKey is not null;
        return new S3Connection(
            endpoint is { Length: > 0 } ? endpoint : Env("AWS_ENDPOINT_URL"),
            Env("AWS_REGION") ?? Env("AWS_DEFAULT_REGION") ?? DefaultRegion,
            keys ? accessKey : null, keys ? secretKey : null, keys ? Env("AWS_SESSION_TOKEN") : null, Env("AWS_PROFILE"));
    }
}

/// <summary>
/// An object store on an S3 bucket, under an optional key prefix (AWSSDK.S3). Set up for S3 servers other than AWS
/// as well: path-style addressing (no bucket DNS names on a private endpoint) and checksums only when an operation
/// requires them (RGW 16 rejects the SDK's default aws-chunked uploads with a CRC trailer). Every PUT carries
/// Content-MD5 so the server refuses a body damaged on the way. The create-only put is <c>If-None-Match: *</c>, which
/// the server must enforce: <see cref="ProbeCreateOnlyAsync"/> checks that it does.
/// </summary>
public sealed class S3ObjectStore : IObjectStore
{
    private const int CreateOnlyAttempts = 5;
    private readonly AmazonS3Client _client;
    // Conditional puts retry here rather than in the SDK: after a lost response, a 412 on the retry may be our own
    // first attempt, which only this class can tell apart (see PutIfAbsentAsync).
    private readonly AmazonS3Client _onceClient;
    private readonly string _endpointForMessages;

    public S3ObjectStore(S3Connection connection, string bucket, string prefix = "")
    {
        ArgumentException.ThrowIfNullOrEmpty(bucket);
        Bucket = bucket;
        Prefix = prefix.Trim('/') is { Length: > 0 } p ? p + "/" : "";
        _endpointForMessages = connection.Endpoint ?? $"AWS S3 ({connection.Region})";
        var credentials = ResolveCredentials(connection);
        _client = new AmazonS3Client(credentials, ClientConfig(connection, retries: true));
        _onceClient = new AmazonS3Client(credentials, ClientConfig(connection, retries: false));
    }

    public string Bucket { get; }

    /// <summary>The key prefix every key is under: empty or ending in '/'.</summary>
    public string Prefix { get; }

    public string Location => Prefix.Length == 0 ? $"s3://{Bucket}" : $"s3://{Bucket}/{Prefix.TrimEnd('/')}";

    private static AmazonS3Config ClientConfig(S3Connection connection, bool retries)
    {
        var config = new AmazonS3Config
        {
            ForcePathStyle = true,
            RequestChecksumCalculation = RequestChecksumCalculation.WHEN_REQUIRED,
            ResponseChecksumValidation = ResponseChecksumValidation.WHEN_REQUIRED,
        };
        if (connection.Endpoint is { } endpoint)
        {
            config.ServiceURL = endpoint;
            config.AuthenticationRegion = connection.Region;
        }
        else
        {
            config.RegionEndpoint = Amazon.RegionEndpoint.GetBySystemName(connection.Region);
        }
        if (!retries) config.MaxErrorRetry = 0;
        return config;
    }

    /// <summary>The keys given, else the profile (AWS_PROFILE, else "default") of the shared credentials and config
    /// files, else the SDK's remaining sources (web identity, container and instance roles).</summary>
    private static AWSCredentials ResolveCredentials(S3Connection connection)
    {
        if (connection.AccessKeyId is { } id && connection.SecretAccessKey is { } secret)
            return connection.SessionToken is { } token ? new SessionAWSCredentials(id, secret, token) : new BasicAWSCredentials(id, secret);
        // Read here rather than by the SDK's process-wide resolver, which keeps what it found first.
        string? credentialsFile = Environment.GetEnvironmentVariable("AWS_SHARED_CREDENTIALS_FILE") is { Length: > 0 } f ? f : null;
        var profiles = credentialsFile is null ? new CredentialProfileStoreChain() : new CredentialProfileStoreChain(credentialsFile);
        if (profiles.TryGetAWSCredentials(connection.Profile ?? "default", out var fromProfile)) return fromProfile;
        if (connection.Profile is { } named)
            throw new ObjectStoreException($"AWS_PROFILE names the profile '{named}', which is in neither {credentialsFile ?? "~/.aws/credentials"} nor the AWS config file");
        try
        {
            return DefaultAWSCredentialsIdentityResolver.GetCredentials();
        }
        catch (AmazonClientException e)
        {
            throw new ObjectStoreException(
                "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary "
                + "keys), or AWS_PROFILE naming a profile in ~/.aws/credentials", e);
        }
    }

    private string KeyOf(string key)
    {
        if (key.Length == 0 || key.StartsWith('/'))
            throw new ArgumentException($"bad object key '{key}'", nameof(key));
        return Prefix + key;
    }

    /// <summary>The store's failure in one line: which operation on which object of which endpoint, and what the
    /// server (or the connection) said.</summary>
    private ObjectStoreException Failure(string operation, string? key, Exception e)
    {
        string what = key is null ? $"{operation} s3://{Bucket}" : $"{operation} s3://{Bucket}/{Prefix}{key}";
        string why = e switch
        {
            AmazonS3Exception s3 => $"HTTP {(int)s3.StatusCode} {s3.ErrorCode}: {s3.Message}",
            AmazonServiceException service when service.StatusCode != 0 => $"HTTP {(int)service.StatusCode}: {service.Message}",
            _ => e.InnerException is { } inner && !e.Message.Contains(inner.Message, StringComparison.Ordinal) ? $"{e.Message} ({inner.Message})" : e.Message,
        };
        if (e is AmazonClientException && why.Contains("credentials", StringComparison.OrdinalIgnoreCase))
            why += " — set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE";
        return new ObjectStoreException($"{what} at {_endpointForMessages} failed: {why}", e);
    }

    private static bool IsStatus(Exception e, HttpStatusCode status) => e is AmazonServiceException s && s.StatusCode == status;

    private static bool IsStoreFailure(Exception e) => e is AmazonServiceException or AmazonClientException or HttpRequestException or IOException
        || e is TaskCanceledException { InnerException: TimeoutException };

    private static bool IsTransient(Exception e) =>
        e is AmazonServiceException { StatusCode: >= HttpStatusCode.InternalServerError }
        // 409 ConditionalRequestConflict: another conditional write to the key was in progress; S3 asks for a retry.
        || IsStatus(e, HttpStatusCode.Conflict)
        || e is HttpRequestException or IOException
        || e is AmazonClientException && e is not AmazonServiceException && !e.Message.Contains("credentials", StringComparison.OrdinalIgnoreCase)
        || e is TaskCanceledException { InnerException: TimeoutException };

    private PutObjectRequest PutRequest(string key, ReadOnlyMemory<byte> data, string md5)
    {
        // A Memory over an array is sent without a copy; the SDK needs a seekable stream to sign and to retry.
        var body = MemoryMarshal.TryGetArray(data, out var segment)
            ? new MemoryStream(segment.Array!, segment.Offset, segment.Count, writable: false)
            : new MemoryStream(data.ToArray(), writable: false);
        return new PutObjectRequest
        {
            BucketName = Bucket,
            Key = KeyOf(key),
            InputStream = body,
            AutoCloseStream = true,
            MD5Digest = md5,
            // A plain body with a signed SHA-256 rather than aws-chunked streaming signatures, which not every S3
            // server accepts; the body is in memory anyway.
            UseChunkEncoding = false,
        };
    }

    private static string ContentMd5(ReadOnlySpan<byte> data) => Convert.ToBase64String(MD5.HashData(data));

    public async Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default)
    {
        string md5 = ContentMd5(data.Span);
        for (int attempt = 1; ; attempt++)
        {
            var request = PutRequest(key, data, md5);
            request.IfNoneMatch = "*";
            try
            {
                await _onceClient.PutObjectAsync(request, cancel);
                return true;
            }
            catch (Exception e) when (IsStatus(e, HttpStatusCode.PreconditionFailed))
            {
                // Refused: an object has the key. After a failed attempt it may be that attempt's, which reached the
                // server while its answer was lost: the stored bytes being ours (single-part ETag = hex MD5) says so.
                return attempt > 1 && await StoredMd5Async(key, cancel) == md5;
            }
            catch (Exception e) when (IsStatus(e, HttpStatusCode.NotImplemented))
            {
                throw new ObjectStoreException(
                    $"{Location} at {_endpointForMessages} does not support create-only PUT (If-None-Match: *), "
                    + "which a chunk repository needs: use Ceph RGW, AWS S3 or another server that enforces it", e);
            }
            catch (Exception e) when (IsTransient(e) && attempt < CreateOnlyAttempts && !cancel.IsCancellationRequested)
            {
                await Task.Delay(TimeSpan.FromMilliseconds(100 << attempt), cancel);
            }
            catch (Exception e) when (IsStoreFailure(e))
            {
                throw Failure("PUT (create-only)", key, e);
            }
        }
    }

    /// <summary>The base64 MD5 of the stored object's bytes as its ETag states it, or null when there is no object
    /// or the ETag is not a plain MD5 (multipart, server-side encryption).</summary>
    private async Task<string?> StoredMd5Async(string key, CancellationToken cancel)
    {
        try
        {
            var head = await _client.GetObjectMetadataAsync(new GetObjectMetadataRequest { BucketName = Bucket, Key = KeyOf(key) }, cancel);
            string etag = head.ETag?.Trim('"') ?? "";
            return etag.Length == 32 && etag.All(char.IsAsciiHexDigit) ? Convert.ToBase64String(Convert.FromHexString(etag)) : null;
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.NotFound))
        {
            return null;
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("HEAD", key, e);
        }
    }

    public async Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default)
    {
        try
        {
            await _client.PutObjectAsync(PutRequest(key, data, ContentMd5(data.Span)), cancel);
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("PUT", key, e);
        }
    }

    public async Task<byte[]?> GetAsync(string key, CancellationToken cancel = default)
    {
        try
        {
            using var response = await _client.GetObjectAsync(new GetObjectRequest { BucketName = Bucket, Key = KeyOf(key) }, cancel);
            long length = response.ContentLength;
            if (length < 0 || length > Array.MaxLength)
                throw new ObjectStoreException($"GET s3://{Bucket}/{Prefix}{key} at {_endpointForMessages}: unusable Content-Length {length}");
            var bytes = new byte[length];
            await response.ResponseStream.ReadExactlyAsync(bytes, cancel);
            return bytes;
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.NotFound) && e is not AmazonS3Exception { ErrorCode: "NoSuchBucket" })
        {
            return null;
        }
        catch (EndOfStreamException e)
        {
            throw Failure("GET", key, new IOException("the connection ended before the whole object arrived", e));
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("GET", key, e);
        }
    }

    public async Task<StoredObject?> HeadAsync(string key, CancellationToken cancel = default)
    {
        try
        {
            var head = await _client.GetObjectMetadataAsync(new GetObjectMetadataRequest { BucketName = Bucket, Key = KeyOf(key) }, cancel);
            return new StoredObject(key, head.ContentLength, ToOffset(head.LastModified));
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.NotFound))
        {
            // A HEAD answer has no body, so a missing bucket looks like a missing key here; the next list or get says which.
            return null;
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("HEAD", key, e);
        }
    }

    private static DateTimeOffset ToOffset(DateTime? time) =>
        time is { } t ? new DateTimeOffset(t.Kind == DateTimeKind.Unspecified ? DateTime.SpecifyKind(t, DateTimeKind.Utc) : t.ToUniversalTime()) : DateTimeOffset.MinValue;

    public async IAsyncEnumerable<StoredObject> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancel = default)
    {
        string? token = null;
        do
        {
            ListObjectsV2Response page;
            try
            {
                page = await _client.ListObjectsV2Async(new ListObjectsV2Request
                {
                    BucketName = Bucket,
                    Prefix = Prefix + prefix,
                    ContinuationToken = token,
                }, cancel);
            }
            catch (Exception e) when (IsStoreFailure(e))
            {
                throw Failure("LIST", prefix + "*", e);
            }
            foreach (var o in page.S3Objects ?? [])
            {
                if (!o.Key.StartsWith(Prefix, StringComparison.Ordinal)) continue;
                yield return new StoredObject(o.Key[Prefix.Length..], o.Size ?? 0, ToOffset(o.LastModified));
            }
            token = page.IsTruncated == true ? page.NextContinuationToken : null;
        }
        while (token is not null);
    }

    public async Task DeleteAsync(string key, CancellationToken cancel = default)
    {
        try
        {
            // S3 answers 204 whether or not the key existed.
            await _client.DeleteObjectAsync(new DeleteObjectRequest { BucketName = Bucket, Key = KeyOf(key) }, cancel);
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.NotFound) && e is AmazonS3Exception { ErrorCode: "NoSuchKey" })
        {
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("DELETE", key, e);
        }
    }

    /// <summary>Creates the bucket when there is none (for <c>init</c>); true when it created it. A bucket that
    /// exists but is someone else's, or that these credentials may not see, is an error.</summary>
    public async Task<bool> EnsureBucketAsync(CancellationToken cancel = default)
    {
        try
        {
            await _client.HeadBucketAsync(new HeadBucketRequest { BucketName = Bucket }, cancel);
            return false;
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.NotFound))
        {
        }
        catch (Exception e) when (IsStatus(e, HttpStatusCode.Forbidden))
        {
            // A HEAD answer has no body to say whether the keys are wrong or the bucket is someone else's.
            throw new ObjectStoreException($"HEAD bucket s3://{Bucket} at {_endpointForMessages} failed: HTTP 403 access denied (wrong keys, or a bucket these credentials may not use)", e);
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("HEAD bucket", null, e);
        }
        try
        {
            await _client.PutBucketAsync(new PutBucketRequest { BucketName = Bucket }, cancel);
            return true;
        }
        catch (Exception e) when (e is AmazonS3Exception { ErrorCode: "BucketAlreadyOwnedByYou" })
        {
            // Created by someone else with our credentials between the two requests.
            return false;
        }
        catch (Exception e) when (IsStoreFailure(e))
        {
            throw Failure("CREATE bucket", null, e);
        }
    }

    /// <summary>
    /// Checks that the server enforces create-only PUT: writes one probe key under <c>probe/</c> twice and expects the
    /// second write refused, then deletes it. Servers that accept <c>If-None-Match: *</c> and ignore it (s3rver) or
    /// reject it (Swift's s3api) are refused with an error that says so: a repository on them could lose a point index
    /// or a lease to a concurrent writer without anyone noticing.
    /// </summary>
    public async Task ProbeCreateOnlyAsync(CancellationToken cancel = default)
    {
        string key = $"probe/create-only-{Guid.NewGuid():N}";
        try
        {
            if (!await PutIfAbsentAsync(key, "first"u8.ToArray(), cancel))
                throw new ObjectStoreException($"{Location} at {_endpointForMessages}: the create-only probe {key} was refused on its first write");
            bool secondAccepted = await PutIfAbsentAsync(key, "second"u8.ToArray(), cancel);
            if (secondAccepted || await GetAsync(key, cancel) is not { } stored || !stored.AsSpan().SequenceEqual("first"u8))
                throw new ObjectStoreException(
                    $"{Location} at {_endpointForMessages} does not enforce create-only PUT (If-None-Match: *): it accepted a "
                    + "second write of one key. A chunk repository needs it (Ceph RGW and AWS S3 enforce it; s3rver and "
                    + "Swift's s3api do not)");
        }
        finally
        {
            // A probe key left behind by a store that failed here is harmless; its error must not hide the probe's.
            try { await DeleteAsync(key, CancellationToken.None); } catch (ObjectStoreException) { }
        }
    }

    public void Dispose()
    {
        _client.Dispose();
        _onceClient.Dispose();
    }
}
