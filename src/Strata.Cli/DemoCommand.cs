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
        stdout.WriteLine("== QEMU's own tools judge Strata's images");
        foreach (var (args, expect) in new (string[], int)[]
                 {
                     (["check", P("disk.qcow2")], 0),
                     (["check", P("disk-c.qcow2")], 0),
                     (["check", P("top.qcow2")], 0),
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
