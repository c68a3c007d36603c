using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup` end to end, against `strata daemon` and qemu-storage-daemon: chains of two disks taken at one
/// point in time, every point restored and compared with a copy of the disk taken at that point, and the files
/// judged by qemu-img.
/// </summary>
public class BackupManagerTests : ScratchDirTest
{
    private string Repo => P("repo");

    private static JsonElement[] Run(BackupSourceProcess src, string repo, string mode, params string[] more)
    {
        var args = new List<string> { "backup", "run", "--socket", src.QmpPath, "--mode", mode, "--json" };
        if (mode == "pull") args.AddRange(["--nbd", src.NbdPath]);
        args.AddRange(more);
        args.Add(repo);
        return Tools.StrataCmd([.. args]).Ok().Json().EnumerateArray().ToArray();
    }

    /// <summary>A source of one disk vda (of <paramref name="kind"/>), a repository, and a full push of vda in it.</summary>
    private BackupSourceProcess SourceWithAFull(string kind, string size = "32M")
    {
        var src = new BackupSourceProcess(kind, Dir, ["vda"], size);
        try
        {
            Tools.StrataCmd("backup", "init", Repo).Ok();
            Run(src, Repo, "push", "--disk", "vda");
            return src;
        }
        catch
        {
            src.Dispose(); // no source left running behind a failed set-up
            throw;
        }
    }

    private void AssertRestores(string disk, string id, string copy) => Infra.RepositoryAsserts.AssertRestores(Repo, disk, id, copy);

    /// <summary>No leftovers, every file clean by qemu-img check, and strata's own verify content.</summary>
    private void AssertRepositorySound()
    {
        AssertEveryFileCheckedClean();
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    private void AssertEveryFileCheckedClean()
    {
        foreach (var f in Directory.EnumerateFiles(Repo, "*", SearchOption.AllDirectories))
        {
            Assert.False(f.EndsWith(".partial") || Path.GetFileName(f).StartsWith(".fleece-"), $"leftover {f}");
            if (f.EndsWith(".qcow2")) Tools.AssertQemuCheckClean(f);
        }
    }

    [Theory]
    [InlineData("strata", "push")]
    [InlineData("strata", "pull")]
    [InlineData("qsd", "push")]
    [InlineData("qsd", "pull")]
    public async Task FullAndThreeIncrementalsOfTwoDisksRestoreEveryPoint(string kind, string mode)
    {
        string[] disks = ["vda", "vdb"];
        using var src = new BackupSourceProcess(kind, Dir, disks);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var points = new List<string>();
        for (int round = 0; round < 4; round++)
        {
            if (round > 0)
                foreach (var (d, i) in disks.Select((d, i) => (d, i))) await src.GuestWritesAsync(d, seed: round * 10 + i);
            foreach (var d in disks) await src.CopyAsync(d, P($"{d}-{round}.raw"));
            var made = Run(src, Repo, mode, "--disk", "vda", "--disk", "vdb");
            Assert.Equal(2, made.Length);
            Assert.Equal(made[0].GetProperty("id").GetString(), made[1].GetProperty("id").GetString());
            foreach (var m in made)
            {
                Assert.Equal(round == 0 ? "full" : "inc", m.GetProperty("level").GetString());
                // An incremental copies what the guest wrote (24 blocks of 64 KiB), not the disk.
                if (round > 0) Assert.InRange(m.GetProperty("copied-bytes").GetInt64(), 1, 2L << 20);
            }
            points.Add(made[0].GetProperty("id").GetString()!);
        }
        for (int round = 0; round < 4; round++)
            foreach (var d in disks) AssertRestores(d, points[round], P($"{d}-{round}.raw"));
        AssertEveryFileCheckedClean();
        // The chain is plain qcow2: qemu-img reads the newest file, backing files and all.
        Tools.QemuImg("convert", "-O", "raw", Path.Combine(Repo, "vda", points[3] + ".qcow2"), P("by-qemu.raw")).Ok();
        Assert.True(File.ReadAllBytes(P("by-qemu.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("vda-3.raw"))));
        var chain = Tools.QemuImg("info", "--backing-chain", "--output=json", Path.Combine(Repo, "vdb", points[3] + ".qcow2")).Ok().Json();
        Assert.Equal(4, chain.GetArrayLength());
        Tools.StrataCmd("backup", "verify", Repo).Ok();
        var list = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json();
        Assert.Equal(8, list.GetArrayLength());
    }

    [Fact]
    public async Task VerifyFindsFlippedBytesMissingFilesAndWrongChainLinks()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var ids = new List<string>();
        for (int round = 0; round < 3; round++)
        {
            if (round > 0) await src.GuestWritesAsync("vda", round);
            ids.Add(Run(src, Repo, "push", "--disk", "vda")[0].GetProperty("id").GetString()!);
        }
        string F(int i) => Path.Combine(Repo, "vda", ids[i] + ".qcow2");
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        void Damaged(string expect)
        {
            var r = Tools.StrataCmd("backup", "verify", Repo);
            Assert.True(r.Exit == 1, r.ToString());
            Assert.Contains(expect, r.Stdout);
        }
        void Flip(string file, long offset)
        {
            using var fs = new FileStream(file, FileMode.Open, FileAccess.ReadWrite);
            fs.Position = offset;
            int b = fs.ReadByte();
            fs.Position = offset;
            fs.WriteByte((byte)(b ^ 0x40));
        }

        // A flipped byte in a data cluster of the first incremental: the file digest and the extent say so.
        var map = Tools.QemuImg("map", "--output=json", F(1)).Ok().Json().EnumerateArray()
            .First(e => e.GetProperty("data").GetBoolean() && e.GetProperty("depth").GetInt32() == 0);
        long host = map.GetProperty("offset").GetInt64() + 100;
        Flip(F(1), host);
        Damaged($"vda@{ids[1]}: {ids[1]}.qcow2 does not match its digest");
        Damaged("differs from the manifest");
        Flip(F(1), host);
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        // A flipped byte where no metadata or data lives (the header cluster's slack) is still caught.
        Flip(F(0), 4000);
        Damaged($"vda@{ids[0]}: {ids[0]}.qcow2 does not match its digest");
        Flip(F(0), 4000);

        // A missing link.
        File.Move(F(1), P("aside.qcow2"));
        Damaged($"the backup file {ids[1]}.qcow2 is missing");
        File.Move(P("aside.qcow2"), F(1));
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        // A reordered link: the newest point now skips the middle one.
        Tools.QemuImg("rebase", "-u", "-b", ids[0] + ".qcow2", "-F", "qcow2", F(2)).Ok();
        Damaged("the chain link is wrong");
        Tools.QemuImg("rebase", "-u", "-b", ids[1] + ".qcow2", "-F", "qcow2", F(2)).Ok();
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        // A point removed with its manifest: its successor's parent is gone.
        File.Move(F(1), P("aside.qcow2"));
        File.Move(Path.Combine(Repo, "vda", ids[1] + ".json"), P("aside.json"));
        Damaged($"its parent point {ids[1]} is missing");
        var restore = Tools.StrataCmd("backup", "restore", "--disk", "vda", "--to", P("x.raw"), Repo);
        Assert.Equal(1, restore.Exit);
        Assert.Contains("broken", restore.Stderr);
        Assert.False(File.Exists(P("x.raw")));
    }

    [Fact]
    public async Task PruneMergesRemovedPointsIntoTheirSuccessorsAndEveryRemainingPointStillRestores()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var ids = new List<string>();
        for (int round = 0; round < 5; round++)
        {
            if (round > 0) await src.GuestWritesAsync("vda", round);
            await src.CopyAsync("vda", P($"copy-{round}.raw"));
            ids.Add(Run(src, Repo, round % 2 == 0 ? "push" : "pull", "--disk", "vda")[0].GetProperty("id").GetString()!);
        }
        var dry = Tools.StrataCmd("backup", "prune", "--keep-last", "2", "--dry-run", Repo).Ok();
        Assert.Contains("would remove 3 point(s)", dry.Stdout);
        Assert.Equal(5, Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().GetArrayLength());

        var pruned = Tools.StrataCmd("backup", "prune", "--keep-last", "2", Repo).Ok();
        Assert.Contains("removed 3 point(s)", pruned.Stdout);
        var left = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().ToArray();
        Assert.Equal([ids[3], ids[4]], left.Select(p => p.GetProperty("id").GetString()));
        Assert.Equal("full", left[0].GetProperty("level").GetString());
        Assert.False(left[0].TryGetProperty("parent", out _));
        Assert.Equal(ids[3], left[1].GetProperty("parent").GetString());
        AssertRestores("vda", ids[3], P("copy-3.raw"));
        AssertRestores("vda", ids[4], P("copy-4.raw"));
        AssertRepositorySound();
        Assert.Equal(2, Tools.QemuImg("info", "--backing-chain", "--output=json", Path.Combine(Repo, "vda", ids[4] + ".qcow2")).Ok().Json().GetArrayLength());

        // The chain goes on from the kept head: the source's bitmap still matches it.
        await src.GuestWritesAsync("vda", 99);
        await src.CopyAsync("vda", P("copy-5.raw"));
        var next = Run(src, Repo, "push", "--disk", "vda")[0];
        Assert.Equal("inc", next.GetProperty("level").GetString());
        AssertRestores("vda", next.GetProperty("id").GetString()!, P("copy-5.raw"));
        // Pruning to one point leaves a single full.
        Tools.StrataCmd("backup", "prune", "--keep-last", "1", Repo).Ok();
        var one = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().Single();
        Assert.Equal("full", one.GetProperty("level").GetString());
        AssertRestores("vda", one.GetProperty("id").GetString()!, P("copy-5.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    /// <summary>`strata backup` as its own process, for tests that kill it.</summary>
    private static Process StartTool(params string[] args)
    {
        var psi = Tools.StrataStartInfo("backup");
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi)!;
    }

    /// <summary>Waits until the run has a partial backup file of at least <paramref name="bytes"/> (or has ended).</summary>
    private void WaitForPartial(Process tool, long bytes)
    {
        var sw = Stopwatch.StartNew();
        while (!tool.HasExited && sw.ElapsedMilliseconds < 30000)
        {
            var partial = Directory.Exists(Path.Combine(Repo, "vda")) ? Directory.EnumerateFiles(Path.Combine(Repo, "vda"), "*.partial").FirstOrDefault() : null;
            if (partial is not null && new FileInfo(partial).Length >= bytes) return;
            Thread.Sleep(2);
        }
    }

    [Theory]
    [InlineData("push")]
    [InlineData("pull")]
    public async Task KillingTheToolMidBackupLeavesTheRepositoryValidAndTheNextRunCorrect(string mode)
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"], size: "512M");
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var full = Run(src, Repo, mode, "--disk", "vda")[0];
        // Enough new data that the incremental takes a while.
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x5c 0 384M", $"nbd+unix:///vda?socket={src.NbdPath}").Exit);
        var args = new List<string> { "run", "--socket", src.QmpPath, "--disk", "vda", "--mode", mode };
        if (mode == "pull") args.AddRange(["--nbd", src.NbdPath]);
        using (var tool = StartTool([.. args, Repo]))
        {
            WaitForPartial(tool, 1 << 20);
            if (!tool.HasExited) tool.Kill();
            tool.WaitForExit();
        }
        // The interrupted run committed nothing.
        Assert.Single(Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray());
        Tools.StrataCmd("backup", "verify", Repo).Ok();

        await src.GuestWritesAsync("vda", 5);
        await src.CopyAsync("vda", P("now.raw"));
        var next = Tools.StrataCmd([.. args.Prepend("backup"), "--json", Repo]).Ok();
        var made = next.Json()[0];
        // The bitmaps left behind were folded into the head's: an incremental, and a complete one.
        Assert.Equal("inc", made.GetProperty("level").GetString());
        AssertRestores("vda", made.GetProperty("id").GetString()!, P("now.raw"));
        AssertRepositorySound();
        Assert.NotNull(full.GetProperty("id").GetString());
    }

    /// <summary>A run that finds a job of a killed run still copying cancels it, and then waits for its own job, not
    /// for the old job's end under the same id (the event stays in the list a wait reads: the next run failed with
    /// "vda: cancelled" whenever the killed run's job outlived it).</summary>
    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task AJobLeftRunningIsCancelledAndItsEndIsNotTakenForTheNewJobs(string kind)
    {
        using var src = SourceWithAFull(kind);
        await src.GuestWritesAsync("vda", 3);
        await src.CopyAsync("vda", P("now.raw"));
        // What a killed run leaves behind: its job, still copying (held to 64 KiB/s).
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
        {
            await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("""{"driver":"null-co","node-name":"left","size":33554432}"""));
            await qmp.ExecuteAsync("blockdev-backup", JsonNode.Parse("""{"job-id":"strata-job-vda","device":"vda","target":"left","sync":"full","speed":65536}"""));
        }
        var made = Run(src, Repo, "push", "--disk", "vda").Single();
        Assert.Equal("inc", made.GetProperty("level").GetString());
        AssertRestores("vda", made.GetProperty("id").GetString()!, P("now.raw"));
    }

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task KillingTheSourceMidBackupFallsBackToADifferentialThatIsCorrect(string kind)
    {
        using var src = SourceWithAFull(kind, size: "512M");
        Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x5d 0 384M", $"nbd+unix:///vda?socket={src.NbdPath}").Exit);
        int exit;
        using (var tool = StartTool("run", "--socket", src.QmpPath, "--disk", "vda", Repo))
        {
            WaitForPartial(tool, 1 << 20);
            src.Kill();
            Assert.True(tool.WaitForExit(30000));
            exit = tool.ExitCode;
        }
        src.Start();
        await src.CopyAsync("vda", P("now.raw"));
        // Pull, through the source's own NBD server: the run has to read the disk.
        var made = Run(src, Repo, "pull", "--disk", "vda")[0];
        Assert.Equal(4, exit);
        Assert.Equal("inc", made.GetProperty("level").GetString());
        Assert.Equal(384L << 20, made.GetProperty("copied-bytes").GetInt64());
        if (kind == "qsd")
        {
            // A killed qemu-storage-daemon never stored the run's new persistent bitmap (QEMU stores them on close),
            // and the old one is gone or marked in use: the disk is compared with the last point, and the run says so.
            Assert.Matches("differential by comparison because bitmap .* is (missing|inconsistent)", made.GetProperty("note").GetString());
        }
        else
        {
            // strata daemon tracks crash-safely: the last point's bitmap survived the kill and drives a plain
            // incremental of exactly what was written.
            Assert.False(made.TryGetProperty("note", out var note) && note.GetString()!.Contains("differential"), note.ToString());
        }
        AssertRestores("vda", made.GetProperty("id").GetString()!, P("now.raw"));
        AssertRepositorySound();
    }

    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public async Task AFailingTargetCommitsNothingAndKeepsTheBitmapForTheNextRun(string kind)
    {
        using var src = SourceWithAFull(kind);
        await src.GuestWritesAsync("vda", 7);
        var failed = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--x-inject-target-errno", "5", Repo);
        Assert.Equal(1, failed.Exit);
        Assert.Contains("backup failed", failed.Stderr);
        Assert.Contains("hint:", failed.Stderr);
        Assert.Single(Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray());
        AssertEveryFileCheckedClean();

        await src.GuestWritesAsync("vda", 8);
        await src.CopyAsync("vda", P("now.raw"));
        var made = Run(src, Repo, "push", "--disk", "vda")[0];
        Assert.Equal("inc", made.GetProperty("level").GetString());
        AssertRestores("vda", made.GetProperty("id").GetString()!, P("now.raw"));
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    [Fact]
    public async Task ServeExportsAPointReadOnlyToQemuTools()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        await src.CopyAsync("vda", P("p0.raw"));
        string id = Run(src, Repo, "push", "--disk", "vda")[0].GetProperty("id").GetString()!;
        await src.GuestWritesAsync("vda", 3);
        Run(src, Repo, "pull", "--disk", "vda");
        string sock = P("serve.sock");
        using var serve = StartTool("serve", "--at", id, "--disk", "vda", "--socket", sock, Repo);
        try
        {
            string line = serve.StandardOutput.ReadLine() ?? serve.StandardError.ReadToEnd();
            Assert.Contains($"serving vda@{id}", line);
            string uri = $"nbd+unix:///vda?socket={sock}";
            Tools.AssertQemuIdentical(uri, P("p0.raw"), "-f", "raw", "-F", "raw");
            Assert.Equal(0, Tools.Run("nbdcopy", uri, P("copied.raw")).Exit);
            Assert.True(File.ReadAllBytes(P("copied.raw")).AsSpan().SequenceEqual(File.ReadAllBytes(P("p0.raw"))));
            var info = Tools.Run("nbdinfo", "--json", uri);
            Assert.Equal(0, info.Exit);
            Assert.Contains("\"is_read_only\": true", info.Stdout);
            var write = Tools.Run("qemu-io", "-f", "raw", "-c", "write 0 4k", uri);
            Assert.True(write.Exit != 0 || write.Stderr.Length > 0 || write.Stdout.Contains("failed"), "a served point must not be writable");
        }
        finally
        {
            serve.Kill();
            serve.WaitForExit();
        }
    }

    [Fact]
    public void ASourceOverTcpWithoutAnNbdServerGetsOneForThePull()
    {
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("d.qcow2"), "16M").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x21 1M 3M", P("d.qcow2")).Exit);
        var probe = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        probe.Start();
        int port = ((System.Net.IPEndPoint)probe.LocalEndpoint).Port;
        probe.Stop();
        using var d = new StrataDaemonProcess(Dir, "t", [
            "--blockdev", $"driver=file,node-name=d-file,filename={P("d.qcow2")}", "--blockdev", "driver=qcow2,node-name=d,file=d-file",
            "--chardev", $"socket,id=tcp0,host=127.0.0.1,port={port},server=on,wait=off", "--monitor", "chardev=tcp0"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        var r = Tools.StrataCmd("backup", "run", "--socket", $"127.0.0.1:{port}", "--disk", "d", "--mode", "pull", "--json", Repo).Ok();
        string id = r.Json()[0].GetProperty("id").GetString()!;
        Assert.False(Directory.EnumerateFiles(Repo, "*.sock").Any(), "the run's own NBD socket is removed");
        // A second pull (incremental) starts the server again: the first one was stopped.
        var inc = Tools.StrataCmd("backup", "run", "--socket", $"127.0.0.1:{port}", "--disk", "d", "--mode", "pull", "--json", Repo).Ok();
        Assert.Equal("inc", inc.Json()[0].GetProperty("level").GetString());
        // The daemon still has the disk open (and locked): read it as qemu-img reads a live image, with -U.
        Tools.QemuImg("convert", "-U", "-O", "raw", P("d.qcow2"), P("d.raw")).Ok();
        AssertRestores("d", id, P("d.raw"));
    }

    [Fact]
    public void ARunWhileAnotherClientHoldsTheMonitorGivesUpInsteadOfWaitingForGood()
    {
        // qemu-storage-daemon serves one QMP client per monitor and leaves the next one queued without a greeting.
        using var src = new BackupSourceProcess("qsd", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        using (var holder = new System.Net.Sockets.Socket(System.Net.Sockets.AddressFamily.Unix, System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Unspecified))
        {
            holder.ReceiveTimeout = 20_000;
            holder.Connect(new System.Net.Sockets.UnixDomainSocketEndPoint(src.QmpPath));
            Assert.True(holder.Receive(new byte[4096]) > 0, "the holder got no greeting");
            var refused = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", Repo);
            Assert.Equal(4, refused.Exit);
            Assert.Contains($"QMP at '{src.QmpPath}' accepted the connection but sent no greeting within 10 s", refused.Stderr);
            Assert.Contains("another client may be connected to its monitor", refused.Stderr);
        }
        // Nothing was left behind: with the monitor free, the same run takes the first full of the chain.
        var ok = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--json", Repo).Ok();
        Assert.Equal("full", ok.Json()[0].GetProperty("level").GetString());
        Assert.Single(Directory.GetFiles(Path.Combine(Repo, "vda"), "*.qcow2"));
    }

    [Fact]
    public async Task BadRequestsGetAMessageAndTheDocumentedExitCode()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        var notRepo = Tools.StrataCmd("backup", "list", P("nowhere"));
        Assert.Equal(2, notRepo.Exit);
        Assert.Contains("strata backup init", notRepo.Stderr);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        Assert.Equal(2, Tools.StrataCmd("backup", "init", Repo).Exit);
        var noSource = Tools.StrataCmd("backup", "run", "--socket", P("no.sock"), "--disk", "vda", Repo);
        Assert.Equal(4, noSource.Exit);
        Assert.Contains("cannot reach QMP", noSource.Stderr);
        var noDisk = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "nope", Repo);
        Assert.Equal(2, noDisk.Exit);
        Assert.Contains("no node 'nope'", noDisk.Stderr);
        var noChain = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--level", "inc", Repo);
        Assert.Equal(1, noChain.Exit);
        Assert.Contains("--level full", noChain.Stderr);
        var badLevel = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--level", "sometimes", Repo);
        Assert.NotEqual(0, badLevel.Exit);
        Run(src, Repo, "push", "--disk", "vda");
        File.WriteAllText(P("exists.raw"), "x");
        Assert.Equal(2, Tools.StrataCmd("backup", "restore", "--disk", "vda", "--to", P("exists.raw"), Repo).Exit);
        Assert.Equal(2, Tools.StrataCmd("backup", "restore", "--disk", "vdz", "--to", P("new.raw"), Repo).Exit);
        Assert.Equal(2, Tools.StrataCmd("backup", "restore", "--disk", "vda", "--at", "1999-01-01T00:00:00Z", "--to", P("new.raw"), Repo).Exit);
        // Two runs never write one repository at once.
        using (Strata.Backup.Repository.Open(Repo).Lock())
        {
            var locked = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", Repo);
            Assert.Equal(3, locked.Exit);
            Assert.Contains("locked", locked.Stderr);
            Assert.Equal(3, Tools.StrataCmd("backup", "verify", Repo).Exit);
        }
        foreach (var r in new[] { notRepo, noSource, noDisk, noChain, badLevel })
            Assert.False(Tools.LooksLikeCrash(r.Stderr), r.ToString());
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    /// <summary>The run fsyncs the point's file itself, before the manifest that names it is renamed into place (it is
    /// written and fsynced meanwhile, under its temporary name): a push target is added with cache.no-flush (the source
    /// writes its metadata at blockdev-del but does not fsync), and a pull writes without flushing. Seen with strace on
    /// the real binary: one file per thread, each call timed, so the fsync's end on one thread is compared with the
    /// manifest's rename on another. The push incremental's target is the one made before the plan (see
    /// AnEarlyTargetThePlanDoesNotTakeLeavesNothingBehind).</summary>
    [Theory]
    [InlineData("qsd", "push", false)]
    [InlineData("qsd", "push", true)]
    [InlineData("strata", "pull", false)]
    public void ARunFsyncsThePointsFileBeforeRenamingItsManifest(string kind, string mode, bool incremental)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["vda"]);
        Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 3M", $"nbd+unix:///vda?socket={src.NbdPath}").Ok();
        Tools.StrataCmd("backup", "init", Repo).Ok();
        string dir = Path.Combine(Repo, "vda");
        string[] before = [];
        if (incremental)
        {
            Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--mode", mode, "--nbd", src.NbdPath, Repo).Ok();
            Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x62 8M 2M", $"nbd+unix:///vda?socket={src.NbdPath}").Ok();
            before = Directory.GetFiles(dir, "*.json");
        }
        string log = P("strace");
        var run = Tools.StrataStartInfo("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--mode", mode, "--nbd", src.NbdPath,
            "--level", incremental ? "inc" : "full", Repo);
        string[] traced = ["-ff", "-qq", "-ttt", "-T", "-o", log, "-e", "trace=fsync,fdatasync,open,openat,close,rename,renameat,renameat2", run.FileName, .. run.ArgumentList];
        Tools.Run("strace", traced).Ok();
        string id = Path.GetFileNameWithoutExtension(Directory.GetFiles(dir, "*.json").Except(before).Single());
        // "1733500000.123456 openat(AT_FDCWD, \"…\", O_RDWR|O_CLOEXEC) = 12 <0.000020>"
        var call = new System.Text.RegularExpressions.Regex(@"^(\d+\.\d+) (\w+)\((.*)\)\s+= (-?\d+).*<(\d+\.\d+)>$");
        var threads = Directory.GetFiles(Dir, "strace.*").Select(f => File.ReadAllLines(f).Select(l => call.Match(l)).Where(m => m.Success)
            .Select(m => (Start: double.Parse(m.Groups[1].Value), Name: m.Groups[2].Value, Args: m.Groups[3].Value, Result: m.Groups[4].Value,
                End: double.Parse(m.Groups[1].Value) + double.Parse(m.Groups[5].Value))).ToList()).ToList();
        double manifestRenamed = threads.SelectMany(t => t).Where(c => c.Name.StartsWith("rename") && c.Args.Contains($"\"{Path.Combine(dir, id)}.json.tmp\""))
            .Select(c => c.Start).DefaultIfEmpty(double.NaN).Min();
        Assert.False(double.IsNaN(manifestRenamed), "the manifest was never renamed into place");
        // The point's file (under its partial name then) opened for writing by this tool, then fsynced through that
        // descriptor, on any thread, before the descriptor was closed.
        string point = $"\"{Path.Combine(dir, id)}.qcow2";
        var calls = threads.SelectMany(t => t).OrderBy(c => c.Start).ToList();
        var fileSynced = calls.Where(c => c.Name.StartsWith("open") && (c.Args.Contains(point + "\"") || c.Args.Contains(point + ".partial\"")) && c.Args.Contains("O_RDWR"))
            .SelectMany(o => calls.Where(c => c.Start > o.End).TakeWhile(c => !(c.Name == "close" && c.Args == o.Result))
                .Where(c => c.Name is "fsync" or "fdatasync" && c.Args == o.Result && c.Result == "0"))
            .Select(c => c.End).ToList();
        Assert.True(fileSynced.Count > 0, $"{point}\" was never fsynced by the run");
        Assert.True(fileSynced.Min() <= manifestRenamed, $"the point's fsync ended at {fileSynced.Min():F6}, after the manifest was renamed into place at {manifestRenamed:F6}");
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    /// <summary>Over a unix socket the source shares this host's page cache: the push target is added with
    /// cache.no-flush and qemu-storage-daemon never fsyncs it (the run does). Over TCP the source may be another host
    /// on shared storage, where an fsync here proves nothing: it fsyncs the target itself, as before. Seen by tracing
    /// the daemon's own calls on the target's descriptor.</summary>
    [Fact]
    public void APushLeavesTheTargetsFsyncToTheSourceOnlyWhenTheSourceIsReachedOverTcp()
    {
        var probe = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        probe.Start();
        int port = ((System.Net.IPEndPoint)probe.LocalEndpoint).Port;
        probe.Stop();
        using var src = new BackupSourceProcess("qsd", Dir, ["vda"],
            daemonOptions: ["--chardev", $"socket,id=tcp0,host=127.0.0.1,port={port},server=on,wait=off", "--monitor", "chardev=tcp0"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        bool SourceFsyncedTheTarget(string socket)
        {
            string log = P($"qsd-strace-{Guid.NewGuid():N}");
            var psi = new ProcessStartInfo("strace") { RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in new[] { "-f", "-qq", "-p", src.Pid.ToString(), "-o", log, "-e", "trace=openat,close,fsync,fdatasync" }) psi.ArgumentList.Add(a);
            using var strace = Process.Start(psi)!;
            // Attached once every thread of the daemon names a tracer.
            var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
            while (!Directory.GetDirectories($"/proc/{src.Pid}/task").All(t => File.ReadAllLines(Path.Combine(t, "status")).Any(l => l.StartsWith("TracerPid:") && l.Split('\t')[1] != "0")))
            {
                Assert.True(DateTime.UtcNow < deadline, "strace did not attach to the daemon");
                Thread.Sleep(20);
            }
            // Something to copy (a target nothing was written to needs no flush at all).
            Tools.Run("qemu-io", "-f", "raw", "-c", $"write -P 0x{Random.Shared.Next(0x20, 0x7f):x2} 5M 1M", $"nbd+unix:///vda?socket={src.NbdPath}").Ok();
            Tools.StrataCmd("backup", "run", "--socket", socket, "--disk", "vda", Repo).Ok();
            Tools.Run("kill", "-INT", strace.Id.ToString());
            Assert.True(strace.WaitForExit(10000));
            // With -f, a call another thread interrupts is split: "PID openat(… <unfinished ...>", later
            // "PID <... openat resumed>) = FD". fsync(FD)/fdatasync(FD) count from their first half.
            var lines = File.ReadAllLines(log);
            var opened = new List<(int Line, string Fd)>();
            for (int i = 0; i < lines.Length; i++)
            {
                if (!lines[i].Contains(" openat(") || !lines[i].Contains(".qcow2.partial\"")) continue;
                string pid = lines[i].Split(' ')[0];
                string? done = lines[i].Contains("<unfinished")
                    ? lines.Skip(i + 1).FirstOrDefault(l => l.StartsWith(pid + " ") && l.Contains("<... openat resumed>"))
                    : lines[i];
                var fd = done is null ? null : System.Text.RegularExpressions.Regex.Match(done, @"= (\d+)").Groups[1].Value;
                if (!string.IsNullOrEmpty(fd)) opened.Add((i, fd));
            }
            Assert.True(opened.Count > 0, "the daemon never opened the target");
            var call = new System.Text.RegularExpressions.Regex(@"^\d+\s+(close|fsync|fdatasync)\((\d+)");
            return opened.Any(o => lines.Skip(o.Line + 1).Select(l => call.Match(l)).Where(m => m.Success)
                .TakeWhile(m => !(m.Groups[1].Value == "close" && m.Groups[2].Value == o.Fd))
                .Any(m => m.Groups[1].Value != "close" && m.Groups[2].Value == o.Fd));
        }
        Assert.False(SourceFsyncedTheTarget(src.QmpPath), "over the unix socket the daemon fsynced the target (no cache.no-flush?)");
        Assert.True(SourceFsyncedTheTarget($"127.0.0.1:{port}"), "over TCP the daemon did not fsync the target");
        Tools.StrataCmd("backup", "verify", Repo).Ok();
    }

    /// <summary>A push target is added on the source without its backing chain: the source never opens the earlier
    /// points (a chain of 30 daily points made blockdev-add open and lock 30 qcow2 files, 7 ms of every run). Shown by
    /// taking the chain's full away while an incremental is pushed: the run succeeds, and with the full back every
    /// point restores, zeroed, discarded and partly written clusters included (the guest's writes).</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task APushTargetIsAddedWithoutItsBackingChain(string kind)
    {
        using var src = SourceWithAFull(kind);
        var ids = new List<string> { Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json()[0].GetProperty("id").GetString()! };
        await src.CopyAsync("vda", P("vda-0.raw"));
        for (int round = 1; round <= 2; round++)
        {
            await src.GuestWritesAsync("vda", seed: round);
            await using (var nbd = await src.ConnectAsync("vda"))
            {
                // Besides the guest's usual writes (blocks, and zeroes over data): a discard over data, and 512 bytes
                // inside a cluster of data, whose other bytes the job must copy as they are.
                await nbd.TrimAsync((192 + round) * 65536L, 65536);
                await nbd.WriteAsync(round * 65536L + 4096, Enumerable.Repeat((byte)(0x60 + round), 512).ToArray());
                await nbd.FlushAsync();
            }
            await src.CopyAsync("vda", P($"vda-{round}.raw"));
            string full = Path.Combine(Repo, "vda", ids[0] + ".qcow2");
            // The second incremental's backing chain is inc1 -> full: without the full, opening the chain fails.
            if (round == 2) File.Move(full, full + ".away");
            try
            {
                ids.Add(Run(src, Repo, "push", "--disk", "vda", "--level", "inc").Single().GetProperty("id").GetString()!);
            }
            finally
            {
                if (round == 2) File.Move(full + ".away", full);
            }
        }
        for (int round = 0; round <= 2; round++) AssertRestores("vda", ids[round], P($"vda-{round}.raw"));
        AssertRepositorySound();
    }

    /// <summary>A push incremental's target is made and added to the source before the plan, with the last point's
    /// size and backing. A node of its name still on the source from a killed run makes that add fail; a disk that grew
    /// makes the plan want something else (no incremental with --level inc, a full with auto). Either way the run ends
    /// with no node of its own on the source and no partial file in the repository, and its point is right.</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task AnEarlyTargetThePlanDoesNotTakeLeavesNothingBehind(string kind)
    {
        using var src = SourceWithAFull(kind);
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
            await qmp.ExecuteAsync("blockdev-add", JsonNode.Parse("""{"driver":"null-co","node-name":"strata-tgt-vda","size":33554432}"""));
        await src.GuestWritesAsync("vda", 11);
        await src.CopyAsync("vda", P("vda-1.raw"));
        var inc = Run(src, Repo, "push", "--disk", "vda", "--level", "inc").Single();
        Assert.Equal("inc", inc.GetProperty("level").GetString());
        AssertRestores("vda", inc.GetProperty("id").GetString()!, P("vda-1.raw"));
        await AssertNoNodeOfTheRunAsync(src);
        AssertEveryFileCheckedClean();

        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
        {
            // The guest's export shares no resize: it goes while the disk grows (its removal may take a moment).
            await qmp.ExecuteAsync("block-export-del", JsonNode.Parse("""{"id":"guest-vda"}"""));
            for (int attempt = 0; ; attempt++)
            {
                try
                {
                    await qmp.ExecuteAsync("block_resize", JsonNode.Parse("""{"node-name":"vda","size":50331648}"""));
                    break;
                }
                catch (QmpException) when (attempt < 100)
                {
                    await Task.Delay(20);
                }
            }
            await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"guest-vda","node-name":"vda","name":"vda","writable":true}"""));
        }
        var refused = Tools.StrataCmd("backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--level", "inc", Repo);
        Assert.Equal(1, refused.Exit);
        Assert.Contains("changed size", refused.Stderr);
        await AssertNoNodeOfTheRunAsync(src);
        AssertEveryFileCheckedClean();

        await src.CopyAsync("vda", P("vda-2.raw"));
        var full = Run(src, Repo, "push", "--disk", "vda").Single();
        Assert.Equal("full", full.GetProperty("level").GetString());
        Assert.Contains("changed size", full.GetProperty("note").GetString());
        AssertRestores("vda", full.GetProperty("id").GetString()!, P("vda-2.raw"));
        await AssertNoNodeOfTheRunAsync(src);
        AssertRepositorySound();
    }

    private static async Task AssertNoNodeOfTheRunAsync(BackupSourceProcess src)
    {
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().Select(n => n!["node-name"]!.GetValue<string>()).ToList();
        Assert.DoesNotContain(nodes, n => n.StartsWith("strata-", StringComparison.Ordinal));
    }

    /// <summary>A disk of 32 KiB clusters whose first 64 KiB become a zero cluster beside a never-written one: two
    /// zero runs inside one 64 KiB copy unit. The target (opened without its backing chain) must still get the whole
    /// unit as zeros, or the chain would read the last point's data there. QEMU copies a zero run shorter than its
    /// copy unit as data; so must strata daemon.</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task ZeroRunsShorterThanTheCopyUnitReachTheTargetAsZeros(string kind)
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=32768", P("vda.qcow2"), "8M").Ok();
        Tools.Run("qemu-io", "-c", "write -P 0x11 0 32k", "-c", "write -P 0x12 1M 1M", P("vda.qcow2")).Ok();
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], createImages: false);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        string full = Run(src, Repo, "push", "--disk", "vda").Single().GetProperty("id").GetString()!;
        await using (var nbd = await src.ConnectAsync("vda"))
        {
            await nbd.WriteZeroesAsync(0, 32768);
            await nbd.FlushAsync();
        }
        await src.CopyAsync("vda", P("vda-1.raw"));
        string inc = Run(src, Repo, "push", "--disk", "vda", "--level", "inc").Single().GetProperty("id").GetString()!;
        Assert.True(File.ReadAllBytes(P("vda-1.raw")).AsSpan(0, 65536).IndexOfAnyExcept((byte)0) < 0);
        AssertRestores("vda", inc, P("vda-1.raw"));
        AssertEveryFileCheckedClean();
        Assert.NotEqual(full, inc);
    }

    /// <summary>A point is on disk when the run says it is: after its manifest is renamed into place, the run fsyncs
    /// the disk's folder (the rename itself) before it exits. Seen from outside with strace, on the real binary.</summary>
    [Fact]
    public void ARunMakesItsManifestsRenameDurableBeforeItExits()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        Tools.StrataCmd("backup", "init", Repo).Ok();
        string log = P("strace");
        var run = Tools.StrataStartInfo("backup", "run", "--socket", src.QmpPath, "--disk", "vda", Repo);
        // -ff: one file per thread, whole lines in the order that thread made the calls (with -f, threads' calls
        // interleave and split into "<unfinished ...>" halves under load). The renames and the folder's fsync are
        // one thread's.
        string[] traced = ["-ff", "-qq", "-o", log, "-e", "trace=rename,renameat,renameat2,fsync,open,openat", run.FileName, .. run.ArgumentList];
        Tools.Run("strace", traced).Ok();
        string id = Path.GetFileNameWithoutExtension(Directory.GetFiles(Path.Combine(Repo, "vda"), "*.json").Single());
        string dir = Path.Combine(Repo, "vda");
        string manifestRename = $"\"{Path.Combine(dir, id)}.json.tmp\"";
        // "call(args)   = result": the padding made one space.
        var threads = Directory.GetFiles(Dir, "strace.*")
            .Select(f => File.ReadAllLines(f).Select(l => System.Text.RegularExpressions.Regex.Replace(l, @"\s+= ", " = ")).ToList()).ToList();
        var lines = threads.SingleOrDefault(t => t.Any(l => l.StartsWith("rename") && l.Contains(manifestRename)));
        Assert.True(lines is not null, $"no thread renamed the manifest into place ({threads.Count} threads traced)");
        int renamed = lines.FindIndex(l => l.StartsWith("rename") && l.Contains(manifestRename));
        Assert.EndsWith("= 0", lines[renamed]);
        var opened = lines.Skip(renamed).Where(l => l.StartsWith("open") && l.Contains($"\"{dir}\"") && l.Contains("O_DIRECTORY"))
            .Select(l => l[(l.LastIndexOf('=') + 1)..].Trim()).ToList();
        Assert.NotEmpty(opened);
        Assert.Contains(lines.Skip(renamed), l => opened.Any(fd => l == $"fsync({fd}) = 0"));
    }
}
