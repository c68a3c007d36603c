using System.Buffers.Binary;
using Strata.Interop.Tests.Infra;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// A corpus of qcow2 images with broken headers, each opened by blockdev-add (QMP) and by --blockdev (the command
/// line) in strata daemon and in qemu-storage-daemon: strata answers an error and keeps serving, with QEMU's
/// class — and QEMU's message where it words the same check — and at startup says one line and exits 1.
/// </summary>
public class CorruptImageTests : ScratchDirTest
{
    /// <summary>How each image is broken: big-endian edits of the header of a good image, or a truncation.</summary>
    public static readonly (string Name, (int Offset, int Bytes, ulong Value)[] Edits, int? Truncate)[] Corpus =
    [
        ("bad-magic", [(0, 4, 0x51464900)], null),
        ("version-1", [(4, 4, 1)], null),
        ("version-4", [(4, 4, 4)], null),
        ("cluster-bits-8", [(20, 4, 8)], null),
        ("cluster-bits-22", [(20, 4, 22)], null),
        ("cluster-bits-99", [(20, 4, 99)], null),
        ("l1-past-eof", [(40, 8, 1UL << 40)], null),
        ("l1-unaligned", [(40, 8, 0x12345)], null),
        ("l1-size-huge", [(36, 4, 0x7fffffff)], null),
        ("l1-size-too-small", [(36, 4, 0)], null),
        ("refcount-table-past-eof", [(48, 8, 1UL << 40)], null),
        ("refcount-table-unaligned", [(48, 8, 0x10001)], null),
        ("refcount-table-clusters-huge", [(56, 4, 0x7fffffff)], null),
        ("refcount-order-7", [(96, 4, 7)], null),
        ("header-length-too-small", [(100, 4, 50)], null),
        ("header-length-huge", [(100, 4, 0x100000)], null),
        ("backing-offset-past-eof", [(8, 8, 1UL << 40), (16, 4, 10)], null),
        ("backing-name-too-long", [(8, 8, 0x200), (16, 4, 4096)], null),
        ("unknown-incompatible-bit", [(72, 8, 1UL << 20)], null),
        ("corrupt-bit", [(72, 8, 2)], null),
        ("unknown-compression-type", [(72, 8, 8), (104, 1, 7)], null),
        ("external-data-file-bit", [(72, 8, 4)], null),
        ("aes-encrypted", [(32, 4, 1)], null),
        ("size-huge", [(24, 8, 1UL << 62)], null),
        ("snapshot-table-past-eof", [(60, 4, 1), (64, 8, 1UL << 40)], null),
        ("truncated-50", [], 50),
        ("truncated-in-extensions", [], 300),
        ("empty", [], 0),
    ];

    /// <summary>Images qemu-storage-daemon opens anyway (it reads those tables lazily and fails on first use);
    /// Strata checks them at open and refuses.</summary>
    private static readonly HashSet<string> QemuOpensAnyway = ["l1-past-eof", "refcount-table-past-eof", "truncated-in-extensions"];

    /// <summary>Images both open: a snapshot table past the end of the file reads as zeros (empty entries), as in
    /// QEMU, whose iotest 080 relies on it.</summary>
    private static readonly HashSet<string> BothOpen = ["snapshot-table-past-eof"];

    /// <summary>Checks both implementations make, worded alike: the messages must be QEMU's exactly.</summary>
    private static readonly HashSet<string> SameMessage =
    [
        "bad-magic", "version-1", "version-4", "cluster-bits-8", "cluster-bits-22", "cluster-bits-99", "l1-unaligned", "l1-size-huge",
        "header-length-huge", "backing-name-too-long", "unknown-incompatible-bit", "corrupt-bit", "truncated-50", "empty",
    ];

    private string Build(string name)
    {
        string good = P("good.qcow2");
        if (!File.Exists(good)) Workloads.QemuQcow2(good, "64M", ["write -P 0xab 0 1M"]);
        var (_, edits, truncate) = Corpus.Single(c => c.Name == name);
        string path = P(name + ".qcow2");
        File.Copy(good, path, overwrite: true);
        using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
        foreach (var (offset, bytes, value) in edits)
        {
            var b = new byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(b, value);
            f.Position = offset;
            f.Write(b, 8 - bytes, bytes);
        }
        if (truncate is { } length) f.SetLength(length);
        return path;
    }

