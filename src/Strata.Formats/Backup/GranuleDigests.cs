using System.Buffers.Binary;
using System.Security.Cryptography;

namespace Strata.Formats.Backup;

/// <summary>A digests file that cannot be read: wrong magic, an unknown version or hash, or sizes that disagree.</summary>
public sealed class GranuleDigestsFormatException(string message) : Exception(message);

/// <summary>
/// The digest of every granule of a disk as it reads at one backup point: granule <c>i</c> covers
/// <c>[i × Granularity, min((i + 1) × Granularity, DiskSize))</c>, so the last one may be short.
/// </summary>
/// <remarks>
/// The hash is SHA-256 cut to 16 bytes. A guest controls every byte of its disk: with a non-cryptographic hash
/// (xxHash, CRC) it could write a granule that collides with the one the last point holds, and the next
/// differential by comparison would skip it — the guest's own backup silently wrong. 128 bits of SHA-256 leave no
/// practical collision, and with the CPU's SHA extensions it hashes at well over the speed of a backup's copy.
/// </remarks>
public sealed class GranuleDigests
{
    public const int DigestSize = 16;

    private readonly byte[] _digests;

    public long DiskSize { get; }
    public long Granularity { get; }
    public int Count { get; }

    public GranuleDigests(long diskSize, long granularity)
    {
        Count = CountFor(diskSize, granularity);
        DiskSize = diskSize;
        Granularity = granularity;
        _digests = new byte[(long)Count * DigestSize];
    }

    private GranuleDigests(long diskSize, long granularity, int count, byte[] digests)
    {
        DiskSize = diskSize;
        Granularity = granularity;
        Count = count;
        _digests = digests;
    }

    /// <summary>The largest number of granules one set holds (its digests fit one array).</summary>
    public const int MaxCount = int.MaxValue / DigestSize;

    /// <summary>Granules of a disk at <paramref name="granularity"/> (a power of two, at least 512 bytes).</summary>
    public static int CountFor(long diskSize, long granularity) =>
        GeometryProblem(diskSize, granularity) is { } problem
            ? throw new ArgumentOutOfRangeException(nameof(granularity), problem)
            : (int)((diskSize + granularity - 1) / granularity);

    /// <summary>Why a disk size and granularity cannot make a set, or null when they can.</summary>
    public static string? GeometryProblem(long diskSize, long granularity)
    {
        if (diskSize < 0) return $"disk size {diskSize} is negative";
        if (granularity < 512 || (granularity & (granularity - 1)) != 0) return $"granularity {granularity} is not a power of two of at least 512";
        long count = (diskSize + granularity - 1) / granularity;
        return count > MaxCount ? $"{count} granules are more than one set holds ({MaxCount})" : null;
    }

    /// <summary><paramref name="preferred"/>, doubled until the disk's granules fit one set.</summary>
    public static long GranularityFor(long diskSize, long preferred)
    {
        long g = preferred;
        while ((diskSize + g - 1) / g > MaxCount) g *= 2;
        return g;
    }

    public long OffsetOf(int granule) => granule * Granularity;

    public int LengthOf(int granule) => (int)Math.Min(Granularity, DiskSize - OffsetOf(granule));

    public ReadOnlySpan<byte> this[int granule] => _digests.AsSpan(granule * DigestSize, DigestSize);

    public void Set(int granule, ReadOnlySpan<byte> digest) => digest.CopyTo(_digests.AsSpan(granule * DigestSize, DigestSize));

    public GranuleDigests Clone() => new(DiskSize, Granularity, Count, (byte[])_digests.Clone());

    /// <summary>The granules whose digests differ from <paramref name="other"/>'s (same disk size and granularity).</summary>
    public IEnumerable<int> Differences(GranuleDigests other)
    {
        if (other.DiskSize != DiskSize || other.Granularity != Granularity)
            throw new ArgumentException("digests of another disk size or granularity", nameof(other));
        for (int i = 0; i < Count; i++)
            if (!this[i].SequenceEqual(other[i])) yield return i;
    }

    /// <summary>The digest of <paramref name="granule"/>'s bytes.</summary>
    public static void Hash(ReadOnlySpan<byte> granule, Span<byte> digest)
    {
        Span<byte> full = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(granule, full);
        full[..DigestSize].CopyTo(digest);
    }

    /// <summary>The digest of a granule whose whole SHA-256 is already known (hashed for another record): what
    /// <see cref="Hash(ReadOnlySpan{byte}, Span{byte})"/> would give, without a second pass over the bytes.</summary>
    public static ReadOnlySpan<byte> FromSha256(ReadOnlySpan<byte> sha256)
    {
        if (sha256.Length != SHA256.HashSizeInBytes) throw new ArgumentException($"a SHA-256 is {SHA256.HashSizeInBytes} bytes, not {sha256.Length}", nameof(sha256));
        return sha256[..DigestSize];
    }

