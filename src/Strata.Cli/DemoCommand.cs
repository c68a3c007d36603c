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
        foreach (var (args, expect) in new (string[], int)[]
                 {
                     (["check", P("disk.qcow2")], 0),
                     (["check", P("disk-c.qcow2")], 0),
                     (["check", P("top.qcow2")], 0),
                     (["check", P("full.qcow2")], 0),
                     (["check", P("inc1.qcow2")], 0),
                     (["compare", P("inc1.qcow2"), P("point1.raw")], 0),
                     (["compare", P("disk-c.qcow2"), P("disk.raw")], 0),
                     (["compare", P("top.qcow2"), P("disk.qcow2")], 0),
                     (["compare", P("disk.qcow2"), P("disk.raw")], 1),
                 })
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
    /// The incremental-backup story: a daemon serves the disk over NBD, a client writes to it, a transaction adds a
    /// dirty bitmap and takes a full backup at one point in time, more writes follow, an incremental backup copies
    /// only what the bitmap recorded, and each point of the chain restores byte for byte.
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
        stdout.WriteLine("== the incremental backup story (strata daemon, QMP and NBD, in-process)");
        StrataCli.Run(["img", "create", "-q", "-f", "qcow2", P("vm.qcow2"), "128M"], stdout, stderr);
        var options = Strata.Protocol.Daemon.DaemonCommandLine.Parse([
            "--blockdev", $"driver=file,node-name=vm-file,filename={P("vm.qcow2")}",
            "--blockdev", "driver=qcow2,node-name=vm,file=vm-file",
            "--chardev", $"socket,id=qmp0,path={P("qmp.sock")},server=on,wait=off", "--monitor", "chardev=qmp0",
            "--nbd-server", $"addr.type=unix,addr.path={P("nbd.sock")}",
            "--export", "type=nbd,id=vm-export,node-name=vm,writable=on"]);
        await using var host = new Strata.Protocol.Daemon.DaemonHost(options);
        host.Start();
        await using var qmp = await Strata.Protocol.Qmp.QmpClient.ConnectUnixAsync(P("qmp.sock"));
        var events = qmp.Events().GetAsyncEnumerator();
        async Task WaitJob(string id)
        {
            using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(60));
            while (await events.MoveNextAsync().AsTask().WaitAsync(cts.Token))
                if (events.Current["event"]!.GetValue<string>() == "BLOCK_JOB_COMPLETED" && events.Current["data"]!["device"]!.GetValue<string>() == id)
                {
                    Check(events.Current["data"]!["error"] is null, $"job {id} completed");
                    return;
                }
        }
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
        void Snapshot(string name) => StrataCli.Run(["img", "convert", "-f", "qcow2", "-O", "raw", P("vm.qcow2"), P(name)], stdout, stderr);

        await Guest(1);
        host.Graph.Find("vm")!.Image.Flush();
        Snapshot("point0.raw");
        stdout.WriteLine("$ {\"execute\":\"transaction\", … block-dirty-bitmap-add bitmap0 + drive-backup sync=full …}");
        await qmp.ExecuteAsync("transaction", System.Text.Json.Nodes.JsonNode.Parse($$$"""
            {"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"vm","name":"bitmap0","persistent":true}},
                        {"type":"drive-backup","data":{"job-id":"full","device":"vm","target":"{{{P("full.qcow2")}}}","sync":"full","format":"qcow2"}}]}
            """));
        await WaitJob("full");

        await Guest(2);
        host.Graph.Find("vm")!.Image.Flush();
        Snapshot("point1.raw");
        var nodes = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        long dirty = nodes.First(n => n!["node-name"]!.GetValue<string>() == "vm")!["dirty-bitmaps"]![0]!["count"]!.GetValue<long>();
        stdout.WriteLine($"bitmap0 holds {dirty} dirty bytes since the full backup");
        StrataCli.Run(["img", "create", "-q", "-f", "qcow2", "-b", "full.qcow2", "-F", "qcow2", P("inc1.qcow2")], stdout, stderr);
        stdout.WriteLine("$ {\"execute\":\"drive-backup\", … sync=incremental bitmap=bitmap0 mode=existing …}");
        await qmp.ExecuteAsync("drive-backup", System.Text.Json.Nodes.JsonNode.Parse($$$"""
            {"job-id":"inc1","device":"vm","target":"{{{P("inc1.qcow2")}}}","sync":"incremental","bitmap":"bitmap0","mode":"existing","format":"qcow2"}
            """));
        await WaitJob("inc1");
        await qmp.ExecuteAsync("quit");

        // Restore every point of the chain and compare it with the disk as it was.
        foreach (var (image, point) in new[] { ("full.qcow2", "point0.raw"), ("inc1.qcow2", "point1.raw") })
        {
            StrataCli.Run(["img", "convert", "-f", "qcow2", "-O", "raw", P(image), P(image + ".restored")], stdout, stderr);
            int rc = StrataCli.Run(["img", "compare", "-q", "-f", "raw", "-F", "raw", P(image + ".restored"), P(point)], stdout, stderr);
            Check(rc == 0, $"restoring {image} gives the disk as it was at that backup");
        }
        long full = new FileInfo(P("full.qcow2")).Length, inc = new FileInfo(P("inc1.qcow2")).Length;
        Check(inc < full, $"the incremental ({inc >> 10} KiB) holds only the changes (full: {full >> 10} KiB)");
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
