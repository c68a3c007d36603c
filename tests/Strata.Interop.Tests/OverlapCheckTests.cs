using System.Buffers.Binary;
using Strata.Interop.Tests.Infra;

namespace Strata.Interop.Tests;

/// <summary>
/// Images whose metadata is broken so that a write would land on other metadata (or on the header). strata io
/// (run as its own process, so its stderr is what a user sees) must refuse the write as qemu-io does: the same
/// corruption message, the same per-command failures, the image marked corrupt, the guest data that was there still
/// readable by QEMU, and the file not damaged further.
/// </summary>
public class OverlapCheckTests : ScratchDirTest
{
    // A fresh 64 MiB image from qemu-img with 128 KiB written: header at 0, refcount table at 0x10000, its block at
    // 0x20000, L1 at 0x30000, the L2 table at 0x40000, guest clusters 0 and 1 at 0x50000 and 0x60000.
    private const long RefcountTable = 0x10000, RefcountBlock = 0x20000, L1 = 0x30000, L2 = 0x40000;
    private const ulong Copied = 1UL << 63;

    /// <summary>Name → how the good image is broken: (file offset, bytes, big-endian value; 0 bytes = zero a cluster).</summary>
    public static readonly Dictionary<string, (string Options, (long Offset, int Bytes, ulong Value)[] Edits)> Corpus = new()
    {
        ["refcount-table-entry-zeroed"] = ("", [(RefcountTable, 8, 0)]),
        ["refcount-block-zeroed"] = ("", [(RefcountBlock, 0, 0)]),
        ["refcount-bits-1-block-zeroed"] = ("refcount_bits=1", [(RefcountBlock, 0, 0)]),
        ["l2-entry-into-l1"] = ("", [(L2, 8, Copied | L1)]),
        ["l2-entry-into-refcount-table"] = ("", [(L2, 8, Copied | RefcountTable)]),
        ["l2-entry-into-refcount-block"] = ("", [(L2, 8, Copied | RefcountBlock)]),
        ["l2-entry-into-header"] = ("", [(L2, 8, Copied | 0x200)]),
        ["l1-entry-into-refcount-table"] = ("", [(L1, 8, Copied | RefcountTable)]),
    };

    public static TheoryData<string> CorpusNames => new(Corpus.Keys);

    private static readonly string[] Commands = ["write -P 0x22 1M 64k", "write -P 0x22 0 64k", "write -z 64k 64k", "discard 0 64k"];

    private string Build(string name)
    {
        var (options, edits) = Corpus[name];
        string path = P(name + ".qcow2");
        Tools.QemuImg(options.Length == 0 ? ["create", "-q", "-f", "qcow2", path, "64M"] : ["create", "-q", "-f", "qcow2", "-o", options, path, "64M"]).Ok();
        Tools.QemuIo(path, ["write -P 0x11 0 128k"]);
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        foreach (var (offset, bytes, value) in edits)
        {
            var buf = new byte[bytes == 0 ? 65536 : 8];
            BinaryPrimitives.WriteUInt64BigEndian(buf, value);
            f.Position = offset;
            f.Write(buf, 0, bytes == 0 ? buf.Length : bytes);
        }
        return path;
    }

    /// <summary>strata io as a process: the corruption message goes to the process's own stderr.</summary>
    private static ToolResult StrataIoProcess(string file, IEnumerable<string> commands, bool readOnly = false)
    {
        var args = new List<string> { "io" };
        if (readOnly) args.Add("-r");
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(file);
        return Tools.StrataProcess([.. args]);
    }

    private static ToolResult QemuIoRaw(string file, IEnumerable<string> commands, bool readOnly = false)
    {
        var args = new List<string>();
        if (readOnly) args.Add("-r");
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(file);
        return Tools.Run(Tools.QemuIoPath, [.. args]);
    }

    /// <summary>What a run reports, without qemu-io's timing lines.</summary>
    private static string[] Reported(string text) =>
        text.Split('\n', StringSplitOptions.RemoveEmptyEntries).Where(l => !l.Contains(" ops;")).ToArray();

    /// <summary>What QEMU reads from the first 128 KiB of the guest (a hex dump; a failed read is part of it).</summary>
    private static string[] GuestDump(string path) => Reported(QemuIoRaw(path, ["read -v 0 128k"], readOnly: true).Stdout);

