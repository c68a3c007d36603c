using System.Buffers.Binary;
using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `check` and `check -r all` on snapshot tables broken byte by byte (an entry with more extra data than QEMU
/// accepts, a snapshot count over the limit): same report as qemu-img, and after the repair qemu-img finds the image
/// clean, with the snapshots and the data as qemu-img's own repair leaves them.
/// </summary>
public class CheckSnapshotTableRepairTests
{
    /// <summary>A 64M image with data and three snapshots sn0..sn2, each after a different write; the snapshot table,
    /// written last, is at the end of the file.</summary>
    private static string BuildWithSnapshots(TempDir t)
    {
        string p = t["built.qcow2"];
        Workloads.QemuQcow2(p, "64M", ["write -P 0x11 0 128k"]);
        for (int n = 0; n < 3; n++)
        {
            QemuIo(p, [$"write -P 0x{0x22 + n:x2} {n * 64}k 64k"], "qcow2");
            QemuImg("snapshot", "-c", $"sn{n}", p).Ok();
        }
        return p;
    }

    /// <summary>File offset of snapshot table entry <paramref name="index"/>.</summary>
    private static long EntryOffset(string path, int index)
    {
        long offset = (long)Qcow2Edit.ReadU64(path, 64);
        for (int i = 0; i < index; i++)
        {
            offset = (offset + 7) & ~7L;
            var h = File.ReadAllBytes(path).AsSpan((int)offset, 40);
            offset += 40 + BinaryPrimitives.ReadUInt32BigEndian(h[36..]) + BinaryPrimitives.ReadUInt16BigEndian(h[12..]) +
                      BinaryPrimitives.ReadUInt16BigEndian(h[14..]);
        }
        return (offset + 7) & ~7L;
    }

    private static void WriteU32(string path, long offset, uint value)
    {
        var b = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(b, value);
        using var f = File.OpenWrite(path);
        f.Position = offset;
        f.Write(b);
    }

    private static void AssertSameCheck(TempDir t, string built, params string[] args) => AssertSameCheckOnCopies(t, built, args);

    /// <summary>Both repaired copies: qemu-img finds them clean, lists the same snapshots, and the snapshots and
    /// the active layer hold the same data.</summary>
    private static void AssertRepairedAlike(TempDir t)
    {
        string q = t["q.qcow2"], s = t["s.qcow2"];
        AssertQemuCheckClean(s);
        Assert.Equal(QemuImg("snapshot", "-l", q).Ok().Stdout, QemuImg("snapshot", "-l", s).Ok().Stdout);
        AssertQemuIdentical(s, q);
        // sn2's ID and name were read from behind its overlong extra data, so it is found by neither any more.
        for (int n = 0; n < 2; n++)
        {
            string qs = t[$"q-sn{n}.raw"], ss = t[$"s-sn{n}.raw"];
            QemuImg("convert", "-l", $"snapshot.name=sn{n}", "-O", "raw", q, qs).Ok();
            QemuImg("convert", "-l", $"snapshot.name=sn{n}", "-O", "raw", s, ss).Ok();
            Assert.Equal(Sha256(qs), Sha256(ss));
        }
    }

    [Fact]
    public void TooMuchExtraData_CheckFailsAsQemu_RepairCutsItAsQemu()
    {
        using var t = new TempDir();
        string built = BuildWithSnapshots(t);
        // 64 KiB of extra data in the last entry: over QEMU's 1 KiB limit, and the entry now reaches past the end of
        // the file, into a cluster without a refcount (so the refcounts are rebuilt too).
        WriteU32(built, EntryOffset(built, 2) + 36, 0x10000);
        AssertSameCheck(t, built);
        AssertSameCheck(t, built, "-r", "all");
        var repaired = StrataCmd("img", "check", "-r", "all", built);
        Assert.Contains("Discarding too much extra metadata in snapshot table entry 2 (65536 > 1024)", repaired.Stderr);
        AssertRepairedAlike(t);
    }

    [Fact]
    public void TooManySnapshotsInHeader_CheckFailsAsQemu_RepairDropsTheOverhangAsQemu()
    {
        using var t = new TempDir();
        string built = t["built.qcow2"];
        QemuImg("create", "-q", "-f", "qcow2", "-o", "compat=0.10", built, "64M").Ok();
        // 65537 all-zero entries (valid in version 2) at 1 MiB; one more than QEMU allows.
        Qcow2Edit.WriteU64(built, 64, 1 << 20);
        WriteU32(built, 60, 65537);
        using (var f = File.OpenWrite(built)) f.SetLength((1 << 20) + 40L * 65537);
        AssertSameCheck(t, built);
        var s = StrataCmd("img", "check", "-r", "all", t["s.qcow2"]);
        Assert.Contains("Discarding 1 overhanging snapshots", s.Stderr);
        Assert.Equal(65536u, Qcow2Edit.ReadU32(t["s.qcow2"], 60));
        AssertQemuCheckClean(t["s.qcow2"]);
    }
}
