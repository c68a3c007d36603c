using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using Strata.Interop.Tests.Infra;
using Strata.Protocol.Qmp;
using Xunit.Abstractions;

namespace Strata.Interop.Tests;

/// <summary>
/// Torture: three guests write to a disk over NBD with many requests in flight and a new connection every few hundred
/// writes, while incremental backups (push and pull alternating), another export's deletion, a mirror or a migration
/// run. No guest write or handshake may fail, and at the end the newest backup point, the mirror target or the migrated
/// disk must be the disk byte for byte: compared after the daemon stopped, and against a model of what the guests wrote.
/// The backup and export cases run against qemu-storage-daemon and strata daemon alike, with the same expectations.
/// The defaults keep each case within seconds to a minute; bench/torture.sh runs them longer through STRATA_TORTURE_*.
/// </summary>
public class TortureTests(ITestOutputHelper output) : ScratchDirTest
{
    private static int Setting(string name, int fallback) =>
        int.TryParse(Environment.GetEnvironmentVariable(name), NumberStyles.Integer, CultureInfo.InvariantCulture, out int v) && v > 0 ? v : fallback;

    private static int Writers => Setting("STRATA_TORTURE_WRITERS", 3);
    /// <summary>Incremental backups taken while the guests write (a full comes first, one more after they stop).</summary>
    private static int Rounds => Setting("STRATA_TORTURE_ROUNDS", 2);
    /// <summary>How long the guests write between two steps.</summary>
    private static TimeSpan Between => TimeSpan.FromMilliseconds(Setting("STRATA_TORTURE_MS_BETWEEN", 1500));
    private static long DiskBytes => Setting("STRATA_TORTURE_DISK_MIB", 1024) * (1L << 20);

    private readonly Stopwatch _sinceStart = Stopwatch.StartNew();

    /// <summary>Where the time goes, in the test output.</summary>
    private void Mark(string what) => output.WriteLine($"{_sinceStart.Elapsed.TotalSeconds,7:F2} s  {what}");

    /// <summary>A figure for the test output and, when STRATA_TORTURE_REPORT names a file, for bench/torture.sh.</summary>
    private void Figure(string test, string name, object value)
    {
        string line = $"{test}\t{name}\t{Convert.ToString(value, CultureInfo.InvariantCulture)}";
        output.WriteLine(line);
        if (Environment.GetEnvironmentVariable("STRATA_TORTURE_REPORT") is { Length: > 0 } file)
            lock (typeof(TortureTests)) File.AppendAllText(file, line + "\n");
    }

