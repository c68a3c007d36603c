namespace Strata.Cli;

/// <summary>
/// The name Strata answers under. Reached through a link named <c>qemu-img</c>, <c>qemu-io</c> or
/// <c>qemu-storage-daemon</c>, <c>strata</c> is that tool: no subcommand word on the command line and messages
/// prefixed with the tool's own name, so scripts (and QEMU's own test suite, which filters on those prefixes) run
/// unchanged. Held per call (an async-local) because tests run several command lines in one process at once.
/// </summary>
internal static class ToolFace
{
    private static readonly AsyncLocal<bool> s_asQemu = new();

    /// <summary>The subcommand a link name stands for, or null when the name is not one of QEMU's tools.</summary>
    public static string? SubcommandFor(string invokedName) => Path.GetFileName(invokedName) switch
    {
        "qemu-img" => "img",
        "qemu-io" => "io",
        "qemu-storage-daemon" => "daemon",
        _ => null,
    };

    /// <summary>Whether this call runs as one of QEMU's tools (set once, at the start of the call).</summary>
    public static bool AsQemu
    {
        get => s_asQemu.Value;
        set => s_asQemu.Value = value;
    }

    public static string Img => AsQemu ? "qemu-img" : "strata img";
    public static string Io => AsQemu ? "qemu-io" : "strata io";
    public static string Daemon => AsQemu ? "qemu-storage-daemon" : "strata daemon";

    /// <summary>argv[0] as the process was started (a link's own name, not the file it points to). .NET's own
    /// argument list starts at the managed entry point, so the kernel's copy is read.</summary>
    public static string? InvokedName()
    {
        try
        {
            var cmdline = File.ReadAllBytes("/proc/self/cmdline");
            int end = Array.IndexOf(cmdline, (byte)0);
            return end <= 0 ? null : System.Text.Encoding.UTF8.GetString(cmdline, 0, end);
        }
        catch (IOException)
        {
            return null;
        }
        catch (UnauthorizedAccessException)
        {
            return null;
        }
    }
}
