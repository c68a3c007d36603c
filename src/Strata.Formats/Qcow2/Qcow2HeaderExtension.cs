using System.Buffers.Binary;
using System.Text;

namespace Strata.Formats.Qcow2;

/// <summary>Header extension type codes (frozen on-disk values).</summary>
public enum Qcow2ExtensionType : uint
{
    End = 0x00000000,
    BackingFormat = 0xe2792aca,
    FeatureNameTable = 0x6803f857,
    Bitmaps = 0x23852875,
    FullDiskEncryption = 0x0537be77,
    ExternalDataFile = 0x44415441,
}

/// <summary>One header extension: type and raw data (unknown ones are kept verbatim for rewriting).</summary>
public sealed record Qcow2HeaderExtension(Qcow2ExtensionType Type, byte[] Data)
{
    /// <summary>Bytes this extension takes on disk: 8-byte head plus data padded to 8.</summary>
    public int EncodedLength => 8 + ((Data.Length + 7) & ~7);
}

/// <summary>Everything found in cluster 0 after the fixed header.</summary>
public sealed record Qcow2HeaderExtras(
    IReadOnlyList<Qcow2HeaderExtension> Extensions,
    string? BackingFile)
{
    public Qcow2HeaderExtension? Find(Qcow2ExtensionType type) => Extensions.FirstOrDefault(e => e.Type == type);

    public string? BackingFormat => Find(Qcow2ExtensionType.BackingFormat) is { } e ? Encoding.UTF8.GetString(e.Data) : null;

    public string? ExternalDataFile => Find(Qcow2ExtensionType.ExternalDataFile) is { } e ? Encoding.UTF8.GetString(e.Data) : null;
}

/// <summary>The 48-byte entries of the feature name table.</summary>
public readonly record struct Qcow2FeatureName(byte Kind, byte Bit, string Name)
{
    public const int EntrySize = 48;

    /// <summary>The table qemu-img 7.2 writes, in its order.</summary>
    public static readonly Qcow2FeatureName[] Standard =
    [
        new(0, 0, "dirty bit"),
        new(0, 1, "corrupt bit"),
        new(0, 2, "external data file"),
        new(0, 3, "compression type"),
        new(0, 4, "extended L2 entries"),
        new(1, 0, "lazy refcounts"),
        new(2, 0, "bitmaps"),
        new(2, 1, "raw external data"),
    ];

    public static byte[] EncodeTable(IReadOnlyList<Qcow2FeatureName> entries)
    {
        var data = new byte[entries.Count * EntrySize];
        for (int i = 0; i < entries.Count; i++)
        {
            var span = data.AsSpan(i * EntrySize, EntrySize);
            span[0] = entries[i].Kind;
            span[1] = entries[i].Bit;
            Encoding.ASCII.GetBytes(entries[i].Name, span[2..]);
        }
        return data;
    }

    public static List<Qcow2FeatureName> DecodeTable(ReadOnlySpan<byte> data)
    {
        // As QEMU reads it: the table as if zero-padded, so a last entry cut short still counts, and the first
        // entry without a name ends it.
        var list = new List<Qcow2FeatureName>();
        for (int off = 0; off + 2 < data.Length; off += EntrySize)
        {
            var e = data.Slice(off, Math.Min(EntrySize, data.Length - off));
            var name = e[2..];
            int nul = name.IndexOf((byte)0);
            if (nul >= 0) name = name[..nul];
            if (name.IsEmpty) break;
            list.Add(new Qcow2FeatureName(e[0], e[1], Encoding.ASCII.GetString(name)));
        }
        return list;
    }
}

