using System.Buffers.Binary;

namespace Strata.Interop.Tests.Infra;

/// <summary>Big-endian edits of qcow2 metadata, for injecting corruption (independent of Strata's own code).</summary>
public static class Qcow2Edit
{
    public static ulong ReadU64(string path, long offset) => BinaryPrimitives.ReadUInt64BigEndian(Read(path, offset, 8));

    public static uint ReadU32(string path, long offset) => BinaryPrimitives.ReadUInt32BigEndian(Read(path, offset, 4));

    public static void WriteU64(string path, long offset, ulong value)
    {
        var b = new byte[8];
        BinaryPrimitives.WriteUInt64BigEndian(b, value);
        Write(path, offset, b);
    }

    public static void WriteU16(string path, long offset, ushort value)
    {
        var b = new byte[2];
        BinaryPrimitives.WriteUInt16BigEndian(b, value);
        Write(path, offset, b);
    }

    private static byte[] Read(string path, long offset, int count)
    {
        using var f = File.OpenRead(path);
        var b = new byte[count];
        f.Position = offset;
        f.ReadExactly(b);
        return b;
    }

    private static void Write(string path, long offset, byte[] bytes)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        f.Position = offset;
        f.Write(bytes);
    }

    public static int ClusterBits(string path) => (int)ReadU32(path, 20);
    public static ulong L1TableOffset(string path) => ReadU64(path, 40);
    public static ulong RefcountTableOffset(string path) => ReadU64(path, 48);
    public static int RefcountOrder(string path) => (int)ReadU32(path, 96);

    private const ulong OffsetMask = 0x00fffffffffffe00UL;

    /// <summary>File offset of L2 entry <paramref name="l2Index"/> of the L2 table named by L1[<paramref name="l1Index"/>].</summary>
    public static long L2EntryOffset(string path, int l1Index, int l2Index)
    {
        ulong l1e = ReadU64(path, (long)L1TableOffset(path) + 8L * l1Index);
        ulong l2 = l1e & OffsetMask;
        if (l2 == 0) throw new InvalidOperationException($"L1[{l1Index}] is unallocated");
        return (long)l2 + 8L * l2Index;
    }

    public static ulong GetL2(string path, int l1Index, int l2Index) => ReadU64(path, L2EntryOffset(path, l1Index, l2Index));

    public static void SetL2(string path, int l1Index, int l2Index, ulong value) => WriteU64(path, L2EntryOffset(path, l1Index, l2Index), value);

    /// <summary>Sets the (16-bit) refcount of host cluster <paramref name="clusterIndex"/>.</summary>
    public static void SetRefcount(string path, long clusterIndex, ushort value)
    {
        if (RefcountOrder(path) != 4) throw new InvalidOperationException("only refcount_bits=16 supported");
        int cs = 1 << ClusterBits(path);
        long perBlock = cs / 2;
        ulong block = ReadU64(path, (long)RefcountTableOffset(path) + 8 * (clusterIndex / perBlock)) & OffsetMask;
        if (block == 0) throw new InvalidOperationException("refcount block unallocated");
        WriteU16(path, (long)block + 2 * (clusterIndex % perBlock), value);
    }
}
