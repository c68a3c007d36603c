using System.Buffers;
using System.Collections;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace Strata.Backup;

/// <summary>What one backed-up range of a backup file holds: data with its digest, or zeros. The digest of data is
/// the SHA-256 of its bytes in manifest formats 1 and 2, the SHA-256 of its 64 KiB slices' SHA-256s in format 3
/// (<see cref="ImageDigest.PieceDigest"/>).</summary>
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
    /// <summary>1, 2 or 3: how the file's digest and the extents' are defined (see <see cref="FileDigest"/>,
    /// <see cref="ExtentDigest"/>).</summary>
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
    /// <summary>Format 1: the SHA-256 of the whole file (none in formats 2 and 3).</summary>
    public string? FileSha256 { get; init; }
    /// <summary>Formats 2 and 3: the SHA-256 of the concatenated SHA-256s of the file's 64 KiB blocks, the last one shorter
    /// (<see cref="ImageDigest.FileBlockDigest"/>). Its blocks are hashed on every core, and a data piece that is
    /// one cluster (format 2), or whole clusters in order (format 3), takes its digest from its blocks': the file is
    /// hashed once.</summary>
    public string? FileDigest { get; init; }
    /// <summary>Why a full was taken when an incremental was asked for (auto), if it was.</summary>
    public string? Note { get; init; }
    public required IReadOnlyList<ExtentDigest> Extents { get; init; }
    /// <summary>The digest of every granule of the disk as of this point, which a differential by comparison checks the
    /// disk against without reading the backup back; null for points taken before digests were recorded.</summary>
    public DigestsReference? Digests { get; init; }

    public byte[] Serialize() => JsonSerializer.SerializeToUtf8Bytes(this, BackupJson.Default.BackupManifest);

    /// <summary>A manifest read whole: every member parsed and checked now.</summary>
    public static BackupManifest Parse(ReadOnlySpan<byte> json) =>
        JsonSerializer.Deserialize(json, BackupJson.Default.BackupManifest) ?? throw new JsonException("empty manifest");

    /// <summary>
    /// A manifest whose extent list stays JSON until something reads it (<see cref="DeferredExtents"/>). The extents
    /// are nearly all of a manifest (a SHA-256 per stored piece: half a megabyte for an incremental of a few hundred
    /// MiB), and every run and listing reads every manifest of a disk but only verify reads extents: parsed whole, a
    /// few weeks of daily points cost a backup run more than its own hashing. The other members are parsed and
    /// checked now; the extents' JSON is only delimited (its brackets matched outside strings), and a fault in it is
    /// reported when they are read. Anything unexpected falls back to <see cref="Parse(ReadOnlySpan{byte})"/>.
    /// </summary>
    /// <param name="json">The file's bytes, kept (not copied) for the extents.</param>
    public static BackupManifest ParseDeferringExtents(byte[] json)
    {
        if (FindExtentsArray(json) is not var (start, end)) return Parse(json);
        // The manifest without its extents: the members before and after the array, with an empty array between.
        var header = new byte[start + 2 + json.Length - end];
        json.AsSpan(0, start).CopyTo(header);
        "[]"u8.CopyTo(header.AsSpan(start));
        json.AsSpan(end).CopyTo(header.AsSpan(start + 2));
        BackupManifest m;
        try
        {
            m = Parse(header);
        }
        catch (JsonException)
        {
            return Parse(json);   // the whole file's own error, with its own positions
        }
        return m with { Extents = new DeferredExtents(json, start, end - start, m) };
    }

    private static readonly SearchValues<byte> Structural = SearchValues.Create("\"[]"u8);
    private static readonly SearchValues<byte> StringEnd = SearchValues.Create("\"\\"u8);

    /// <summary>Where the top-level "extents" array is: from its '[' to just after its ']'; null when the manifest is
    /// not shaped so (then it is parsed whole).</summary>
    internal static (int Start, int End)? FindExtentsArray(ReadOnlySpan<byte> json)
    {
        var reader = new Utf8JsonReader(json, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow });
        try
        {
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject) return null;
            while (reader.Read() && reader.TokenType == JsonTokenType.PropertyName)
            {
                bool extents = reader.ValueTextEquals("extents"u8);
                if (!reader.Read()) return null;
                if (!extents)
                {
                    reader.Skip();   // a small value (the digests reference is the only object)
                    continue;
                }
                if (reader.TokenType != JsonTokenType.StartArray) return null;
                int start = (int)reader.TokenStartIndex;
                int end = MatchingBracket(json, start);
                return end < 0 ? null : (start, end);
            }
        }
        catch (JsonException)
        {
        }
        return null;
    }

    /// <summary>Just past the ']' closing the '[' at <paramref name="open"/>, counting brackets outside strings; -1 when
    /// the input ends first.</summary>
    internal static int MatchingBracket(ReadOnlySpan<byte> json, int open)
    {
        int depth = 0;
        for (int i = open; i < json.Length;)
        {
            int k = json[i..].IndexOfAny(Structural);
            if (k < 0) return -1;
            i += k;
            switch (json[i++])
            {
                case (byte)'[': depth++; break;
                case (byte)']': if (--depth == 0) return i; break;
                default:
                    // A string: to its closing quote, stepping over escapes.
                    while (true)
                    {
                        int s = json[i..].IndexOfAny(StringEnd);
                        if (s < 0) return -1;
                        i += s;
                        if (json[i] == (byte)'\\')
                        {
                            i += 2;
                            if (i >= json.Length) return -1;
                            continue;
                        }
                        i++;
                        break;
                    }
                    break;
            }
        }
        return -1;
    }
}

