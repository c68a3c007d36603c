using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Tests.Block;

/// <summary>Refcounts at the largest value their width holds, and changing the width, in the driver itself.</summary>
public class Qcow2RefcountLimitTests
{
    /// <summary>Overwrites the stored refcount of the cluster holding guest offset 0 and clears QCOW_OFLAG_COPIED on
    /// its L2 entry, as if the cluster were shared that often. Returns the cluster's host offset.</summary>
    private static long PretendShared(string path, int refcountBits, byte[] refcount)
    {
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        ulong ReadU64(long at)
        {
            var b = new byte[8];
            f.Position = at;
            f.ReadExactly(b);
            return System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(b);
        }
        const ulong OffsetMask = 0x00ff_ffff_ffff_fe00;
        long l2 = (long)(ReadU64((long)ReadU64(40)) & OffsetMask);
        ulong entry = ReadU64(l2);
        long data = (long)(entry & OffsetMask);
        long refblock = (long)ReadU64((long)ReadU64(48));
        f.Position = refblock + (data >> 16) * refcountBits / 8;
        f.Write(refcount);
        var cleared = new byte[8];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt64BigEndian(cleared, entry & ~(1UL << 63));
        f.Position = l2;
        f.Write(cleared);
        return data;
    }

    [Theory]
    [InlineData(64, new byte[] { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff })]
    [InlineData(64, new byte[] { 0x80, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00 })]
    [InlineData(32, new byte[] { 0xff, 0xff, 0xff, 0xff })]
    [InlineData(8, new byte[] { 0xff })]
    public void SnapshotOfAClusterAtTheLimitFailsWithEinvalAndLeavesOnlyLeaks(int refcountBits, byte[] stored)
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20, RefcountBits = refcountBits }))
            img.Write(0, new byte[512]);
        PretendShared(path, refcountBits, stored);
        bool atLimit = stored.All(b => b == 0xff);

        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            if (atLimit)
            {
                var e = Assert.Throws<SnapshotException>(() => img.CreateSnapshot("foo", DateTimeOffset.UnixEpoch));
                Assert.Equal(22, e.Errno);
                Assert.Empty(img.Snapshots);
            }
            else
            {
                // 2^63 is no limit for 64-bit refcounts: one more reference fits.
                img.CreateSnapshot("foo", DateTimeOffset.UnixEpoch);
            }
        }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
        {
            var report = img.Check(RepairMode.None);
            Assert.Equal(0, report.Corruptions);
            Assert.Equal(0, report.CheckErrors);
            // The stored refcount never wrapped: the data cluster keeps its value (a leak), the L1 copy leaks.
            Assert.Equal(atLimit ? 2 : 1, report.Leaks);
            var buffer = new byte[512];
            img.Read(0, buffer);
            Assert.All(buffer, b => Assert.Equal(0, b));
        }
    }

    [Theory]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(64)]
    public void ChangingTheWidthKeepsEveryRefcount(int refcountBits)
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        var data = new byte[3 << 20];
        new Random(7).NextBytes(data);
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20 }))
        {
            img.Write(1 << 20, data);
            if (refcountBits > 1) img.CreateSnapshot("s", DateTimeOffset.UnixEpoch);
            img.Write(2 << 20, new byte[65536]);
        }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            var reports = new List<(long Done, long Total)>();
            img.ChangeRefcountWidth(refcountBits, (done, total) => reports.Add((done, total)));
            Assert.Equal(refcountBits, img.Header.RefcountBits);
            Assert.NotEmpty(reports);
            Assert.Equal(reports[^1].Done, reports[^1].Total);
        }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
        {
            Assert.Equal(refcountBits, img.Header.RefcountBits);
            var report = img.Check(RepairMode.None);
            Assert.Equal((0, 0, 0), (report.Corruptions, report.Leaks, report.CheckErrors));
            var back = new byte[data.Length];
            img.Read(1 << 20, back);
            Assert.Equal(new byte[65536], back.AsSpan(1 << 20, 65536).ToArray());
            Assert.True(back.AsSpan(0, 1 << 20).SequenceEqual(data.AsSpan(0, 1 << 20)));
            Assert.True(back.AsSpan(2 << 20).SequenceEqual(data.AsSpan(2 << 20)));
        }
    }

    [Fact]
    public void NarrowingBelowASharedRefcountIsRefusedAndChangesNothing()
    {
        using var dir = new TempDir();
        string path = dir["a.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 64 << 20 }))
        {
            img.Write(0, new byte[65536]);
            img.CreateSnapshot("s", DateTimeOffset.UnixEpoch);
        }
        byte[] before = File.ReadAllBytes(path);
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            var e = Assert.Throws<BlockException>(() => img.ChangeRefcountWidth(1));
            Assert.Matches("^Cannot decrease refcount entry width to 1 bits: Cluster at offset 0x[45]0000 has a refcount of 2$", e.Message);
            Assert.Equal(16, img.Header.RefcountBits);
        }
        using (var img = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true))
        {
            var report = img.Check(RepairMode.None);
            Assert.Equal((0, 0), (report.Corruptions, report.Leaks));
        }
        Assert.Equal(before.Length, new FileInfo(path).Length);
    }
}