    /// <summary>blockdev-add of a file node and a qcow2 node on it, for every image, on one daemon: each outcome,
    /// and the same connection still answers after each.</summary>
    private async Task<List<(string Name, string? Class, string? Message)>> OpenAllAsync(string kind)
    {
        using var daemon = new BareDaemon(kind, Dir, []);
        await using var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
        var outcomes = new List<(string, string?, string?)>();
        int i = 0;
        foreach (var (name, _, _) in Corpus.Where(c => !BothOpen.Contains(c.Name)))
        {
            string path = Build(name);
            await qmp.ExecuteAsync("blockdev-add", new Dictionary<string, object> { ["driver"] = "file", ["node-name"] = $"f{i}", ["filename"] = path });
            try
            {
                await qmp.ExecuteAsync("blockdev-add", new Dictionary<string, object> { ["driver"] = "qcow2", ["node-name"] = $"q{i}", ["file"] = $"f{i}" })
                    .WaitAsync(TimeSpan.FromSeconds(30));
                outcomes.Add((name, null, null));
                await qmp.ExecuteAsync("blockdev-del", new Dictionary<string, object> { ["node-name"] = $"q{i}" });
            }
            catch (QmpException e)
            {
                outcomes.Add((name, e.ErrorClass, e.Message));
            }
            // The file node is free again (the failed open left nothing on it), and the monitor still answers.
            await qmp.ExecuteAsync("blockdev-del", new Dictionary<string, object> { ["node-name"] = $"f{i}" });
            await qmp.ExecuteAsync("query-version");
            i++;
        }
        Assert.False(daemon.HasExited);
        if (kind == "strata") Assert.DoesNotContain("unexpected error", daemon.Stderr);
        return outcomes;
    }

    [Fact]
    public async Task BlockdevAddOfEachCorruptImageIsAnErrorWithQemusClassAndTheMonitorKeepsServing()
    {
        var qemu = await OpenAllAsync("qsd");
        var strata = await OpenAllAsync("strata");
        var report = string.Join("\n", qemu.Zip(strata, (q, s) => $"{q.Name}: qsd {q.Class ?? "ok"}: {q.Message} | strata {s.Class ?? "ok"}: {s.Message}"));
        foreach (var ((name, qClass, qMessage), (_, sClass, sMessage)) in qemu.Zip(strata))
        {
            if (BothOpen.Contains(name))
            {
                Assert.True(qClass is null && sClass is null, $"{name} should open in both:\n{report}");
                continue;
            }
            Assert.True(sClass is not null, $"strata opened {name}:\n{report}");
            if (QemuOpensAnyway.Contains(name))
            {
                Assert.True(qClass is null, $"qemu-storage-daemon now refuses {name}: move it out of QemuOpensAnyway\n{report}");
                continue;
            }
            Assert.True(qClass is not null, $"qemu-storage-daemon opened {name}:\n{report}");
            Assert.True(qClass == sClass, $"{name}: error classes differ\n{report}");
            if (SameMessage.Contains(name)) Assert.True(qMessage == sMessage, $"{name}: messages differ\n{report}");
        }
    }

    [Fact]
    public void DaemonStartupWithEachCorruptImageSaysOneLineAndExits1AsQemuDoes()
    {
        foreach (var (name, _, _) in Corpus.Where(c => !BothOpen.Contains(c.Name)))
        {
            string path = Build(name);
            string[] args = ["--blockdev", $"driver=file,node-name=f,filename={path}", "--blockdev", "driver=qcow2,node-name=q,file=f"];
            var (strataExit, strataErr) = BareDaemon.RunToFailure("strata", Dir, args);
            var lines = strataErr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
            Assert.True(strataExit == 1 && lines.Length == 1, $"{name}: exit {strataExit}, stderr:\n{strataErr}");
            Assert.StartsWith("strata daemon: --blockdev driver=qcow2,node-name=q,file=f: ", lines[0]);
            if (QemuOpensAnyway.Contains(name)) continue;
            var (qemuExit, qemuErr) = BareDaemon.RunToFailure("qsd", Dir, args);
            Assert.True(qemuExit == 1, $"{name}: qemu-storage-daemon exit {qemuExit}: {qemuErr}");
            if (SameMessage.Contains(name))
                Assert.Equal(qemuErr.Trim().Replace("qemu-storage-daemon: ", ""), lines[0].Trim().Replace("strata daemon: ", ""));
        }
    }
}