    public static byte[] Hash(ReadOnlySpan<byte> granule)
    {
        var digest = new byte[DigestSize];
        Hash(granule, digest);
        return digest;
    }

    /// <summary>The digest of <paramref name="length"/> zero bytes: what a granule known to read as zeros gets
    /// without being read.</summary>
    public static byte[] ZeroDigest(int length)
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        ReadOnlySpan<byte> zeros = new byte[Math.Min(length, 1 << 16)];
        for (int left = length; left > 0; left -= zeros.Length) hash.AppendData(zeros[..Math.Min(left, zeros.Length)]);
        return hash.GetHashAndReset()[..DigestSize];
    }

    internal ReadOnlySpan<byte> Bytes => _digests;

    internal static GranuleDigests FromBytes(long diskSize, long granularity, int count, byte[] digests) => new(diskSize, granularity, count, digests);
}

/// <summary>
/// The digests file stored beside a backup point (<c>ID.digests</c>), all integers little-endian:
/// <code>
///  0  8  magic "STRATAGD"
///  8  4  version (1)
/// 12  2  hash (1: SHA-256 cut to 16 bytes)
/// 14  2  digest size (16)
/// 16  8  disk size in bytes
/// 24  8  granularity in bytes (a power of two, at least 512)
/// 32  8  granule count (the disk size over the granularity, rounded up)
/// 40     count × 16 bytes of digests, granule 0 first
/// </code>
/// No checksum of its own: the manifest that names the file holds its SHA-256. Pure functions over spans.
/// </summary>
public static class GranuleDigestsFile
{
    public const int HeaderSize = 40;
    public const uint Version = 1;
    public const ushort Sha256Truncated = 1;
    private static ReadOnlySpan<byte> Magic => "STRATAGD"u8;

    public static byte[] Serialize(GranuleDigests digests)
    {
        var file = new byte[HeaderSize + digests.Bytes.Length];
        var span = file.AsSpan();
        Magic.CopyTo(span);
        BinaryPrimitives.WriteUInt32LittleEndian(span[8..], Version);
        BinaryPrimitives.WriteUInt16LittleEndian(span[12..], Sha256Truncated);
        BinaryPrimitives.WriteUInt16LittleEndian(span[14..], GranuleDigests.DigestSize);
        BinaryPrimitives.WriteInt64LittleEndian(span[16..], digests.DiskSize);
        BinaryPrimitives.WriteInt64LittleEndian(span[24..], digests.Granularity);
        BinaryPrimitives.WriteInt64LittleEndian(span[32..], digests.Count);
        digests.Bytes.CopyTo(span[HeaderSize..]);
        return file;
    }

    public static GranuleDigests Parse(ReadOnlySpan<byte> file)
    {
        if (file.Length < HeaderSize || !file[..8].SequenceEqual(Magic)) throw new GranuleDigestsFormatException("not a digests file (no STRATAGD magic)");
        uint version = BinaryPrimitives.ReadUInt32LittleEndian(file[8..]);
        if (version != Version) throw new GranuleDigestsFormatException($"digests file version {version} is not supported (only {Version})");
        ushort hash = BinaryPrimitives.ReadUInt16LittleEndian(file[12..]);
        ushort size = BinaryPrimitives.ReadUInt16LittleEndian(file[14..]);
        if (hash != Sha256Truncated || size != GranuleDigests.DigestSize)
            throw new GranuleDigestsFormatException($"unknown digest: hash {hash} of {size} bytes (only 1, SHA-256 cut to {GranuleDigests.DigestSize} bytes)");
        long diskSize = BinaryPrimitives.ReadInt64LittleEndian(file[16..]);
        long granularity = BinaryPrimitives.ReadInt64LittleEndian(file[24..]);
        long count = BinaryPrimitives.ReadInt64LittleEndian(file[32..]);
        if (GranuleDigests.GeometryProblem(diskSize, granularity) is { } problem) throw new GranuleDigestsFormatException("bad geometry: " + problem);
        int expected = GranuleDigests.CountFor(diskSize, granularity);
        if (count != expected) throw new GranuleDigestsFormatException($"{count} granules recorded, but a {diskSize}-byte disk at {granularity} bytes has {expected}");
        long body = (long)expected * GranuleDigests.DigestSize;
        if (file.Length - HeaderSize != body) throw new GranuleDigestsFormatException($"{file.Length - HeaderSize} bytes of digests where {expected} granules need {body}");
        return GranuleDigests.FromBytes(diskSize, granularity, expected, file[HeaderSize..].ToArray());
    }
}
