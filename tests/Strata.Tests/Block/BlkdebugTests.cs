using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>blkdebug's rule machine (events arm, host I/O trips) and the qcow2 driver's events.</summary>
public class BlkdebugTests
{
    private static Blkdebug Rules(params BlkdebugErrorRule[] errors) => new([], errors);

    [Fact]
    public void AnEventArmsItsRulesAndTheNextIoFails()
    {
        var b = Rules(new BlkdebugErrorRule("l1_update", 5, null, null, Once: false));
        b.CheckIo(0, 512); // nothing armed yet
        b.Event("l2_update"); // no rule for it: nothing changes
        b.CheckIo(0, 512);
        b.Event("l1_update");
        Assert.Equal(5, Assert.Throws<BlockIOException>(() => b.CheckIo(4096, 512)).Errno);
        // Not "once": every later I/O fails too, flushes included.
        Assert.Equal(5, Assert.Throws<BlockIOException>(() => b.CheckIo(0, 0)).Errno);
    }

    [Fact]
    public void OnceRulesFailOneIoAndSectorRulesOnlyTheIoCoveringTheirSector()
    {
        var b = Rules(new BlkdebugErrorRule("cluster_free", 28, null, 8, Once: true));
        b.Event("cluster_free");
        b.CheckIo(0, 4096);      // sectors 0..7
        b.CheckIo(0, 0);         // a flush covers no sector
        Assert.Equal(28, Assert.Throws<BlockIOException>(() => b.CheckIo(4096, 512)).Errno);
        b.CheckIo(4096, 512);    // used up
        b.Event("cluster_free");
        b.CheckIo(4096, 512);    // and gone for good
    }

    [Fact]
    public void AnotherEventWithRulesReplacesTheArmedOnes()
    {
        var b = Rules(new BlkdebugErrorRule("l1_update", 5, null, null, Once: false),
                      new BlkdebugErrorRule("refblock_alloc", 28, null, null, Once: false));
        b.Event("l1_update");
        b.Event("refblock_alloc");
        Assert.Equal(28, Assert.Throws<BlockIOException>(() => b.CheckIo(0, 512)).Errno);
    }

    [Fact]
    public void StateRulesGateErrorRules()
    {
        var b = new Blkdebug([new BlkdebugStateRule("l2_update", 1, 2)],
                             [new BlkdebugErrorRule("l1_update", 5, 2, null, Once: true)]);
        b.Event("l1_update"); // state 1: the rule does not hold
        b.CheckIo(0, 512);
        b.Event("l2_update");
        b.Event("l1_update");
        Assert.Throws<BlockIOException>(() => b.CheckIo(0, 512));
    }

    [Theory]
    [InlineData("l1_update")]
    [InlineData("empty_image_prepare")]
    [InlineData("reftable_update")]
    [InlineData("refblock_alloc")]
    public void MakeEmptyFailingAtAnyStepLeavesAnImageTheRepairOnOpenMakesClean(string step)
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20 }))
            img.Write(0, Enumerable.Repeat((byte)0x5a, 65536).ToArray());
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            img.File.Faults = Rules(new BlkdebugErrorRule(step, 5, null, null, Once: false));
            Assert.Equal(5, Assert.Throws<BlockIOException>(img.MakeEmpty).Errno);
        }
        // The dirty bit is set, so that an open for writing repairs the refcounts before anything else.
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
            Assert.NotEqual(0UL, (ulong)(img.Header.IncompatibleFeatures & Strata.Formats.Qcow2.Qcow2IncompatibleFeatures.Dirty));
        // Until the first clusters are zeroed the refcount structures are intact and Strata's own repair suffices;
        // after that the refcount table must be rebuilt from scratch (QEMU's repair does; the interop test shows it).
        if (step is "reftable_update" or "refblock_alloc") return;
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false)) { }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
        {
            var report = img.Check(RepairMode.None);
            Assert.Equal((0, 0, 0), (report.Corruptions, report.Leaks, report.CheckErrors));
        }
    }

    [Fact]
    public void MakeEmptyResetsToTheSmallestLayout()
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20 }))
        {
            img.Write(0, new byte[65536]);
            img.Write(32 << 20, Enumerable.Repeat((byte)1, 65536).ToArray());
            img.MakeEmpty();
        }
        Assert.Equal(4 * 65536, new FileInfo(path).Length);
        using var reopened = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false);
        var report = reopened.Check(RepairMode.None);
        Assert.Equal((0, 0), (report.Corruptions, report.Leaks));
        var back = new byte[65536];
        reopened.Read(32 << 20, back);
        Assert.All(back, b => Assert.Equal(0, b));
        reopened.Write(4096, [7]);
        reopened.Read(4096, back.AsSpan(0, 1));
        Assert.Equal(7, back[0]);
    }

    [Theory]
    [InlineData("cluster_alloc")]
    [InlineData("refblock_update_part")]
    [InlineData("l2_update")]
    [InlineData("l1_update")]
    [InlineData("cluster_free")]
    [InlineData("l1_grow_write_table")]
    public void AMetadataWriteFailingOnceLeavesAConsistentImageAndTheRetryKeepsTheData(string step)
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        var first = Enumerable.Repeat((byte)0x11, 65536).ToArray();
        var second = Enumerable.Repeat((byte)0x22, 65536).ToArray();
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20 }))
        {
            img.Write(0, first);
            img.Flush();
            img.File.Faults = Rules(new BlkdebugErrorRule(step, 5, null, null, Once: true));
            bool failed = false;
            void Step(Action a)
            {
                try { a(); }
                catch (BlockIOException) { failed = true; }
            }
            // A longer L1 table, new clusters (and an L2 table, so a new L1 entry), a freed cluster: every event
            // gets its turn.
            Step(() => img.Resize(8L << 30));
            if (img.Size < 8L << 30) img.Resize(8L << 30); // the rule fired there: the retry succeeds
            Step(img.Flush);
            Step(() => img.Write(1L << 30, second));
            Step(img.Flush);
            Step(() => img.Discard(0, 65536));
            Step(img.Flush);
            Assert.True(failed, $"no I/O failed after {step}");
            img.Flush();
        }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
        {
            var report = img.Check(RepairMode.None);
            Assert.Equal((0, 0), (report.Corruptions, report.CheckErrors));
            var back = new byte[65536];
            img.Read(1L << 30, back);
            Assert.True(back.AsSpan().SequenceEqual(second) || back.All(b => b == 0), "the second write reads back as neither its data nor zeros");
        }
    }
}
