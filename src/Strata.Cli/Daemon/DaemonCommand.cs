using System.Diagnostics;
using Strata.Block;
using Strata.Daemon;

namespace Strata.Cli.Daemon;

/// <summary>
/// `strata daemon`: qemu-storage-daemon's command line. It is parsed by hand rather than by System.CommandLine
/// because its options follow getopt_long and QEMU's key=value syntax exactly.
/// </summary>
internal static class DaemonCommand
{
    private static string Prog => ToolFace.Daemon;
    private const string ReadyLine = "strata-daemon-ready";

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        DaemonOptions options;
        try
        {
            options = DaemonCommandLine.Parse(args);
        }
        catch (Exception e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return 1;
        }
        if (options.Help)
        {
            stdout.Write(Usage);
            return 0;
        }
        if (options.Version)
        {
            stdout.WriteLine($"{Prog} version {typeof(DaemonCommand).Assembly.GetName().Version?.ToString(3)} (qemu-storage-daemon 7.2 compatible)");
            return 0;
        }
        if (options.Daemonize && Environment.GetEnvironmentVariable("STRATA_DAEMONIZED") is null)
            return Daemonize(args, stderr);

        var host = new DaemonHost(options, stderr);
        try
        {
            host.Start();
        }
        catch (Exception e)
        {
            // As qemu-storage-daemon: one line naming the option, exit 1 — whatever the failure was.
            stderr.WriteLine($"{Prog}: {e.Message}");
            Close(host, stderr);
            return 1;
        }
        if (Environment.GetEnvironmentVariable("STRATA_DAEMONIZED") is not null)
        {
            Console.Out.WriteLine(ReadyLine);
            Console.Out.Flush();
        }
        host.RunAsync().Wait();
        return Close(host, stderr) ? 0 : 1;
    }

    /// <summary>Closes every node (persistent bitmaps are stored then); a failure is reported, not thrown.</summary>
    private static bool Close(DaemonHost host, TextWriter stderr)
    {
        try
        {
            host.DisposeAsync().AsTask().GetAwaiter().GetResult();
            return true;
        }
        catch (Exception e)
        {
            stderr.WriteLine($"{Prog}: closing: {e.Message}");
            return false;
        }
    }

    /// <summary>--daemonize: start a copy of ourselves in the background and exit once it is up.</summary>
    private static int Daemonize(string[] args, TextWriter stderr)
    {
        var psi = new ProcessStartInfo(Environment.ProcessPath!) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        // Under `dotnet strata.dll` the host needs the entry assembly again; the apphost (`strata`, or a link to it)
        // does not, and .NET lists strata.dll as argument 0 either way.
        string? entry = Environment.GetCommandLineArgs().FirstOrDefault();
        if (Path.GetFileNameWithoutExtension(Environment.ProcessPath) == "dotnet" && entry is not null && entry.EndsWith(".dll", StringComparison.Ordinal))
            psi.ArgumentList.Add(entry);
        if (!ToolFace.AsQemu) psi.ArgumentList.Add("daemon");
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["STRATA_DAEMONIZED"] = "1";
        if (ToolFace.AsQemu) psi.Environment["STRATA_FACE"] = "qemu-storage-daemon"; // the child speaks as its parent
        using var child = Process.Start(psi)!;
        string? line = child.StandardOutput.ReadLine();
        if (line != ReadyLine)
        {
            child.WaitForExit(5000);
            stderr.Write(child.StandardError.ReadToEnd());
            return 1;
        }
        return 0;
    }

    private const string Usage = """
        Usage: strata daemon [options]
        Strata storage daemon (qemu-storage-daemon compatible)

          -h, --help             display this help and exit
          -V, --version          output version information and exit

          --blockdev [driver=]<driver>[,node-name=<N>][,read-only=on|off]
                     [,driver specific parameters...]   (file, qcow2, raw, null-co; or JSON)
                                 configure a block node
          --chardev socket,id=<id>,path=<path>|host=<host>,port=<port>,server=on,wait=off
                                 configure a QMP socket
          --monitor [chardev=]<id>
                                 serve QMP on the chardev
          --daemonize            run in the background once started
          --object <properties>  accepted for compatibility (iothread, …) and ignored
          --pidfile <path>       write the process ID to a file while running
          --crash-safe-bitmaps on|off
                                 keep persistent bitmaps of qcow2 nodes usable after a crash
                                 (a write-intent record; default on; per node: crash-safe-bitmaps=)

        """;
}
