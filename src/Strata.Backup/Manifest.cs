using System.Text.Json;
using System.Text.Json.Serialization;

namespace Strata.Backup;

/// <summary>What one backed-up range of a backup file holds: data with its SHA-256, or zeros.</summary>
public sealed record ExtentDigest(long Offset, long Length, string Kind, string? Sha256)
{
    public const string Data = "data", Zero = "zero";
}

/// <summary>Where a point's granule digests are (<c>ID.digests</c> beside its file, see
/// <see cref="Strata.Formats.Backup.GranuleDigestsFile"/>) and the SHA-256 of that file.</summary>
public sealed record DigestsReference(string File, long Granularity, string Sha256);

/// <summary>
/// The record of one backup of one disk, written (atomically) only once the backup file is complete:
/// a file without a manifest is never taken for a good backup.
/// </summary>
public sealed record BackupManifest
{
    public int Format { get; init; } = 1;
    /// <summary>The backup run's id; every disk of one run shares it (one point in time).</summary>
    public required string Id { get; init; }
    public required string Disk { get; init; }
    public required DateTimeOffset Time { get; init; }
    /// <summary>"full" or "inc".</summary>
    public required string Level { get; init; }
    /// <summary>The id of the point this one is backed by (null for a full).</summary>
    public string? Parent { get; init; }
    /// <summary>The backup file's name inside the disk's folder.</summary>
    public required string File { get; init; }
    /// <summary>"push" or "pull".</summary>
    public required string Mode { get; init; }
    /// <summary>The QMP address the backup was taken from.</summary>
    public required string Source { get; init; }
    /// <summary>The node name on the source.</summary>
    public required string Node { get; init; }
    /// <summary>The dirty bitmap on the source that records writes made after this point.</summary>
    public required string Bitmap { get; init; }
    public required long VirtualSize { get; init; }
    /// <summary>Bytes of data this backup copied (zero ranges excluded).</summary>
    public required long CopiedBytes { get; init; }
    public required long FileSize { get; init; }
    public required string FileSha256 { get; init; }
    /// <summary>Why a full was taken when an incremental was asked for (auto), if it was.</summary>
    public string? Note { get; init; }
    public required IReadOnlyList<ExtentDigest> Extents { get; init; }
    /// <summary>The digest of every granule of the disk as of this point, which a differential by comparison checks the
    /// disk against without reading the backup back; null for points taken before digests were recorded.</summary>
    public DigestsReference? Digests { get; init; }

    public byte[] Serialize() => JsonSerializer.SerializeToUtf8Bytes(this, BackupJson.Default.BackupManifest);

    public static BackupManifest Parse(ReadOnlySpan<byte> json) =>
        JsonSerializer.Deserialize(json, BackupJson.Default.BackupManifest) ?? throw new JsonException("empty manifest");
}

/// <summary>The repository's marker file, <c>strata-repository.json</c>: its format and its tag (the one member a
/// repository cannot be opened without).</summary>
public sealed record RepositoryConfig
{
    public int Format { get; init; } = 1;
    public required string Tag { get; init; }
    public DateTimeOffset Created { get; init; }
}

/// <summary>
/// The repository's JSON files (manifests, the marker, the prune journal), serialised by generated code: no
/// reflection, so the same bytes come out of the JIT and the native AOT build.
/// </summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(BackupManifest))]
[JsonSerializable(typeof(BackupManifest[]))]
[JsonSerializable(typeof(RepositoryConfig))]
public sealed partial class BackupJson : JsonSerializerContext;
