using System.Text.Json;
using System.Text.Json.Serialization;

namespace Strata.Formats.Chunks;

/// <summary>A chunk repository's blob, config or key material is not what it must be (corrupt, truncated, of another
/// kind or version); the message says what and where.</summary>
public class ChunkFormatException(string message) : Exception(message);

/// <summary>The key material did not open with the key given: the passphrase or key file is not this repository's.</summary>
public sealed class ChunkKeyException(string message) : ChunkFormatException(message);

/// <summary>How the repository's keys are wrapped: AES-256-GCM under a key-encryption key that Argon2id derives from
/// the passphrase (or key file) and <see cref="Salt"/>.</summary>
public sealed record ChunkEncryptionConfig
{
    public string Cipher { get; init; } = "aes-256-gcm";
    public string Kdf { get; init; } = "argon2id";
    public required byte[] Salt { get; init; }
    public required int MemoryKib { get; init; }
    public required int Iterations { get; init; }
    public required int Parallelism { get; init; }
    /// <summary>nonce ‖ AES-256-GCM(KEK, data key ‖ id key) ‖ tag.</summary>
    public required byte[] WrappedKeys { get; init; }
}

/// <summary>
/// The <c>config</c> object of a chunk repository, written once (create-only) at init and never changed: what every
/// reader and writer must agree on (chunk size, compression, keys).
/// </summary>
public sealed record ChunkRepositoryConfig
{
    public const string KindName = "strata-chunks";
    public const int CurrentFormat = 1;
    public const int MinChunkSize = 4096;
    public const int MaxChunkSize = 64 << 20;

    public int Format { get; init; } = CurrentFormat;
    public string Kind { get; init; } = KindName;
    /// <summary>8 hex digits naming the repository in the source's bitmap names.</summary>
    public required string Tag { get; init; }
    public required int ChunkSize { get; init; }
    public string Compression { get; init; } = "zstd";
    public DateTimeOffset Created { get; init; }
    /// <summary>Null for an unencrypted repository.</summary>
    public ChunkEncryptionConfig? Encryption { get; init; }
    /// <summary>The HMAC key of chunk ids, in clear, only when the repository is not encrypted (ids stay keyed, so
    /// dedup works the same either way).</summary>
    public byte[]? IdKey { get; init; }

    public byte[] Serialize() => JsonSerializer.SerializeToUtf8Bytes(this, ChunkJson.Default.ChunkRepositoryConfig);

    /// <summary>Parses and checks a config: anything this version cannot read safely is refused with the reason.</summary>
    public static ChunkRepositoryConfig Parse(ReadOnlySpan<byte> json)
    {
        ChunkRepositoryConfig? config;
        try
        {
            config = JsonSerializer.Deserialize(json, ChunkJson.Default.ChunkRepositoryConfig);
        }
        catch (JsonException e)
        {
            throw new ChunkFormatException($"the repository config is not valid JSON: {e.Message}");
        }
        if (config is null) throw new ChunkFormatException("the repository config is empty");
        if (config.Kind != KindName) throw new ChunkFormatException($"the config is of kind '{config.Kind}', not '{KindName}'");
        if (config.Format != CurrentFormat) throw new ChunkFormatException($"unsupported chunk repository format {config.Format} (this version reads format {CurrentFormat})");
        if (config.Tag is not { Length: 8 } || !config.Tag.All(char.IsAsciiHexDigitLower)) throw new ChunkFormatException($"invalid tag '{config.Tag}' in the repository config");
        if (!IsValidChunkSize(config.ChunkSize)) throw new ChunkFormatException($"invalid chunk size {config.ChunkSize} in the repository config");
        if (config.Compression != "zstd") throw new ChunkFormatException($"unsupported compression '{config.Compression}'");
        if (config.Encryption is { } enc)
        {
            if (enc.Cipher != "aes-256-gcm" || enc.Kdf != "argon2id") throw new ChunkFormatException($"unsupported encryption {enc.Cipher}/{enc.Kdf}");
            if (enc.Salt is not { Length: ChunkKeys.SaltSize }) throw new ChunkFormatException("the encryption salt in the repository config is not 16 bytes");
            ChunkKeys.CheckKdfParameters(enc.MemoryKib, enc.Iterations, enc.Parallelism);
            if (enc.WrappedKeys is not { Length: ChunkKeys.WrappedSize }) throw new ChunkFormatException("the wrapped keys in the repository config have the wrong length");
            if (config.IdKey is not null) throw new ChunkFormatException("an encrypted repository config must not hold the id key in clear");
        }
        else if (config.IdKey is not { Length: ChunkKeys.KeySize }) throw new ChunkFormatException("the repository config has neither encryption nor a 32-byte id key");
        return config;
    }

    public static bool IsValidChunkSize(long size) => size is >= MinChunkSize and <= MaxChunkSize && (size & (size - 1)) == 0;
}

/// <summary>A lease object (<c>locks/shared/UUID</c> or <c>locks/exclusive</c>): who holds it and until when; renewed by
/// overwrite before it expires, ignored (and deleted by whoever finds it) once it has.</summary>
public sealed record ChunkLeaseRecord(string Owner, string Host, int Pid, DateTimeOffset Expires)
{
    public byte[] Serialize() => JsonSerializer.SerializeToUtf8Bytes(this, ChunkJson.Default.ChunkLeaseRecord);

    /// <summary>The lease, or null when the bytes are not one (a torn or foreign object: treated as expired).</summary>
    public static ChunkLeaseRecord? TryParse(ReadOnlySpan<byte> json)
    {
        try
        {
            return JsonSerializer.Deserialize(json, ChunkJson.Default.ChunkLeaseRecord);
        }
        catch (JsonException)
        {
            return null;
        }
    }
}

/// <summary>The chunk repository's JSON (config and point-index headers), serialised by generated code: no reflection,
/// so the same bytes come out of the JIT and the native AOT build.</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(ChunkRepositoryConfig))]
[JsonSerializable(typeof(PointIndexHeader))]
[JsonSerializable(typeof(ChunkLeaseRecord))]
public sealed partial class ChunkJson : JsonSerializerContext;
