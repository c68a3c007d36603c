using System.Buffers.Binary;
using System.Globalization;

namespace Strata.Backup.Chunks;

/// <summary>A chunk's id: HMAC-SHA256 of its plaintext under the repository's id key, kept as four big-endian words so
/// that equality and hashing are cheap (the known-chunk sets hold millions). All zero = the all-zero chunk, never
/// stored.</summary>
public readonly record struct ChunkId(ulong W0, ulong W1, ulong W2, ulong W3)
{
    public const int Size = 32;
    public static ChunkId Zero => default;

    public bool IsZero => (W0 | W1 | W2 | W3) == 0;

    public static ChunkId FromBytes(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Size) throw new ArgumentException($"a chunk id is {Size} bytes, not {bytes.Length}");
        return new(BinaryPrimitives.ReadUInt64BigEndian(bytes), BinaryPrimitives.ReadUInt64BigEndian(bytes[8..]),
            BinaryPrimitives.ReadUInt64BigEndian(bytes[16..]), BinaryPrimitives.ReadUInt64BigEndian(bytes[24..]));
    }

    public void WriteTo(Span<byte> bytes)
    {
        BinaryPrimitives.WriteUInt64BigEndian(bytes, W0);
        BinaryPrimitives.WriteUInt64BigEndian(bytes[8..], W1);
        BinaryPrimitives.WriteUInt64BigEndian(bytes[16..], W2);
        BinaryPrimitives.WriteUInt64BigEndian(bytes[24..], W3);
    }

    public byte[] ToBytes()
    {
        var bytes = new byte[Size];
        WriteTo(bytes);
        return bytes;
    }

    /// <summary>64 lower-case hex digits.</summary>
    public override string ToString() => $"{W0:x16}{W1:x16}{W2:x16}{W3:x16}";

    public static ChunkId Parse(string hex)
    {
        if (!TryParse(hex, out var id)) throw new FormatException($"'{hex}' is not a chunk id (64 hex digits)");
        return id;
    }

    public static bool TryParse(string? hex, out ChunkId id)
    {
        id = default;
        if (hex is not { Length: 64 }) return false;
        Span<ulong> w = stackalloc ulong[4];
        for (int i = 0; i < 4; i++)
            if (!ulong.TryParse(hex.AsSpan(i * 16, 16), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out w[i])) return false;
        id = new(w[0], w[1], w[2], w[3]);
        return true;
    }

    /// <summary>The ids of a table of <c>n × 32</c> bytes.</summary>
    public static ChunkId[] ReadTable(ReadOnlySpan<byte> table)
    {
        var ids = new ChunkId[table.Length / Size];
        for (int i = 0; i < ids.Length; i++) ids[i] = FromBytes(table.Slice(i * Size, Size));
        return ids;
    }

    public static byte[] WriteTable(IReadOnlyList<ChunkId> ids)
    {
        var table = new byte[ids.Count * Size];
        for (int i = 0; i < ids.Count; i++) ids[i].WriteTo(table.AsSpan(i * Size, Size));
        return table;
    }
}