    private static void AssertReads(ToolResult r) =>
        Assert.True(r.Exit == 0 && r.Stdout.StartsWith("read ", StringComparison.Ordinal) && !r.Stdout.Contains("failed"), r.ToString());

    private static bool MarkedCorrupt(string path) =>
        Tools.QemuImg("info", "--output=json", path).Ok().Json().GetProperty("format-specific").GetProperty("data").GetProperty("corrupt").GetBoolean();

    [Theory]
    [MemberData(nameof(CorpusNames))]
    public void Writes_that_would_land_on_metadata_are_refused_and_the_image_marked_corrupt_as_qemu_io_does(string name)
    {
        string original = Build(name);
        string ours = P("ours.qcow2"), theirs = P("theirs.qcow2");
        File.Copy(original, ours);
        File.Copy(original, theirs);

        var q = QemuIoRaw(theirs, Commands);
        var s = StrataIoProcess(ours, Commands);

        Assert.False(Tools.LooksLikeCrash(s.Stderr), s.ToString());
        Assert.Equal(q.Exit, s.Exit);
        Assert.Equal(Reported(q.Stdout), Reported(s.Stdout));
        string qemuMessage = Assert.Single(Reported(q.Stderr), l => l.StartsWith("qcow2: ", StringComparison.Ordinal));
        Assert.Contains(qemuMessage, Reported(s.Stderr));
        Assert.Contains("write failed: Input/output error", s.Stdout);
        Assert.True(MarkedCorrupt(ours), "the corrupt bit is not set:\n" + s);

        // No write reached the first 128 KiB of the guest: QEMU reads there exactly what it read before.
        Assert.Equal(GuestDump(original), GuestDump(ours));

        // A corrupt image is not opened read-write again, by either tool.
        var reopen = StrataIoProcess(ours, ["write 0 512"]);
        Assert.NotEqual(0, reopen.Exit);
        Assert.Contains("Image is corrupt; cannot be opened read/write", reopen.Stderr);
    }

    [Fact]
    public void Closing_an_image_whose_bitmaps_cannot_be_stored_safely_leaves_it_as_qemu_io_does()
    {
        // A persistent bitmap is stored again on close; with the refcount table entry gone the allocator would hand
        // out the refcount table itself. The store is refused and the image marked corrupt.
        string path = P("bitmap.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", path, "64M").Ok();
        Tools.QemuIo(path, ["write -P 0x11 0 128k"]);
        Tools.QemuImg("bitmap", "--add", path, "b0").Ok();
        using (var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = RefcountTable;
            f.Write(new byte[8]);
        }
        string theirs = P("theirs.qcow2");
        File.Copy(path, theirs);

        var s = StrataIoProcess(path, []);
        QemuIoRaw(theirs, ["quit"]);

        Assert.NotEqual(0, s.Exit);
        Assert.Contains("qcow2: Marking image as corrupt: Preventing invalid write on metadata (overlaps with refcount table); further corruption events will be suppressed", s.Stderr);
        // qemu-io refuses the same store and leaves the same bytes: bitmaps marked in use, the corrupt bit, nothing else.
        Assert.Equal(File.ReadAllBytes(theirs), File.ReadAllBytes(path));
        Assert.True(MarkedCorrupt(path));
        AssertReads(QemuIoRaw(path, ["read -P 0x11 0 128k"], readOnly: true));
    }

    [Fact]
    public void Compressed_writes_with_one_bit_refcounts_start_a_new_cluster_instead_of_overflowing()
    {
        // With refcount_bits=1 a host cluster cannot be shared by two compressed clusters, as QEMU packs them.
        string ours = P("ours.qcow2"), theirs = P("theirs.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "refcount_bits=1", ours, "64M").Ok();
        File.Copy(ours, theirs);
        string[] commands = ["write -c -P 0x33 2M 64k", "write -c -P 0x34 3M 64k", "write -c -P 0x35 4M 64k"];

        var s = StrataIoProcess(ours, commands);
        QemuIoRaw(theirs, commands).Ok();

        Assert.True(s.Exit == 0, s.ToString());
        Tools.AssertQemuCheckClean(ours);
        Tools.AssertQemuIdentical(ours, theirs);
    }
}
