using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

public class Qcow2OverlapCheckTests
{
    private const int Bits = 16;
    private const long Cs = 1L << Bits;

    private static Qcow2OverlapCheck Layout()
    {
        var c = new Qcow2OverlapCheck(Bits);
        c.SetRefcountTable(1 * Cs, Cs);
        c.AddRefcountBlock(2 * Cs);
        c.SetActiveL1(3 * Cs, 16);
        c.AddL2Table(4 * Cs);
        c.SetBitmapDirectory(9 * Cs, 100);
        return c;
    }

    [Theory]
    [InlineData(0, 512, Qcow2MetadataKind.Header)]
    [InlineData(Cs - 1, 2, Qcow2MetadataKind.Header)]
    [InlineData(Cs, 8, Qcow2MetadataKind.RefcountTable)]
    [InlineData(2 * Cs + 4096, 512, Qcow2MetadataKind.RefcountBlock)]
    // The L1 table is 16 bytes, but a write anywhere in its cluster is refused (QEMU widens writes to clusters).
    [InlineData(3 * Cs + 8192, 512, Qcow2MetadataKind.ActiveL1)]
    [InlineData(4 * Cs, Cs, Qcow2MetadataKind.ActiveL2)]
    [InlineData(9 * Cs + 512, 512, Qcow2MetadataKind.BitmapDirectory)]
    [InlineData(5 * Cs, 4 * Cs, Qcow2MetadataKind.None)]
    [InlineData(10 * Cs, 1L << 30, Qcow2MetadataKind.None)]
    public void A_write_is_refused_when_it_touches_a_cluster_holding_metadata(long offset, long length, Qcow2MetadataKind expected)
    {
        Assert.Equal(expected, Layout().Find(offset, length));
    }

    [Fact]
    public void A_write_spanning_several_structures_names_the_first_in_QEMUs_order()
    {
        // Clusters 1..4 hold refcount table, refcount block, L1 and an L2 table: QEMU names the L1 table first.
        Assert.Equal(Qcow2MetadataKind.ActiveL1, Layout().Find(2 * Cs, 3 * Cs));
        Assert.Equal(Qcow2MetadataKind.Header, Layout().Find(0, 10 * Cs));
    }

    [Fact]
    public void Snapshot_tables_are_refused_too_after_the_refcount_table_and_before_the_L2_tables()
    {
        var c = Layout();
        c.SetSnapshotTable(12 * Cs, 300);
        c.SetInactiveL1Tables([(14 * Cs, 16), (15 * Cs, Cs + 8)]);
        c.AddL2Table(16 * Cs);
        Assert.Equal(Qcow2MetadataKind.SnapshotTable, c.Find(12 * Cs + 4096, 512));
        Assert.Equal(Qcow2MetadataKind.InactiveL1, c.Find(14 * Cs, 512));
        // The second inactive L1 table spills 8 bytes into cluster 16, which is also an L2 table: QEMU names the L1.
        Assert.Equal(Qcow2MetadataKind.InactiveL1, c.Find(16 * Cs, 512));
        Assert.Equal(Qcow2MetadataKind.None, c.Find(13 * Cs, Cs));
    }

    [Fact]
    public void The_structure_being_written_is_left_out_but_nothing_else()
    {
        var c = Layout();
        Assert.Equal(Qcow2MetadataKind.None, c.Find(4 * Cs, Cs, Qcow2MetadataKind.ActiveL2));
        Assert.Equal(Qcow2MetadataKind.None, c.Find(2 * Cs, Cs, Qcow2MetadataKind.RefcountBlock));
        // An L2 table that sits on the refcount block is still refused when the L2 table is written back.
        c.AddL2Table(2 * Cs);
        Assert.Equal(Qcow2MetadataKind.RefcountBlock, c.Find(2 * Cs, Cs, Qcow2MetadataKind.ActiveL2));
    }

    [Fact]
    public void Tables_come_and_go_with_the_allocator_and_a_repeated_table_stays_until_its_last_reference_goes()
    {
        var c = new Qcow2OverlapCheck(Bits);
        c.AddL2Table(7 * Cs);
        c.AddL2Table(7 * Cs);
        c.RemoveL2Table(7 * Cs);
        Assert.Equal(Qcow2MetadataKind.ActiveL2, c.Find(7 * Cs, 512));
        c.RemoveL2Table(7 * Cs);
        Assert.Equal(Qcow2MetadataKind.None, c.Find(7 * Cs, 512));
        // Moved tables: only the new place counts.
        c.SetActiveL1(20 * Cs, 8);
        c.SetActiveL1(30 * Cs, 8);
        Assert.Equal(Qcow2MetadataKind.None, c.Find(20 * Cs, Cs));
        Assert.Equal(Qcow2MetadataKind.ActiveL1, c.Find(30 * Cs, Cs));
    }

    [Fact]
    public void Many_tables_and_a_huge_write_are_tested_either_way_round()
    {
        var c = new Qcow2OverlapCheck(9);
        for (long i = 100; i < 100_000; i += 2) c.AddRefcountBlock(i << 9);
        Assert.Equal(Qcow2MetadataKind.RefcountBlock, c.Find(99_998L << 9, 512));
        Assert.Equal(Qcow2MetadataKind.None, c.Find(99_999L << 9, 512));
        Assert.Equal(Qcow2MetadataKind.RefcountBlock, c.Find(1L << 20, 1L << 40));
        Assert.Equal(Qcow2MetadataKind.None, c.Find(1L << 30, 1L << 40));
    }
}
