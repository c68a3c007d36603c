using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text.Json;

namespace Strata.Formats.Chunks;

/// <summary>One disk of a point as its index header records it; its chunk ids follow the header in the body. (The
/// repository's in-memory form adds the ids themselves; it is written as this type, so the header never holds them.)</summary>
public record PointIndexDisk
{
    public required string Disk { get; init; }
    public required long VirtualSize { get; init; }
    /// <summary>"full" or "inc": how the run read the source (every point is a full chunk map either way).</summary>
    public required string Level { get; init; }
    public string? Parent { get; init; }
    public required string Mode { get; init; }
    public required string Source { get; init; }
    public required string Node { get; init; }
    public required string Bitmap { get; init; }
    public string? Note { get; init; }
    public long CopiedBytes { get; init; }
    public long UploadedBytes { get; init; }
    public long UploadedChunks { get; init; }
    /// <summary>Checked against the disk's size and its id table on decoding.</summary>
    public long ChunkCount { get; init; }
}

/// <summary>The JSON header of a point index: the point and, per disk, its manifest.</summary>
public sealed record PointIndexHeader
{
    public int Format { get; init; } = 1;
    public required string Id { get; init; }
    public required DateTimeOffset Time { get; init; }
    public required int ChunkSize { get; init; }
    public required IReadOnlyList<PointIndexDisk> Disks { get; init; }
}

/// <summary>
/// The body of a point index (inside a <see cref="ChunkBlob"/> with magic STPI): the header's length (u32 LE), the
/// header as JSON, then per disk in header order <c>chunk-count × 32</c> bytes of chunk ids (all zero = a hole), then
/// the SHA-256 of everything before it.
/// </summary>
public static class PointIndexCodec
{
    public const int IdSize = 32;
    private const int HashSize = 32;

    /// <summary>How many chunks cover a disk of <paramref name="virtualSize"/> bytes.</summary>
    public static long ChunkCount(long virtualSize, int chunkSize) => (virtualSize + chunkSize - 1) / chunkSize;

    public static byte[] Encode(PointIndexHeader header, IReadOnlyList<ReadOnlyMemory<byte>> idTables)
    {
        if (idTables.Count != header.Disks.Count) throw new ArgumentException("one id table per disk");
        for (int i = 0; i < idTables.Count; i++)
        {
            var d = header.Disks[i];
            if (d.ChunkCount != ChunkCount(d.VirtualSize, header.ChunkSize) || idTables[i].Length != d.ChunkCount * IdSize)
                throw new ArgumentException($"disk '{d.Disk}': {idTables[i].Length / IdSize} chunk ids for a {d.VirtualSize}-byte disk of {header.ChunkSize}-byte chunks");
        }
        byte[] json = JsonSerializer.SerializeToUtf8Bytes(header, ChunkJson.Default.PointIndexHeader);
        long length = 4 + json.Length + idTables.Sum(t => (long)t.Length) + HashSize;
        if (length > Array.MaxLength) throw new ArgumentException("the point index is too large");
        var body = new byte[length];
        BinaryPrimitives.WriteUInt32LittleEndian(body, (uint)json.Length);
        json.CopyTo(body, 4);
        int at = 4 + json.Length;
        foreach (var table in idTables)
        {
            table.Span.CopyTo(body.AsSpan(at));
            at += table.Length;
        }
        SHA256.HashData(body.AsSpan(0, at), body.AsSpan(at));
        return body;
    }

    /// <summary>The header and each disk's id table; <see cref="ChunkFormatException"/> when the body does not check.</summary>
    public static (PointIndexHeader Header, byte[][] IdTables) Decode(ReadOnlySpan<byte> body)
    {
        if (body.Length < 4 + HashSize) throw new ChunkFormatException("the point index is truncated");
        Span<byte> hash = stackalloc byte[HashSize];
        SHA256.HashData(body[..^HashSize], hash);
        if (!hash.SequenceEqual(body[^HashSize..])) throw new ChunkFormatException("the point index's SHA-256 does not match its contents");
        uint jsonLength = BinaryPrimitives.ReadUInt32LittleEndian(body);
        if (jsonLength > body.Length - 4 - HashSize) throw new ChunkFormatException("the point index header length is past its end");
        PointIndexHeader? header;
        try
        {
            header = JsonSerializer.Deserialize(body.Slice(4, (int)jsonLength), ChunkJson.Default.PointIndexHeader);
        }
        catch (JsonException e)
        {
            throw new ChunkFormatException($"the point index header is not valid JSON: {e.Message}");
        }
        if (header is null || header.Disks is null) throw new ChunkFormatException("the point index header is empty");
        if (header.Format != 1) throw new ChunkFormatException($"unsupported point index format {header.Format}");
        if (!ChunkRepositoryConfig.IsValidChunkSize(header.ChunkSize)) throw new ChunkFormatException($"invalid chunk size {header.ChunkSize} in the point index");
        var tables = new byte[header.Disks.Count][];
        int at = 4 + (int)jsonLength;
        int end = body.Length - HashSize;
        for (int i = 0; i < tables.Length; i++)
        {
            var d = header.Disks[i];
            if (d.VirtualSize < 0 || d.ChunkCount != ChunkCount(d.VirtualSize, header.ChunkSize))
                throw new ChunkFormatException($"disk '{d.Disk}' of the point index has {d.ChunkCount} chunks for {d.VirtualSize} bytes");
            long bytes = d.ChunkCount * IdSize;
            if (bytes > end - at) throw new ChunkFormatException($"the chunk ids of disk '{d.Disk}' run past the end of the point index");
            tables[i] = body.Slice(at, (int)bytes).ToArray();
            at += (int)bytes;
        }
        if (at != end) throw new ChunkFormatException($"the point index has {end - at} bytes after its last id table");
        return (header, tables);
    }
}
