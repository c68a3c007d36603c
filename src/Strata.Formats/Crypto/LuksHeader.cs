using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Crypto;

/// <summary>One of the eight LUKS1 key slots: where its split, encrypted copy of the master key lies (in
/// 512-byte sectors from the start of the LUKS header) and how its password is stretched.</summary>
public sealed record LuksKeySlot(bool Active, uint Iterations, byte[] Salt, uint KeyMaterialOffsetSectors, uint Stripes)
{
    /// <summary>On-disk markers of a slot's state (LUKS1 spec).</summary>
    public const uint ActiveMarker = 0x00AC71F3, InactiveMarker = 0x0000DEAD;
}

/// <summary>
/// The LUKS1 partition header (592 bytes, big-endian), as cryptsetup and QEMU write it: cipher, mode and hash as
/// names, the master key's PBKDF2 digest, the uuid and eight key slots.
/// </summary>
public sealed record LuksHeader
{
    public const int Length = 592;
    public const int SlotCount = 8;
    public const int DigestLength = 20;
    public const int SaltLength = 32;
    private const int NameLength = 32, UuidLength = 40, SlotsAt = 208, SlotLength = 48;
    private static ReadOnlySpan<byte> Magic => [(byte)'L', (byte)'U', (byte)'K', (byte)'S', 0xBA, 0xBE];

    public required string CipherName { get; init; }
    public required string CipherMode { get; init; }
    public required string HashSpec { get; init; }
    public required uint PayloadOffsetSectors { get; init; }
    public required uint KeyBytes { get; init; }
    public required byte[] MasterKeyDigest { get; init; }
    public required byte[] MasterKeyDigestSalt { get; init; }
    public required uint MasterKeyDigestIterations { get; init; }
    public required string Uuid { get; init; }
    public required IReadOnlyList<LuksKeySlot> KeySlots { get; init; }

    /// <summary>Reads a header; throws <see cref="FormatException"/> with QEMU's words when it is not LUKS1.</summary>
    public static LuksHeader Parse(ReadOnlySpan<byte> data)
    {
        if (data.Length < Length || !data[..6].SequenceEqual(Magic)) throw new FormatException("Volume is not in LUKS format");
        ushort version = BinaryPrimitives.ReadUInt16BigEndian(data[6..]);
        if (version != 1) throw new FormatException($"Unsupported LUKS version {version}");
        var slots = new LuksKeySlot[SlotCount];
        for (int i = 0; i < SlotCount; i++)
        {
            var s = data.Slice(SlotsAt + i * SlotLength, SlotLength);
            uint state = BinaryPrimitives.ReadUInt32BigEndian(s);
            slots[i] = new LuksKeySlot(state == LuksKeySlot.ActiveMarker, BinaryPrimitives.ReadUInt32BigEndian(s[4..]), s.Slice(8, SaltLength).ToArray(),
                BinaryPrimitives.ReadUInt32BigEndian(s[40..]), BinaryPrimitives.ReadUInt32BigEndian(s[44..]));
        }
        return new LuksHeader
        {
            CipherName = Text(data.Slice(8, NameLength)),
            CipherMode = Text(data.Slice(40, NameLength)),
            HashSpec = Text(data.Slice(72, NameLength)),
            PayloadOffsetSectors = BinaryPrimitives.ReadUInt32BigEndian(data[104..]),
            KeyBytes = BinaryPrimitives.ReadUInt32BigEndian(data[108..]),
            MasterKeyDigest = data.Slice(112, DigestLength).ToArray(),
            MasterKeyDigestSalt = data.Slice(132, SaltLength).ToArray(),
            MasterKeyDigestIterations = BinaryPrimitives.ReadUInt32BigEndian(data[164..]),
            Uuid = Text(data.Slice(168, UuidLength)),
            KeySlots = slots,
        };
    }

    public byte[] Encode()
    {
        var data = new byte[Length];
        var d = data.AsSpan();
        Magic.CopyTo(d);
        BinaryPrimitives.WriteUInt16BigEndian(d[6..], 1);
        PutText(d.Slice(8, NameLength), CipherName);
        PutText(d.Slice(40, NameLength), CipherMode);
        PutText(d.Slice(72, NameLength), HashSpec);
        BinaryPrimitives.WriteUInt32BigEndian(d[104..], PayloadOffsetSectors);
        BinaryPrimitives.WriteUInt32BigEndian(d[108..], KeyBytes);
        MasterKeyDigest.CopyTo(d[112..]);
        MasterKeyDigestSalt.CopyTo(d[132..]);
        BinaryPrimitives.WriteUInt32BigEndian(d[164..], MasterKeyDigestIterations);
        PutText(d.Slice(168, UuidLength), Uuid);
        for (int i = 0; i < SlotCount; i++)
        {
            var s = d.Slice(SlotsAt + i * SlotLength, SlotLength);
            var slot = KeySlots[i];
            BinaryPrimitives.WriteUInt32BigEndian(s, slot.Active ? LuksKeySlot.ActiveMarker : LuksKeySlot.InactiveMarker);
            BinaryPrimitives.WriteUInt32BigEndian(s[4..], slot.Iterations);
            slot.Salt.CopyTo(s[8..]);
            BinaryPrimitives.WriteUInt32BigEndian(s[40..], slot.KeyMaterialOffsetSectors);
            BinaryPrimitives.WriteUInt32BigEndian(s[44..], slot.Stripes);
        }
        return data;
    }

    private static string Text(ReadOnlySpan<byte> field)
    {
        int end = field.IndexOf((byte)0);
        return Encoding.ASCII.GetString(end < 0 ? field : field[..end]);
    }

    private static void PutText(Span<byte> field, string value)
    {
        if (Encoding.ASCII.GetByteCount(value) >= field.Length) throw new ArgumentException($"'{value}' does not fit a LUKS header field");
        Encoding.ASCII.GetBytes(value, field);
    }
}