    /// <summary>A qcow2 disk with some data and a copy of it as it is before any guest writes (the model's base).</summary>
    private static void CreateDisk(string image, string before, long size)
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", image, size.ToString(CultureInfo.InvariantCulture)).Ok();
        Tools.QemuIo(image, ["write -P 0x11 0 4M", "write -P 0x12 100M 3M", $"write -P 0x13 {size - (1 << 20)} 1M"], "qcow2");
        File.Copy(image, before);
    }

    /// <summary>qemu-img compare; null when identical, otherwise what it said.</summary>
    private static string? Differences(string a, string aFormat, string b, string bFormat)
    {
        var r = Tools.QemuImg("compare", "-f", aFormat, "-F", bFormat, a, b);
        return r.Exit == 0 && r.Stdout.Contains("Images are identical.") ? null : r.ToString();
    }

    private sealed record BackupRun(int Round, string Mode, bool UnderLoad, int Exit, string Level, string? Id, long Copied, double Seconds, string Said);

    private static async Task<BackupRun> RunBackupAsync(BackupSourceProcess src, string repo, int round, string mode, bool underLoad)
    {
        var sw = Stopwatch.StartNew();
        var args = new List<string> { "backup", "run", "--socket", src.QmpPath, "--disk", "vda", "--mode", mode, "--json" };
        if (mode == "pull") args.AddRange(["--nbd", src.NbdPath]); // the server the guests use, as a VM's backup would
        args.Add(repo);
        var r = await Task.Run(() => Tools.StrataCmd([.. args]));
        double seconds = sw.Elapsed.TotalSeconds;
        if (r.Exit != 0) return new BackupRun(round, mode, underLoad, r.Exit, "-", null, 0, seconds, r.Stderr.Trim());
        var made = r.Json()[0];
        return new BackupRun(round, mode, underLoad, 0, made.GetProperty("level").GetString()!, made.GetProperty("id").GetString(),
            made.GetProperty("copied-bytes").GetInt64(), seconds, "");
    }

    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task IncrementalBackupsTakenWhileGuestsWriteRestoreTheDiskByteForByte(string kind)
    {
        string test = $"backup/{kind}";
        string before = P("before.qcow2"), repo = P("repo");
        CreateDisk(P("vda.qcow2"), before, DiskBytes);
        Mark("disk created");
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], createImages: false);
        Mark("daemon started");
        Tools.StrataCmd("backup", "init", repo).Ok();
        var guests = new GuestWriters(() => src.NbdPath, "vda", DiskBytes, Writers, seed: 7);
        var runs = new List<BackupRun>();
        var total = Stopwatch.StartNew();
        guests.Start();
        try
        {
            await guests.WaitForConnectionsAsync(Writers, TimeSpan.FromSeconds(30));
            // A full, then incrementals; push and pull take turns, and every one starts with the guests in full flow.
            for (int round = 0; round <= Rounds; round++)
            {
                string mode = round % 2 == 0 ? "push" : "pull";
                guests.Phase = $"backup {round} ({mode})";
                runs.Add(await RunBackupAsync(src, repo, round, mode, underLoad: true));
                Mark($"backup {runs[^1]}");
                guests.Phase = $"writing after backup {round}";
                await Task.Delay(Between);
            }
        }
        finally
        {
            await guests.StopAsync();
            Mark("writers stopped");
        }
        string lastMode = (Rounds + 1) % 2 == 0 ? "push" : "pull";
        guests.Phase = "stopped";
        runs.Add(await RunBackupAsync(src, repo, Rounds + 1, lastMode, underLoad: false));
        Mark($"backup {runs[^1]}");
        double seconds = total.Elapsed.TotalSeconds;

        // The daemon stops cleanly, then its image is judged: the newest point and the model must both be it.
        await QuitAsync(src);
        Mark("daemon quit");
        string disk = P("vda.qcow2");
        string? restoreProblem = null, pointDiffers = null, diskDiffers = null;
        var restore = Tools.StrataCmd("backup", "restore", "--disk", "vda", "-O", "qcow2", "--to", P("restored.qcow2"), repo);
        if (restore.Exit != 0) restoreProblem = restore.ToString();
        else pointDiffers = Differences(P("restored.qcow2"), "qcow2", disk, "qcow2");
        Mark("restored and compared");
        if (guests.ModelIsExact)
        {
            await guests.ApplyModelToAsync(before, "qcow2");
            Mark("model applied");
            diskDiffers = Differences(before, "qcow2", disk, "qcow2");
            Mark("compared with the model");
        }

        Figure(test, "backups under load (full + incrementals)", runs.Count(r => r.UnderLoad));
        foreach (var r in runs)
            Figure(test, $"backup {r.Round} {r.Mode}{(r.UnderLoad ? " under load" : " after stop")}",
                r.Exit == 0 ? $"{r.Level} {r.Copied >> 20} MiB copied in {r.Seconds:F2} s" : $"FAILED (exit {r.Exit}) after {r.Seconds:F2} s");
        Figure(test, "guest writes completed", guests.WritesCompleted);
        Figure(test, "guest MiB written", guests.BytesWritten >> 20);
        Figure(test, "guest connections", guests.Connections);
        Figure(test, "guest writes failed", guests.FailedWrites);
        Figure(test, "guest connections failed", guests.FailedConnections);
        Figure(test, "backup runs failed", runs.Count(r => r.Exit != 0));
        Figure(test, "newest point == disk", restoreProblem is null && pointDiffers is null);
        Figure(test, "disk == model", guests.ModelIsExact ? diskDiffers is null : "not checked (writes failed)");
        Figure(test, "seconds", seconds.ToString("F1", CultureInfo.InvariantCulture));

        string context = $"\n{guests.Summary()}\nbackups:\n{string.Join("\n", runs)}\ndaemon said:\n{src.Log}";
        Assert.True(guests.Failures.Count == 0, $"guest I/O failed while backups ran ({guests.Failures.Count} connections):\n{string.Join("\n", guests.Failures.Take(20))}{context}");
        Assert.True(runs.All(r => r.Exit == 0), $"a backup failed:{context}");
        Assert.Equal("full", runs[0].Level);
        Assert.All(runs.Skip(1), r => Assert.Equal("inc", r.Level));
        Assert.True(restoreProblem is null, $"restoring the newest point failed:\n{restoreProblem}{context}");
        Assert.True(pointDiffers is null, $"the newest point is not the disk:\n{pointDiffers}{context}");
        Assert.True(diskDiffers is null, $"the disk is not what the guests wrote:\n{diskDiffers}{context}");
        // Every point of the chain is sound, and the chain is what qemu-img sees too.
        Tools.StrataCmd("backup", "verify", repo).Ok();
        Tools.AssertQemuCheckClean(disk);
        Assert.True(guests.WritesCompleted > 0);
    }

    /// <summary>Deleting an export (mode=hard, as a pull backup deletes its fleecing export) drops that export's
    /// connections only: guests writing through another export of the same server, and guests connecting meanwhile,
    /// never notice.</summary>
    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task DeletingAnotherExportLeavesTheGuestsAlone(string kind)
    {
        string test = $"export-del/{kind}";
        const long size = 256L << 20;
        string before = P("before.qcow2"), disk = P("vda.qcow2");
        CreateDisk(disk, before, size);
        Mark("disk created");
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], createImages: false);
        Mark("daemon started");
        var guests = new GuestWriters(() => src.NbdPath, "vda", size, Writers, seed: 17);
        int deletions = 0;
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
        {
            guests.Start();
            try
            {
                await guests.WaitForConnectionsAsync(Writers, TimeSpan.FromSeconds(30));
                Mark("guests writing");
                guests.Phase = "another export added and deleted";
                for (var sw = Stopwatch.StartNew(); sw.Elapsed < 2 * Between; deletions++)
                {
                    string id = $"other-{deletions}";
                    await qmp.ExecuteAsync("block-export-add", new JsonObject { ["type"] = "nbd", ["id"] = id, ["node-name"] = "vda", ["name"] = id, ["writable"] = false });
                    await Task.Delay(50);
                    await qmp.ExecuteAsync("block-export-del", new JsonObject { ["id"] = id, ["mode"] = "hard" });
                    await Task.Delay(50);
                }
            }
            finally
            {
                await guests.StopAsync();
                Mark("writers stopped");
            }
            guests.Phase = "stopped";
            await qmp.ExecuteAsync("quit");
        }
        Assert.True(src.WaitForExit(30000), $"{kind} did not quit");
        Mark("daemon quit");
        string? diskDiffers = null;
        if (guests.ModelIsExact)
        {
            await guests.ApplyModelToAsync(before, "qcow2");
            diskDiffers = Differences(before, "qcow2", disk, "qcow2");
            Mark("compared with the model");
        }

        Figure(test, "exports deleted (mode=hard)", deletions);
        Figure(test, "guest writes completed", guests.WritesCompleted);
        Figure(test, "guest connections", guests.Connections);
        Figure(test, "guest writes failed", guests.FailedWrites);
        Figure(test, "guest connections failed", guests.FailedConnections);
        Figure(test, "disk == model", guests.ModelIsExact ? diskDiffers is null : "not checked (writes failed)");

        string context = $"\n{guests.Summary()}\ndaemon said:\n{src.Log}";
        Assert.True(guests.Failures.Count == 0, $"guest I/O failed while another export was deleted {deletions} times:\n{string.Join("\n", guests.Failures.Take(20))}{context}");
        Assert.True(diskDiffers is null, $"the disk is not what the guests wrote:\n{diskDiffers}{context}");
        Assert.True(deletions > 0 && guests.WritesCompleted > 0);
    }

    private static async Task QuitAsync(BackupSourceProcess daemon)
    {
        await using (var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
            await qmp.ExecuteAsync("quit");
        Assert.True(daemon.WaitForExit(30000), $"{daemon.Kind} did not quit:\n{daemon.Log}");
    }

    /// <summary>Waits for an event, longer than <see cref="EventLog.WaitAsync"/> allows: a loaded machine copies slowly.</summary>
    private static async Task<JsonObject> WaitEventAsync(EventLog events, string name, TimeSpan timeout, string log)
    {
        var sw = Stopwatch.StartNew();
        while (sw.Elapsed < timeout)
        {
            if (events.Snapshot().FirstOrDefault(e => e["event"]!.GetValue<string>() == name) is { } hit) return hit;
            await Task.Delay(50);
        }
        throw new TimeoutException($"no {name} within {timeout.TotalSeconds} s; events: {string.Join(", ", events.Snapshot().Select(e => e["event"]))}\ndaemon said:\n{log}");
    }

    /// <summary>strata daemon only: qemu-storage-daemon 7.2 is no reference here. Under this load its mirror lost
    /// guest writes (the target read zeros where the source had the guest's data: 3 runs in 21) and its background copy
    /// did not converge after job-complete within 60 s (2 runs in 21).</summary>
    [Fact]
    public async Task AMirrorCompletedWhileGuestsWriteHasEveryWrite()
    {
        const string kind = "strata", test = "mirror/strata";
        string before = P("before.qcow2"), target = P("target.qcow2");
        CreateDisk(P("vda.qcow2"), before, DiskBytes);
        Mark("disk created");
        Tools.QemuImg("create", "-q", "-f", "qcow2", target, DiskBytes.ToString(CultureInfo.InvariantCulture)).Ok();
        using var src = new BackupSourceProcess(kind, Dir, ["vda"], createImages: false);
        Mark("daemon started");
        var guests = new GuestWriters(() => src.NbdPath, "vda", DiskBytes, Writers, seed: 11);
        var total = Stopwatch.StartNew();
        double readyAfter, completedAfter;
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
        {
            var events = new EventLog(qmp);
            await qmp.ExecuteAsync("blockdev-add", new JsonObject
            {
                ["driver"] = "qcow2", ["node-name"] = "tgt", ["file"] = new JsonObject { ["driver"] = "file", ["filename"] = target },
            });
            guests.Start();
            try
            {
                await guests.WaitForConnectionsAsync(Writers, TimeSpan.FromSeconds(30));
                guests.Phase = "mirror copying";
                var sw = Stopwatch.StartNew();
                await qmp.ExecuteAsync("blockdev-mirror", JsonNode.Parse("""{"job-id":"m","device":"vda","target":"tgt","sync":"full"}"""));
                await WaitEventAsync(events, "BLOCK_JOB_READY", TimeSpan.FromSeconds(60), src.Log);
                Mark("mirror ready");
                readyAfter = sw.Elapsed.TotalSeconds;
                guests.Phase = "mirror ready";
                await Task.Delay(Between);
                guests.Phase = "mirror completing";
                sw.Restart();
                await qmp.ExecuteAsync("job-complete", new { id = "m" });
                var completed = await WaitEventAsync(events, "BLOCK_JOB_COMPLETED", TimeSpan.FromSeconds(60), src.Log);
                completedAfter = sw.Elapsed.TotalSeconds;
                Mark("mirror completed");
                Assert.True(completed["data"]!["error"] is null, $"the mirror failed: {completed.ToJsonString()}\ndaemon said:\n{src.Log}");
                // The guests go on writing, now to the target.
                guests.Phase = "after the switch-over";
                await Task.Delay(Between);
            }
            finally
            {
                await guests.StopAsync();
                Mark("writers stopped");
            }
            guests.Phase = "stopped";
            var exports = (await qmp.ExecuteAsync("query-block-exports"))!.AsArray();
            Assert.Equal("tgt", exports.Single()!["node-name"]!.GetValue<string>());
            string? onTarget = null;
            await qmp.ExecuteAsync("quit");
            Assert.True(src.WaitForExit(30000), "the daemon did not quit");
            Mark("daemon quit");
            if (guests.ModelIsExact)
            {
                await guests.ApplyModelToAsync(before, "qcow2");
                Mark("model applied");
                onTarget = Differences(before, "qcow2", target, "qcow2");
                Mark("target compared with the model");
            }

            Figure(test, "mirror ready after s", readyAfter.ToString("F2", CultureInfo.InvariantCulture));
            Figure(test, "job-complete to COMPLETED s", completedAfter.ToString("F2", CultureInfo.InvariantCulture));
            Figure(test, "guest writes completed", guests.WritesCompleted);
            Figure(test, "guest connections", guests.Connections);
            Figure(test, "guest writes failed", guests.FailedWrites);
            Figure(test, "guest connections failed", guests.FailedConnections);
            Figure(test, "target == model", guests.ModelIsExact ? onTarget is null : "not checked (writes failed)");
            Figure(test, "seconds", total.Elapsed.TotalSeconds.ToString("F1", CultureInfo.InvariantCulture));

            string context = $"\n{guests.Summary()}\ndaemon said:\n{src.Log}";
            Assert.True(guests.Failures.Count == 0, $"guest I/O failed around the mirror:\n{string.Join("\n", guests.Failures.Take(20))}{context}");
            Assert.True(onTarget is null, $"the target image is not what the guests wrote:\n{onTarget}{context}");
            Tools.AssertQemuCheckClean(target);
        }
    }

    [Fact]
    public async Task AMigrationWhileGuestsWriteMovesEveryWrite()
    {
        const string test = "migrate/strata";
        // Smaller than the others: the bulk copy over NBD is not what is tortured here, the switch-over is.
        long size = Math.Min(DiskBytes, 256L << 20);
        string before = P("before.qcow2"), moved = P("b/vda.qcow2");
        Directory.CreateDirectory(P("a"));
        Directory.CreateDirectory(P("b"));
        CreateDisk(P("a/vda.qcow2"), before, size);
        Mark("disk created");
        using var a = new BackupSourceProcess("strata", P("a"), ["vda"], createImages: false);
        using var b = new BackupSourceProcess("strata", P("b"), [], createImages: false);
        Mark("daemon started");
        await using (var qa = await QmpClient.ConnectUnixAsync(a.QmpPath))
            await qa.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "since-before", persistent = true });
        string socket = a.NbdPath;
        var guests = new GuestWriters(() => socket, "vda", size, Writers, seed: 13);
        var total = Stopwatch.StartNew();
        ToolResult migrate;
        double migrateSeconds;
        guests.Start();
        try
        {
            await guests.WaitForConnectionsAsync(Writers, TimeSpan.FromSeconds(30));
            guests.Phase = "migrating";
            var sw = Stopwatch.StartNew();
            var migrating = Task.Run(() => Tools.StrataCmd("migrate", "--from", a.QmpPath, "--to", b.QmpPath, "--disk", "vda", "--image", moved,
                "--from-nbd", a.NbdPath, "--to-nbd", b.NbdPath));
            // A mirror is ready only at a moment when nothing is left to copy. Three writers at full speed dirty faster
            // than strata's mirror copies over NBD on this machine (435 s to ready measured), so after a burst at full
            // speed they rest between connections: the copy catches up, and the switch-over still meets writes in flight.
            await Task.WhenAny(migrating, Task.Delay(Between));
            guests.Rest = TimeSpan.FromMilliseconds(Setting("STRATA_TORTURE_MIGRATE_REST_MS", 1000));
            migrate = await migrating;
            migrateSeconds = sw.Elapsed.TotalSeconds;
            guests.Rest = TimeSpan.Zero;
            Mark("migrated");
            // New connections go to the destination; those still on the source write through it to the destination.
            socket = b.NbdPath;
            guests.Phase = "migrated";
            await Task.Delay(Between);
        }
        finally
        {
            await guests.StopAsync();
            Mark("writers stopped");
        }
        guests.Phase = "stopped";
        a.Kill(); // nothing may depend on the source any more
        JsonNode? bitmap;
        await using (var qb = await QmpClient.ConnectUnixAsync(b.QmpPath))
        {
            bitmap = (await qb.ExecuteAsync("query-named-block-nodes"))!.AsArray().FirstOrDefault(n => n!["node-name"]!.GetValue<string>() == "vda")?["dirty-bitmaps"]?
                .AsArray().FirstOrDefault(x => x!["name"]!.GetValue<string>() == "since-before");
            await qb.ExecuteAsync("quit");
        }
        Assert.True(b.WaitForExit(30000), "the destination did not quit");
        Mark("destination quit");
        string? onImage = null;
        if (guests.ModelIsExact)
        {
            await guests.ApplyModelToAsync(before, "qcow2");
            Mark("model applied");
            onImage = Differences(before, "qcow2", moved, "qcow2");
            Mark("image compared with the model");
        }

        Figure(test, "strata migrate s", migrateSeconds.ToString("F2", CultureInfo.InvariantCulture));
        Figure(test, "guest writes completed", guests.WritesCompleted);
        Figure(test, "guest connections", guests.Connections);
        Figure(test, "guest writes failed", guests.FailedWrites);
        Figure(test, "guest connections failed", guests.FailedConnections);
        Figure(test, "migrated disk == model", guests.ModelIsExact ? onImage is null : "not checked (writes failed)");
        Figure(test, "seconds", total.Elapsed.TotalSeconds.ToString("F1", CultureInfo.InvariantCulture));

        string context = $"\n{guests.Summary()}\nsource said:\n{a.Log}\ndestination said:\n{b.Log}";
        Assert.True(migrate.Exit == 0, migrate + context);
        Assert.Contains("switched over", migrate.Stdout);
        Assert.True(guests.Failures.Count == 0, $"guest I/O failed around the migration:\n{string.Join("\n", guests.Failures.Take(20))}{context}");
        Assert.True(onImage is null, $"the destination's image is not what the guests wrote:\n{onImage}{context}");
        Assert.True(bitmap is not null && bitmap["recording"]!.GetValue<bool>() && bitmap["inconsistent"]?.GetValue<bool>() != true,
            $"the bitmap did not arrive usable: {bitmap?.ToJsonString() ?? "missing"}{context}");
        Tools.AssertQemuCheckClean(moved);
    }
}