/// <summary>Parses and writes the extension area of cluster 0.</summary>
public static class Qcow2HeaderExtensionCodec
{
    /// <summary>Parses extensions starting at header.HeaderLength. <paramref name="cluster0"/> is the first cluster
    /// (or as much of it as the file has).</summary>
    public static Qcow2HeaderExtras Parse(Qcow2Header header, ReadOnlySpan<byte> cluster0)
    {
        var list = new List<Qcow2HeaderExtension>();
        // Version 2 images may carry extensions too (right after the 72-byte header), as QEMU writes them.
        long end = Math.Min(cluster0.Length, header.BackingFileOffset != 0 ? (long)header.BackingFileOffset : header.ClusterSize);
        int off = (int)header.HeaderLength;
        var seen = new HashSet<Qcow2ExtensionType>();
        while (true)
        {
            if (off + 8 > end)
            {
                // QEMU tolerates a missing end marker when the area is exhausted.
                break;
            }
            var type = (Qcow2ExtensionType)BinaryPrimitives.ReadUInt32BigEndian(cluster0[off..]);
            uint len = BinaryPrimitives.ReadUInt32BigEndian(cluster0[(off + 4)..]);
            if (type == Qcow2ExtensionType.End) break;
            if (len > end - off - 8)
                throw new ImageFormatException($"Invalid header extension 0x{(uint)type:x8}: length {len} exceeds the header cluster");
            var ext = new Qcow2HeaderExtension(type, cluster0.Slice(off + 8, (int)len).ToArray());
            // As QEMU reads them, a repeated extension of a known type replaces the earlier one (the last
            // backing format wins); unknown ones are all kept, to be written back as found.
            int earlier = Enum.IsDefined(type) && !seen.Add(type) ? list.FindIndex(e => e.Type == type) : -1;
            if (earlier >= 0) list[earlier] = ext;
            else list.Add(ext);
            off += 8 + (int)((len + 7) & ~7u);
        }
        string? backing = null;
        if (header.BackingFileOffset != 0)
        {
            long bo = (long)header.BackingFileOffset;
            if (bo + header.BackingFileSize > cluster0.Length)
                throw new ImageFormatException("Backing file name lies past the end of the file");
            backing = Encoding.UTF8.GetString(cluster0.Slice((int)bo, (int)header.BackingFileSize));
        }
        foreach (var e in list)
        {
            if (e.Type == Qcow2ExtensionType.BackingFormat && e.Data.Length > 16)
                throw new ImageFormatException("Backing file format name too long");
        }
        return new Qcow2HeaderExtras(list, backing);
    }

    /// <summary>Lays out header, extensions, end marker and backing name exactly as qemu-img does.
    /// Returns the bytes to write at offset 0 and the header with backing offset/size filled in.</summary>
    public static (byte[] Bytes, Qcow2Header Header) Build(Qcow2Header header, IEnumerable<Qcow2HeaderExtension> extensions, string? backingFile)
    {
        var exts = extensions.ToList();
        int len = header.WrittenLength;
        foreach (var e in exts) len += e.EncodedLength;
        len += 8; // end marker
        byte[] backingBytes = backingFile is null ? [] : Encoding.UTF8.GetBytes(backingFile);
        if (backingBytes.Length > Qcow2Header.MaxBackingFileSize)
            throw new ImageFormatException("Backing file name too long");
        int backingOffset = backingFile is null ? 0 : len;
        int total = len + backingBytes.Length;
        if (total > header.ClusterSize)
            throw new ImageFormatException("Header extensions and backing file name do not fit in the first cluster");
        var h = header with
        {
            BackingFileOffset = (ulong)backingOffset,
            BackingFileSize = (uint)backingBytes.Length,
        };
        var bytes = new byte[total];
        h.Write(bytes);
        int off = h.WrittenLength;
        foreach (var e in exts)
        {
            BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(off), (uint)e.Type);
            BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(off + 4), (uint)e.Data.Length);
            e.Data.CopyTo(bytes.AsSpan(off + 8));
            off += e.EncodedLength;
        }
        off += 8; // end marker: already zero
        backingBytes.CopyTo(bytes.AsSpan(off));
        return (bytes, h);
    }
}
