using System.CommandLine;
using System.Diagnostics;

namespace Strata.Cli;

/// <summary>
/// `strata demo`: the README's first command. Creates a disk, writes to it, converts and checks it with Strata,
/// and — where QEMU's tools are installed — lets qemu-img judge the result.
/// </summary>
internal static class DemoCommand
{
    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var dir = new Option<string?>("--dir") { Description = "working folder (default: a new temporary folder)" };
        var keep = new Option<bool>("--keep") { Description = "keep the working folder" };
        var cmd = new Command("demo", "Run the end-to-end demo on built-in defaults") { dir, keep };
        cmd.SetAction(r => Run(stdout, stderr, r.GetValue(dir), r.GetValue(keep)));
        return cmd;
    }

    private static int Run(TextWriter stdout, TextWriter stderr, string? dir, bool keep)
    {
        string work = dir ?? Path.Combine(Path.GetTempPath(), "strata-demo-" + Environment.ProcessId);
        Directory.CreateDirectory(work);
        string P(string name) => Path.Combine(work, name);
        var steps = new List<(string Title, string[] Args, int Expect)>
        {
            ("create a 256 MiB qcow2 disk", ["img", "create", "-f", "qcow2", P("disk.qcow2"), "256M"], 0),
            ("write a pattern into it", ["io", "-c", "write -P 0x5a 0 64M", "-c", "write -P 0xa5 128M 1M", "-c", "write -z 16M 1M", P("disk.qcow2")], 0),
            ("inspect it", ["img", "info", P("disk.qcow2")], 0),
            ("check its metadata", ["img", "check", P("disk.qcow2")], 0),
            ("convert it to raw", ["img", "convert", "-f", "qcow2", "-O", "raw", P("disk.qcow2"), P("disk.raw")], 0),
            ("convert it to a compressed qcow2", ["img", "convert", "-c", "-O", "qcow2", P("disk.qcow2"), P("disk-c.qcow2")], 0),
            ("compare qcow2 with raw", ["img", "compare", P("disk.qcow2"), P("disk.raw")], 0),
            ("compare qcow2 with compressed qcow2", ["img", "compare", P("disk.qcow2"), P("disk-c.qcow2")], 0),
            ("start an overlay and change it", ["img", "create", "-f", "qcow2", "-b", "disk.qcow2", "-F", "qcow2", P("top.qcow2")], 0),
            ("write into the overlay", ["io", "-c", "write -P 0x77 1M 64k", P("top.qcow2")], 0),
            ("map the chain", ["img", "map", P("top.qcow2")], 0),
            ("the overlay now differs from its base", ["img", "compare", P("disk.qcow2"), P("top.qcow2")], 1),
            ("commit the overlay into its base", ["img", "commit", P("top.qcow2")], 0),
            ("the base now holds the change", ["img", "compare", P("disk.qcow2"), P("top.qcow2")], 0),
        };
        int failures = 0;
        foreach (var (title, args, expect) in steps)
        {
            stdout.WriteLine($"== {title}");
            stdout.WriteLine($"$ strata {string.Join(' ', args.Select(Quote))}");
            int rc = StrataCli.Run(args, stdout, stderr);
            if (rc != expect)
            {
                stdout.WriteLine($"!! expected exit code {expect}, got {rc}");
                failures++;
            }
        }
        failures += BackupStory(work, stdout, stderr).GetAwaiter().GetResult();
        stdout.WriteLine("== QEMU's own tools judge Strata's images");
        var chain = Strata.Backup.Repository.Open(P("backups")).Points("vm");
        var backups = chain.Select(m => Path.Combine(P("backups"), "vm", m.File)).ToArray();
        var judged = new List<(string[] Args, int Expect)>
        {
            (["check", P("disk.qcow2")], 0),
            (["check", P("disk-c.qcow2")], 0),
            (["check", P("top.qcow2")], 0),
            (["compare", P("disk-c.qcow2"), P("disk.raw")], 0),
            (["compare", P("top.qcow2"), P("disk.qcow2")], 0),
            (["compare", P("disk.qcow2"), P("disk.raw")], 1),
        };
        // The backup chain is plain qcow2: qemu-img checks each file and reads the newest as the disk.
        judged.AddRange(backups.Select(f => (new[] { "check", f }, 0)));
        if (backups.Length > 0) judged.Add((["compare", "-F", "raw", backups[^1], P("point2.raw")], 0));
        foreach (var (args, expect) in judged)
        {
            int rc = RunTool("qemu-img", args, stdout);
            if (rc == -1)
            {
                stdout.WriteLine("(qemu-img is not installed: skipping; `apt-get install qemu-utils` to see it)");
                break;
            }
            if (rc != expect)
            {
                stdout.WriteLine($"!! expected exit code {expect}, got {rc}");
                failures++;
            }
        }
        if (!keep && dir is null) Directory.Delete(work, recursive: true);
        stdout.WriteLine(failures == 0 ? "demo: all steps behaved as expected" : $"demo: {failures} step(s) did not behave as expected");
        return failures == 0 ? 0 : 1;
    }

    /// <summary>
    /// The incremental-backup story, driven by the backup manager: a daemon serves the disk over QMP and NBD, a
    /// "guest" writes through NBD, `strata backup` takes a full (push: the daemon's backup job writes it) and an
    /// incremental (pull: fleecing + NBD, only the dirty extents), then both points are restored and compared with
    /// copies of the disk taken at those moments, and the repository is verified.
    /// </summary>
    private static async Task<int> BackupStory(string work, TextWriter stdout, TextWriter stderr)
    {
        string P(string name) => Path.Combine(work, name);
        int failures = 0;
        void Check(bool ok, string what)
        {
            stdout.WriteLine(ok ? $"ok: {what}" : $"!! {what}");
            if (!ok) failures++;
        }
        int Run(params string[] args)
        {
            stdout.WriteLine($"$ strata {string.Join(' ', args.Select(Quote))}");
            return StrataCli.Run(args, stdout, stderr);
        }
        stdout.WriteLine("== the incremental backup story (strata daemon over QMP and NBD, strata backup)");
        StrataCli.Run(["img", "create", "-q", "-f", "qcow2", P("vm.qcow2"), "128M"], stdout, stderr);
        StrataCli.Run(["io", "-c", "write -q -P 0x5a 0 48M", P("vm.qcow2")], stdout, stderr);
        var options = Strata.Daemon.DaemonCommandLine.Parse([
            "--blockdev", $"driver=file,node-name=vm-file,filename={P("vm.qcow2")}",
            "--blockdev", "driver=qcow2,node-name=vm,file=vm-file",
            "--chardev", $"socket,id=qmp0,path={P("qmp.sock")},server=on,wait=off", "--monitor", "chardev=qmp0",
            "--nbd-server", $"addr.type=unix,addr.path={P("nbd.sock")}",
            "--export", "type=nbd,id=vm-export,node-name=vm,writable=on"]);
        await using var host = new Strata.Daemon.DaemonHost(options);
        host.Start();
        async Task Guest(int round)
        {
            // The "guest": writes through the NBD export, as a VM would.
            await using var nbd = await Strata.Protocol.Nbd.NbdClient.ConnectUnixAsync(P("nbd.sock"), "vm");
            var rng = new Random(round);
            var data = new byte[64 << 10];
            for (int i = 0; i < 64; i++)
            {
                rng.NextBytes(data);
                await nbd.WriteAsync(rng.Next(0, 2048) * 65536L, data);
            }
            await nbd.FlushAsync();
            stdout.WriteLine($"guest round {round}: 64 random 64 KiB writes through NBD");
        }
        async Task Snapshot(string name)
        {
            await using var nbd = await Strata.Protocol.Nbd.NbdClient.ConnectUnixAsync(P("nbd.sock"), "vm");
            var copy = new byte[nbd.Size];
            for (int pos = 0; pos < copy.Length; pos += 4 << 20)
                await nbd.ReadAsync(pos, copy.AsMemory(pos, Math.Min(4 << 20, copy.Length - pos)));
            await File.WriteAllBytesAsync(P(name), copy);
        }
        string repo = P("backups");
        Check(Run("backup", "init", repo) == 0, "a backup repository is created");
        await Guest(1);
        await Snapshot("point1.raw");
        Check(Run("backup", "run", "--socket", P("qmp.sock"), "--disk", "vm", repo) == 0, "a full backup is taken (push mode)");
        await Guest(2);
        await Snapshot("point2.raw");
        Check(Run("backup", "run", "--socket", P("qmp.sock"), "--disk", "vm", "--mode", "pull", "--nbd", P("nbd.sock"), repo) == 0,
            "an incremental backup is pulled over NBD (only the dirty extents)");
        Run("backup", "list", repo);
        var points = Strata.Backup.Repository.Open(repo).Points("vm");
        Check(points.Count == 2 && points[0].Level == "full" && points[1].Level == "inc", "the chain is a full and an incremental");
        for (int i = 0; i < points.Count; i++)
        {
            string to = P($"restored{i + 1}.raw");
            Run("backup", "restore", "--at", points[i].Id, "--disk", "vm", "--to", to, repo);
            Check(File.Exists(to) && File.ReadAllBytes(to).AsSpan().SequenceEqual(File.ReadAllBytes(P($"point{i + 1}.raw"))),
                $"point {i + 1} ({points[i].Level}) restores to the disk as it was at that backup");
        }
        if (points.Count == 2)
            Check(points[1].FileSize < points[0].FileSize / 4, $"the incremental ({points[1].FileSize >> 10} KiB) holds only the changes (full: {points[0].FileSize >> 10} KiB)");
        Check(Run("backup", "verify", repo) == 0, "verify re-reads every backup against its manifest");
        return failures;
    }

    private static string Quote(string s) => s.Contains(' ') ? $"'{s}'" : s;

    private static int RunTool(string tool, string[] args, TextWriter stdout)
    {
        stdout.WriteLine($"$ {tool} {string.Join(' ', args.Select(Quote))}");
        try
        {
            var psi = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true };
            foreach (var a in args) psi.ArgumentList.Add(a);
            using var p = Process.Start(psi)!;
            string output = p.StandardOutput.ReadToEnd() + p.StandardError.ReadToEnd();
            p.WaitForExit();
            stdout.Write(output);
            return p.ExitCode;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return -1;
        }
    }
}