/// <summary>
/// A manifest's extent list kept as the JSON it was read from, parsed on first use (by verify; nothing else reads
/// extents). A fault in the JSON surfaces then, as an <see cref="UnreadableExtentsException"/>.
/// </summary>
internal sealed class DeferredExtents(byte[] json, int start, int length, BackupManifest owner) : IReadOnlyList<ExtentDigest>
{
    private IReadOnlyList<ExtentDigest>? _parsed;

    private IReadOnlyList<ExtentDigest> Parsed => _parsed ??= ParseNow();

    private IReadOnlyList<ExtentDigest> ParseNow()
    {
        try
        {
            return JsonSerializer.Deserialize(json.AsSpan(start, length), BackupJson.Default.IReadOnlyListExtentDigest)
                ?? throw new JsonException("the extent list is null");
        }
        catch (JsonException e)
        {
            throw new UnreadableExtentsException(owner, e.Message);
        }
    }

    public ExtentDigest this[int index] => Parsed[index];
    public int Count => Parsed.Count;
    public IEnumerator<ExtentDigest> GetEnumerator() => Parsed.GetEnumerator();
    IEnumerator IEnumerable.GetEnumerator() => GetEnumerator();
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
public sealed partial class BackupJson : JsonSerializerContext
{
    /// <summary>The first type info of every process looks for polymorphism attributes, and the lookup makes an array
    /// of the attribute's type. Native AOT builds an array type nothing in the program constructs at run time, in the
    /// type loader: 3.5 % of a `backup list`'s CPU (`perf`), about 0.15 ms of every command that reads a manifest.
    /// Constructed here, the array types are compiled in.</summary>
    internal static readonly object[] PrebuiltArrays = [Array.Empty<JsonDerivedTypeAttribute>(), Array.Empty<JsonPolymorphicAttribute>()];
}

/// <summary>A manifest's extent list, read only when needed (<see cref="DeferredExtents"/>), turned out damaged.</summary>
public sealed class UnreadableExtentsException(BackupManifest owner, string detail)
    : BackupException($"the manifest of {owner.Disk}@{owner.Id} has an unreadable extent list: {detail}", "run `strata backup verify` to see what else is damaged")
{
    public string Detail => detail;
}
