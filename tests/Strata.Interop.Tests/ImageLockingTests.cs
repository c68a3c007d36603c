using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// QEMU's image locking: strata daemon takes the same lock bytes as qemu-storage-daemon for the same command line,
/// so qemu-img and QEMU keep off images Strata uses, and Strata (daemon, img, io) keeps off images QEMU uses.
/// </summary>
public class ImageLockingTests : ScratchDirTest
{
    private const string SharedWrite = "Failed to get shared \"write\" lock";
    private const string Write = "Failed to get \"write\" lock";

    /// <summary>A daemon of either kind started with <paramref name="args"/> plus a QMP monitor; killed on dispose.</summary>
    private sealed class Daemon : IDisposable
    {
        private readonly Process _process;
        public string QmpPath { get; }

        public Daemon(string kind, string dir, IEnumerable<string> args)
        {
            QmpPath = Path.Combine(dir, $"{kind}-{Guid.NewGuid():N}.qmp");
            var psi = kind == "qsd" ? new ProcessStartInfo("qemu-storage-daemon")
                : Tools.StrataStartInfo("daemon");
            foreach (var a in args) psi.ArgumentList.Add(a);
            foreach (var a in new[] { "--chardev", $"socket,id=m,path={QmpPath},server=on,wait=off", "--monitor", "chardev=m" }) psi.ArgumentList.Add(a);
            psi.RedirectStandardError = psi.RedirectStandardOutput = true;
            _process = Process.Start(psi)!;
            _kind = kind;
            Listening.WaitForProcess(_process, kind, 20000, QmpPath);
        }

        private readonly string _kind;

        /// <summary>Connects to the monitor. Once in CI a connection made right after the daemon began to listen was
        /// closed before the greeting (the test's timing points at qemu-storage-daemon, and other projects retry the
        /// same in QEMU's start-up): retried for qsd only, so a Strata daemon that does it still fails the test. A
        /// daemon that died says how.</summary>
        public async Task<QmpClient> ConnectAsync()
        {
            for (int attempt = 1; ; attempt++)
            {
                QmpClient? client = null;
                try
                {
                    client = await QmpClient.ConnectUnixAsync(QmpPath);
                    // The greeting and the negotiation come back after the connection: a hang-up shows here.
                    await client.Negotiated.WaitAsync(TimeSpan.FromSeconds(30));
                    return client;
                }
                catch (IOException e)
                {
                    if (client is not null) await client.DisposeAsync();
                    if (_process.WaitForExit(200))
                        throw new IOException($"{_kind} exited with {_process.ExitCode}: {_process.StandardError.ReadToEnd()}", e);
                    if (_kind != "qsd" || attempt == 3) throw;
                }
            }
        }

        public void Dispose()
        {
            if (!_process.HasExited)
            {
                _process.Kill();
                _process.WaitForExit();
            }
            _process.Dispose();
        }
    }

    /// <summary>The byte ranges of the open-file-description locks on <paramref name="path"/>, as /proc/locks lists them.</summary>
    private static string LockBytes(string path)
    {
        string inode = ":" + Tools.Run("stat", "-c", "%i", path).Stdout.Trim() + " ";
        var ranges = File.ReadAllLines("/proc/locks")
            .Where(l => l.Contains("OFDLCK") && l.Contains(inode))
            .Select(l => l.Split(' ', StringSplitOptions.RemoveEmptyEntries))
            .Select(f => $"{f[^2]}-{f[^1]}")
            .Distinct().Order(StringComparer.Ordinal);
        return string.Join(" ", ranges);
    }

