using Strata.Formats.Qcow2;

namespace Strata.Tests.Formats;

public class Qcow2SubclusterTests
{
    [Fact]
    public void ExtendedEntry_RoundTripsAtSixteenBytesBigEndian()
    {
        var table = new byte[64];
        Qcow2Subclusters.WriteExtended(table, 2, 0x8000_0000_0005_0000UL, 0x0000_0001_8000_0003UL);
        Assert.Equal(new byte[] { 0x80, 0, 0, 0, 0, 0x05, 0, 0, 0, 0, 0, 0x01, 0x80, 0, 0, 0x03 }, table[32..48]);
        Assert.All(table[..32], b => Assert.Equal(0, b));
        Assert.Equal((0x8000_0000_0005_0000UL, 0x0000_0001_8000_0003UL), Qcow2Subclusters.ReadExtended(table, 2));
    }

    [Fact]
    public void Bitmap_LowHalfAllocatedHighHalfZero()
    {
        ulong bitmap = 0x0000_0002_0000_0001UL; // subcluster 0 allocated, subcluster 1 zero
        Assert.True(Qcow2Subclusters.IsAllocated(bitmap, 0));
        Assert.False(Qcow2Subclusters.IsZero(bitmap, 0));
        Assert.True(Qcow2Subclusters.IsZero(bitmap, 1));
        Assert.False(Qcow2Subclusters.IsAllocated(bitmap, 1));
        Assert.False(Qcow2Subclusters.IsAllocated(bitmap, 31));
        Assert.True(Qcow2Subclusters.IsZero(Qcow2Subclusters.AllZero, 31));
    }

    [Theory]
    [InlineData(0, 1, 0x1UL)]
    [InlineData(4, 3, 0x70UL)]
    [InlineData(0, 32, 0xffff_ffffUL)]
    [InlineData(31, 1, 0x8000_0000UL)]
    [InlineData(5, 0, 0UL)]
    public void Range_CoversExactlyTheSubclusters(int first, int count, ulong expected) =>
        Assert.Equal(expected, Qcow2Subclusters.Range(first, count));

    [Fact]
    public void AllocateAndZero_AreExclusivePerSubcluster()
    {
        ulong zeroed = Qcow2Subclusters.Zero(Qcow2Subclusters.AllAllocated, 8, 4);
        Assert.Equal(0x0000_0f00_ffff_f0ffUL, zeroed);
        Assert.False(Qcow2Subclusters.HasConflict(zeroed));
        ulong back = Qcow2Subclusters.Allocate(zeroed, 9, 2);
        Assert.Equal(0x0000_0900_ffff_f6ffUL, back);
        Assert.False(Qcow2Subclusters.HasConflict(back));
    }

    [Theory]
    [InlineData(0x0000_0001_ffff_ffffUL, true)]
    [InlineData(0x0000_0001_0000_0001UL, true)]
    [InlineData(0xffff_0000_0000_ffffUL, false)]
    [InlineData(0UL, false)]
    public void HasConflict_WhenASubclusterIsBothAllocatedAndZero(ulong bitmap, bool conflict) =>
        Assert.Equal(conflict, Qcow2Subclusters.HasConflict(bitmap));

    [Theory]
    [InlineData(0x8000_0000_0005_0001UL, L2EntryKind.Normal)]      // the zero flag means nothing in extended entries
    [InlineData(0x0000_0000_0000_0001UL, L2EntryKind.Unallocated)]
    [InlineData(0x4000_0000_0005_0000UL, L2EntryKind.Compressed)]
    [InlineData(0UL, L2EntryKind.Unallocated)]
    public void ClassifyExtended_IgnoresTheZeroFlag(ulong entry, L2EntryKind kind) =>
        Assert.Equal(kind, Qcow2Subclusters.ClassifyExtended(entry));

    [Fact]
    public void EntryBytes_SixteenWhenExtended() =>
        Assert.Equal((8, 16), (Qcow2Subclusters.EntryBytes(false), Qcow2Subclusters.EntryBytes(true)));
}
