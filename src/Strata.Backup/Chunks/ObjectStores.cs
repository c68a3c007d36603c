namespace Strata.Backup.Chunks;

/// <summary>A bucket and the key prefix a repository lives under, as written <c>s3://BUCKET[/PREFIX]</c>.</summary>
public readonly record struct S3Address(string Bucket, string Prefix)
{
    public const string Scheme = "s3://";

    public static bool IsS3(string text) => text.StartsWith(Scheme, StringComparison.OrdinalIgnoreCase);

    /// <summary>Parses <c>s3://BUCKET[/PREFIX]</c>; the error says what is wrong. The bucket follows S3's naming rules
    /// (3–63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit); the prefix is
    /// '/'-separated segments, none empty, "." or "..", and is returned without leading or trailing '/'.</summary>
    public static bool TryParse(string text, out S3Address address, out string error)
    {
        address = default;
        error = "";
        if (!IsS3(text))
        {
            error = $"'{text}' is not an s3:// address";
            return false;
        }
        string rest = text[Scheme.Length..];
        int slash = rest.IndexOf('/');
        string bucket = slash < 0 ? rest : rest[..slash];
        string prefix = slash < 0 ? "" : rest[(slash + 1)..].TrimEnd('/');
        if (bucket.Length == 0)
        {
            error = $"'{text}' names no bucket (s3://BUCKET[/PREFIX])";
            return false;
        }
        if (bucket.Length is < 3 or > 63 || !bucket.All(c => char.IsAsciiLetterLower(c) || char.IsAsciiDigit(c) || c is '.' or '-')
            || !char.IsAsciiLetterOrDigit(bucket[0]) || !char.IsAsciiLetterOrDigit(bucket[^1]))
        {
            error = $"'{bucket}' is not a valid bucket name (3 to 63 lower-case letters, digits, '.' and '-', starting and ending with a letter or digit)";
            return false;
        }
        if (prefix.Length > 0 && prefix.Split('/').Any(part => part is "" or "." or ".."))
        {
            error = $"'{prefix}' is not a valid key prefix (empty, '.' or '..' segment)";
            return false;
        }
        address = new S3Address(bucket, prefix);
        return true;
    }

    public override string ToString() => Prefix.Length == 0 ? Scheme + Bucket : $"{Scheme}{Bucket}/{Prefix}";
}

/// <summary>Opens the object store a repository argument names.</summary>
public static class ObjectStores
{
    /// <summary>
    /// <c>s3://BUCKET[/PREFIX]</c> → an <see cref="S3ObjectStore"/> at <paramref name="endpoint"/>, else at
    /// AWS_ENDPOINT_URL, else AWS itself, with the credentials of the usual AWS variables or profile
    /// (<see cref="S3Connection.FromEnvironment"/>); anything else → a <see cref="FolderObjectStore"/> on that folder.
    /// Nothing is contacted yet except the credential chain. ObjectStoreException when the address is malformed, an
    /// endpoint is given for a folder, or there are no credentials.
    /// </summary>
    public static IObjectStore Open(string repoArgument, string? endpoint = null)
    {
        if (S3Address.IsS3(repoArgument))
        {
            if (!S3Address.TryParse(repoArgument, out var address, out string error))
                throw new ObjectStoreException("invalid S3 address: " + error);
            var connection = S3Connection.FromEnvironment(endpoint);
            if (connection.Endpoint is { } url && !IsHttpUrl(url))
                throw new ObjectStoreException($"invalid S3 endpoint '{url}': expected http://HOST[:PORT] or https://HOST[:PORT]");
            return new S3ObjectStore(connection, address.Bucket, address.Prefix);
        }
        if (endpoint is { Length: > 0 })
            throw new ObjectStoreException($"--endpoint is for s3:// repositories; '{repoArgument}' is a folder");
        return new FolderObjectStore(repoArgument);
    }

    private static bool IsHttpUrl(string url) =>
        Uri.TryCreate(url, UriKind.Absolute, out var uri) && uri.Scheme is "http" or "https" && uri.Host.Length > 0;
}