    private string[] Images()
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("base.qcow2"), "16M").Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", P("top.qcow2")).Ok();
        Tools.QemuImg("create", "-q", "-f", "raw", P("disk.raw"), "16M").Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", "disk.raw", "-F", "raw", P("raw-top.qcow2")).Ok();
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={P("data.raw")},data_file_raw=on", P("meta.qcow2"), "16M").Ok();
        return [P("base.qcow2"), P("top.qcow2"), P("disk.raw"), P("raw-top.qcow2"), P("meta.qcow2"), P("data.raw")];
    }

    public static TheoryData<string, string[]> Configurations => new()
    {
        { "qcow2 writable", ["--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f"] },
        { "qcow2 read-only", ["--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2,read-only=on", "--blockdev", "driver=qcow2,node-name=n,file=f,read-only=on"] },
        { "overlay and its backing file", ["--blockdev", "driver=file,node-name=f,filename=DIR/top.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f"] },
        { "overlay of a raw backing file", ["--blockdev", "driver=file,node-name=f,filename=DIR/raw-top.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f"] },
        { "file node alone", ["--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2"] },
        { "raw without users", ["--blockdev", "driver=file,node-name=f,filename=DIR/disk.raw", "--blockdev", "driver=raw,node-name=n,file=f"] },
        { "raw exported writable", ["--blockdev", "driver=file,node-name=f,filename=DIR/disk.raw", "--blockdev", "driver=raw,node-name=n,file=f",
            "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=n,writable=on"] },
        { "file exported read-only", ["--blockdev", "driver=file,node-name=f,filename=DIR/disk.raw",
            "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=f"] },
        { "raw exported through a throttle filter", ["--object", "throttle-group,id=tg,x-bps-total=1000000",
            "--blockdev", "driver=file,node-name=f,filename=DIR/disk.raw", "--blockdev", "driver=raw,node-name=n,file=f",
            "--blockdev", "driver=throttle,node-name=t,file=n,throttle-group=tg",
            "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=t,writable=on"] },
        { "raw node named as a backing node", ["--blockdev", "driver=file,node-name=rf,filename=DIR/disk.raw", "--blockdev", "driver=raw,node-name=r,file=rf",
            "--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f,backing=r"] },
        { "raw backing node under an exported overlay", ["--blockdev", "driver=file,node-name=rf,filename=DIR/disk.raw", "--blockdev", "driver=raw,node-name=r,file=rf",
            "--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f,backing=r",
            "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=n,writable=on"] },
        { "qcow2 with a raw data file", ["--blockdev", "driver=file,node-name=f,filename=DIR/meta.qcow2", "--blockdev", "driver=qcow2,node-name=n,file=f"] },
        { "qcow2 with a raw data file, read-only and exported", ["--blockdev", "driver=file,node-name=f,filename=DIR/meta.qcow2,read-only=on",
            "--blockdev", "driver=qcow2,node-name=n,file=f,read-only=on", "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=n"] },
        { "qcow2 with a data file node, exported writable", ["--blockdev", "driver=file,node-name=f,filename=DIR/meta.qcow2",
            "--blockdev", "driver=file,node-name=d,filename=DIR/data.raw", "--blockdev", "driver=qcow2,node-name=n,file=f,data-file=d",
            "--nbd-server", "addr.type=unix,addr.path=DIR/e.nbd", "--export", "type=nbd,id=e,node-name=n,writable=on"] },
        { "locking=off", ["--blockdev", "driver=file,node-name=f,filename=DIR/base.qcow2,locking=off", "--blockdev", "driver=qcow2,node-name=n,file=f"] },
    };

    [Theory]
    [MemberData(nameof(Configurations))]
    public void TheDaemonLocksTheBytesQemuStorageDaemonLocks(string what, string[] args)
    {
        var images = Images();
        string Locks(string kind)
        {
            string dir = Directory.CreateDirectory(P(kind)).FullName;
            using var daemon = new Daemon(kind, dir, args.Select(a => a.Replace("DIR", Dir)));
            return string.Join(" | ", images.Select(i => $"{Path.GetFileName(i)}: {LockBytes(i)}"));
        }
        string qemu = Locks("qsd");
        Assert.Equal(qemu, Locks("strata"));
        if (what == "qcow2 writable") Assert.Contains("base.qcow2: 100-101 103-103 201-201 203-203", qemu);
    }

    /// <summary>Runs the same QMP steps against qemu-storage-daemon and strata daemon, started with the same
    /// blockdevs and an NBD server; each step's note records the lock bytes of <paramref name="files"/>, and the two
    /// logs must agree. Returns QEMU's log.</summary>
    private async Task<string> SameLockStory(string[] blockdevs, (string Label, string Path)[] files, Func<QmpClient, Action<string>, Task> steps)
    {
        var logs = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            string dir = Directory.CreateDirectory(P(kind)).FullName;
            var log = new List<string>();
            using var daemon = new Daemon(kind, dir, [.. blockdevs, "--nbd-server", $"addr.type=unix,addr.path={Path.Combine(dir, "e.nbd")}"]);
            await using var qmp = await daemon.ConnectAsync();
            await steps(qmp, when => log.Add($"{when}: " + string.Join("; ", files.Select(f => $"{f.Label} {LockBytes(f.Path)}"))));
            logs.Add(string.Join("\n", log));
        }
        Assert.True(logs[0] == logs[1], $"qemu-storage-daemon:\n{logs[0]}\nstrata daemon:\n{logs[1]}");
        return logs[0];
    }

    /// <summary>--blockdev arguments for a file node NAME-file and a format node NAME on it.</summary>
    private static string[] FormatOnFile(string driver, string name, string path) =>
        ["--blockdev", $"driver=file,node-name={name}-file,filename={path}", "--blockdev", $"driver={driver},node-name={name},file={name}-file"];

    /// <summary>Jobs and exports go away asynchronously: waits until none is left.</summary>
    private static async Task Settled(QmpClient qmp)
    {
        for (int i = 0; i < 500; i++)
        {
            if ((await qmp.ExecuteAsync("query-jobs"))!.AsArray().Count == 0 && (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Count == 0) return;
            await Task.Delay(10);
        }
    }

    [Fact]
    public async Task ExportsAndJobsChangeTheLocksAsInQemuStorageDaemon()
    {
        Images();
        Tools.QemuImg("create", "-q", "-f", "raw", P("target.raw"), "16M").Ok();
        string qemu = await SameLockStory(
            [.. FormatOnFile("raw", "n", P("disk.raw")), .. FormatOnFile("raw", "t", P("target.raw"))],
            [("disk", P("disk.raw")), ("target", P("target.raw"))],
            async (qmp, note) =>
            {
                var events = new EventLog(qmp);
                note("start");
                await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"e","node-name":"n","writable":true}"""));
                note("writable export");
                foreach (var job in new[] { "blockdev-backup", "blockdev-mirror" })
                {
                    await qmp.ExecuteAsync(job, JsonNode.Parse("""{"job-id":"j","device":"n","target":"t","sync":"full","speed":1}"""));
                    note(job + " running");
                    await qmp.ExecuteAsync("job-cancel", new { id = "j" });
                    await JobWaits.UntilStatus(events, "j", "null");
                    note(job + " gone");
                }
                await qmp.ExecuteAsync("block-export-del", new { id = "e" });
                await Settled(qmp);
                note("export gone");
            });
        Assert.Contains("writable export: disk 100-101 203-203", qemu);
    }

    /// <summary>A raw disk's data file carries what its qcow2 node's users claim, through an export and a backup.</summary>
    [Fact]
    public async Task ADataFileFollowsItsDisksUsersAsInQemuStorageDaemon()
    {
        Images();
        Tools.QemuImg("create", "-q", "-f", "raw", P("target.raw"), "16M").Ok();
        string qemu = await SameLockStory(
            [.. FormatOnFile("qcow2", "n", P("meta.qcow2")), .. FormatOnFile("raw", "t", P("target.raw"))],
            [("meta", P("meta.qcow2")), ("data", P("data.raw"))],
            async (qmp, note) =>
            {
                var events = new EventLog(qmp);
                note("start");
                await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"e","node-name":"n","writable":true}"""));
                note("writable export");
                await qmp.ExecuteAsync("blockdev-backup", JsonNode.Parse("""{"job-id":"j","device":"n","target":"t","sync":"full","speed":1}"""));
                note("backup running");
                await qmp.ExecuteAsync("job-cancel", new { id = "j" });
                await JobWaits.UntilStatus(events, "j", "null");
                note("backup gone");
                await qmp.ExecuteAsync("block-export-del", new { id = "e" });
                await Settled(qmp);
                note("export gone");
            });
        Assert.Contains("writable export: meta 100-101 103-103 201-201 203-203; data 100-101 103-103 203-203", qemu);
    }

    /// <summary>An image tool holding a qcow2 with a raw data file open locks both files as qemu-io does (the data file
    /// as the tool's own claim on a raw disk, passed through).</summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void StrataIoLocksADataFileAsQemuIoDoes(bool readOnly)
    {
        Images();
        string Locks(ProcessStartInfo psi)
        {
            psi.RedirectStandardInput = psi.RedirectStandardOutput = psi.RedirectStandardError = true;
            psi.UseShellExecute = false;
            using var tool = Process.Start(psi)!;
            try
            {
                // Commands come from stdin, which stays open: the tool holds the image until it closes.
                var deadline = DateTime.UtcNow.AddSeconds(15);
                while ((LockBytes(P("meta.qcow2")).Length == 0 || LockBytes(P("data.raw")).Length == 0) && DateTime.UtcNow < deadline && !tool.HasExited)
                    Thread.Sleep(50);
                // Both files are open; the claims settle as the open finishes.
                Thread.Sleep(300);
                return $"meta {LockBytes(P("meta.qcow2"))}; data {LockBytes(P("data.raw"))}";
            }
            finally
            {
                tool.StandardInput.Close();
                if (!tool.WaitForExit(15000)) tool.Kill();
            }
        }
        string[] args = readOnly ? ["-r", P("meta.qcow2")] : [P("meta.qcow2")];
        string qemu = Locks(new ProcessStartInfo("qemu-io", args));
        Assert.Equal(qemu, Locks(Tools.StrataStartInfo(["io", .. args])));
        Assert.Contains(readOnly ? "data 100-100 203-203" : "data 100-101 103-103 203-203", qemu);
    }

    [Fact]
    public async Task ADriveBackupTargetIsLockedAsInQemuStorageDaemon()
    {
        Images();
        Tools.QemuIo(P("base.qcow2"), ["write -P 0x5a 0 4M"]);
        string qemu = await SameLockStory([.. FormatOnFile("qcow2", "n", P("base.qcow2"))], [("target", P("drive.qcow2"))],
            async (qmp, note) =>
            {
                await qmp.ExecuteAsync("drive-backup", new JsonObject
                {
                    ["job-id"] = "j", ["device"] = "n", ["target"] = P("drive.qcow2"), ["format"] = "qcow2", ["sync"] = "full", ["speed"] = 1,
                });
                note("running");
                await qmp.ExecuteAsync("job-cancel", new { id = "j" });
                await Settled(qmp);
                note("gone");
            });
        Assert.Contains("running: target 100-101 103-103 201-201 203-203", qemu);
    }

    /// <summary>After an external snapshot the old top is reopened read-only: its file keeps a reader's locks.</summary>
    [Fact]
    public async Task AnExternalSnapshotLeavesTheOldTopLockedAsAReaderAsInQemuStorageDaemon()
    {
        Images();
        string qemu = await SameLockStory([.. FormatOnFile("qcow2", "n", P("base.qcow2"))], [("base", P("base.qcow2")), ("overlay", P("snap.qcow2"))],
            async (qmp, note) =>
            {
                File.Delete(P("snap.qcow2"));
                await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"e","node-name":"n","writable":true}"""));
                await qmp.ExecuteAsync("blockdev-snapshot-sync", new JsonObject
                {
                    ["node-name"] = "n", ["snapshot-file"] = P("snap.qcow2"), ["snapshot-node-name"] = "snap", ["format"] = "qcow2",
                });
                note("after the snapshot");
            });
        Assert.Contains("after the snapshot: base 100-100 201-201 203-203; overlay 100-101 103-103 201-201 203-203", qemu);
    }

    /// <summary>Pull-model fleecing: a copy-before-write filter in use keeps other writers off its source, and the
    /// guest's export through it passes its own claim down.</summary>
    [Fact]
    public async Task FleecingLocksTheSourceAsInQemuStorageDaemon()
    {
        Images();
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("fleece.qcow2"), "16M").Ok();
        string qemu = await SameLockStory(
            [.. FormatOnFile("raw", "s", P("disk.raw")), .. FormatOnFile("qcow2", "fl", P("fleece.qcow2"))],
            [("source", P("disk.raw")), ("fleece", P("fleece.qcow2"))],
            async (qmp, note) =>
            {
                note("start");
                await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("""{"driver":"copy-before-write","node-name":"cbw","file":"s","target":"fl"}"""));
                note("filter");
                await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("""{"driver":"snapshot-access","node-name":"acc","file":"cbw"}"""));
                note("snapshot access");
                await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"pull","node-name":"acc"}"""));
                await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"guest","node-name":"cbw","writable":true}"""));
                note("exports");
                await qmp.ExecuteAsync("block-export-del", new { id = "guest" });
                await qmp.ExecuteAsync("block-export-del", new { id = "pull" });
                await Settled(qmp);
                await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"acc"}"""));
                note("no snapshot access");
            });
        Assert.Contains("snapshot access: source 201-201 203-203", qemu);
    }

    [Fact]
    public void QemuToolsKeepOffAnImageTheDaemonUses()
    {
        Images();
        using var daemon = new Daemon("strata", Dir, ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=n,file=f"]);
        var info = Tools.Run("qemu-img", "info", P("base.qcow2"));
        Assert.Equal(1, info.Exit);
        Assert.Equal($"qemu-img: Could not open '{P("base.qcow2")}': {SharedWrite}\nIs another process using the image [{P("base.qcow2")}]?", info.Stderr.Trim());
        Assert.Equal(0, Tools.Run("qemu-img", "info", "-U", P("base.qcow2")).Exit);
        var write = Tools.Run("qemu-io", "-c", "write 0 4k", P("base.qcow2"));
        Assert.NotEqual(0, write.Exit);
        Assert.Contains(Write, write.Stderr);
        // A second daemon is refused as qemu-storage-daemon would refuse it.
        var second = Tools.Run("qemu-storage-daemon", "--blockdev", $"driver=file,node-name=g,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=m,file=g");
        Assert.Equal(1, second.Exit);
        Assert.Contains(Write, second.Stderr);
    }

    [Fact]
    public async Task StrataKeepsOffAnImageQemuUsesAndSaysWhyInQemusWords()
    {
        Images();
        using var qsd = new Daemon("qsd", Dir, ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=n,file=f"]);
        string hint = $"\nIs another process using the image [{P("base.qcow2")}]?";

        var info = Tools.StrataCmd("img", "info", P("base.qcow2"));
        Assert.Equal(1, info.Exit);
        Assert.Equal($"strata img: Could not open '{P("base.qcow2")}': {SharedWrite}{hint}", info.Stderr.Trim());
        Assert.Equal(0, Tools.StrataCmd("img", "info", "-U", P("base.qcow2")).Exit);
        Assert.Equal(0, Tools.StrataCmd("img", "compare", "-U", P("base.qcow2"), P("base.qcow2")).Exit);
        Assert.NotEqual(0, Tools.StrataCmd("img", "bitmap", "--add", P("base.qcow2"), "b").Exit);
        var write = Tools.StrataCmd("io", "-c", "write 0 4k", P("base.qcow2"));
        var qemuWrite = Tools.Run("qemu-io", "-c", "write 0 4k", P("base.qcow2"));
        Assert.Equal(qemuWrite.Stderr.Trim().Replace("qemu-io:", "strata io:"), write.Stderr.Trim());

        // The daemon's command line and QMP give qemu-storage-daemon's errors, QMP without the hint line.
        string blockdev = $"driver=file,node-name=g,filename={P("base.qcow2")},read-only=on";
        var startQemu = Tools.Run("qemu-storage-daemon", "--blockdev", blockdev, "--blockdev", "driver=qcow2,node-name=m,file=g,read-only=on");
        var startStrata = Tools.StrataCmd("daemon", "--blockdev", blockdev, "--blockdev", "driver=qcow2,node-name=m,file=g,read-only=on");
        Assert.Equal(1, startStrata.Exit);
        Assert.Equal(startQemu.Stderr.Trim().Replace("qemu-storage-daemon:", "strata daemon:"), startStrata.Stderr.Trim());

        var answers = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            using var other = new Daemon(kind, Directory.CreateDirectory(P(kind)).FullName, []);
            await using var qmp = await other.ConnectAsync();
            var add = new JsonObject { ["driver"] = "qcow2", ["node-name"] = "x", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = P("base.qcow2") } };
            var e = await Assert.ThrowsAsync<QmpException>(() => qmp.ExecuteAsync("blockdev-add", add));
            answers.Add($"{e.ErrorClass}: {e.Message}");
            // Nothing was left open: the node can be added once the other process lets go.
            Assert.Empty((await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray());
        }
        Assert.Equal($"GenericError: {Write}", answers[0]);
        Assert.Equal(answers[0], answers[1]);
    }

    /// <summary>Creating or converting over an image another process uses would destroy it: refused before a byte
    /// is cut, in qemu-img's words.</summary>
    [Theory]
    [InlineData("create -f qcow2 IMG 1M")]
    [InlineData("create -f raw IMG 1M")]
    [InlineData("convert -O qcow2 SRC IMG")]
    [InlineData("convert -O raw SRC IMG")]
    public void OverwritingAnImageInUseIsRefusedAsQemuImgRefusesIt(string command)
    {
        Images();
        using var qsd = new Daemon("qsd", Dir, [.. FormatOnFile("qcow2", "n", P("base.qcow2"))]);
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("src.qcow2"), "1M").Ok();
        string[] args = command.Replace("IMG", P("base.qcow2")).Replace("SRC", P("src.qcow2")).Split(' ');
        var qemu = Tools.Run("qemu-img", args);
        var strata = Tools.StrataCmd(["img", .. args]);
        Assert.Equal(1, qemu.Exit);
        Assert.Equal(1, strata.Exit);
        Assert.Equal(qemu.Stderr.Trim().Replace("qemu-img:", "strata img:"), strata.Stderr.Trim());
        Assert.Contains("virtual size: 16 MiB", Tools.Run("qemu-img", "info", "-U", P("base.qcow2")).Stdout);
    }

    /// <summary>Two format nodes on one file node share one open file, so no lock byte can tell them apart: the
    /// daemon checks their permissions against each other, as QEMU's graph does.</summary>
    [Fact]
    public async Task FormatNodesSharingAFileNodeAreCheckedAgainstEachOtherAsInQemuStorageDaemon()
    {
        Images();
        var answers = new List<string>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            var log = new List<string>();
            using (var daemon = new Daemon(kind, Directory.CreateDirectory(P(kind)).FullName, ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}"]))
            {
                await using var qmp = await daemon.ConnectAsync();
                foreach (var (name, readOnly) in new[] { ("r1", true), ("r2", true), ("w1", false), ("w2", false), ("r3", true) })
                {
                    if (name == "w1")
                        foreach (var r in new[] { "r1", "r2" }) await qmp.ExecuteAsync("blockdev-del", new JsonObject { ["node-name"] = r });
                    try
                    {
                        await qmp.ExecuteAsync("blockdev-add", new JsonObject { ["driver"] = "qcow2", ["node-name"] = name, ["file"] = "f", ["read-only"] = readOnly });
                        log.Add($"{name}: ok");
                    }
                    catch (QmpException e)
                    {
                        log.Add($"{name}: {e.ErrorClass}: {e.Message}");
                    }
                }
            }
            // On the command line too.
            string[] args = ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=q1,file=f", "--blockdev", "driver=qcow2,node-name=q2,file=f"];
            var start = kind == "qsd" ? Tools.Run("qemu-storage-daemon", args) : Tools.StrataCmd(["daemon", .. args]);
            log.Add($"command line: exit {start.Exit}: {start.Stderr.Trim().Replace("qemu-storage-daemon:", "DAEMON:").Replace("strata daemon:", "DAEMON:")}");
            answers.Add(string.Join("\n", log));
        }
        Assert.True(answers[0] == answers[1], $"qemu-storage-daemon:\n{answers[0]}\nstrata daemon:\n{answers[1]}");
        Assert.Contains("w2: GenericError: Permission conflict on node 'f'", answers[0]);
    }

    [Fact]
    public async Task QuitAnswersOnceTheImagesAreClosedAndUnlocked()
    {
        Images();
        using var daemon = new Daemon("strata", Dir, ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=n,file=f"]);
        await using var qmp = await daemon.ConnectAsync();
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "n", name = "b", persistent = true });
        Assert.NotEqual("", LockBytes(P("base.qcow2")));
        await qmp.ExecuteAsync("quit");
        // At once, without waiting for the process to end: the image is free and its bitmap stored.
        var info = Tools.Run("qemu-img", "info", "--output=json", P("base.qcow2"));
        Assert.True(info.Exit == 0, info.Stderr);
        Assert.Contains("\"name\": \"b\"", info.Stdout);
        Tools.QemuImg("check", P("base.qcow2")).Ok();
    }

    [Fact]
    public async Task DeletingTheFormatNodeGivesUpItsLocks()
    {
        Images();
        using var daemon = new Daemon("strata", Dir, ["--blockdev", $"driver=file,node-name=f,filename={P("base.qcow2")}", "--blockdev", "driver=qcow2,node-name=n,file=f"]);
        await using var qmp = await daemon.ConnectAsync();
        await qmp.ExecuteAsync("blockdev-del", JsonNode.Parse("""{"node-name":"n"}"""));
        Assert.Equal("", LockBytes(P("base.qcow2")));
        Assert.Equal(0, Tools.Run("qemu-img", "info", P("base.qcow2")).Exit);
    }
}
