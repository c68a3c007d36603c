namespace Strata.Backup;

/// <summary>Where the tool asks a daemon to listen for a run's NBD connections.</summary>
public static class SocketPaths
{
    /// <summary>sun_path holds 108 bytes: a unix socket path longer than that cannot be bound.</summary>
    private const int MaxUnixPath = 100;

    /// <summary><paramref name="preferred"/> (beside the repository or image, so that the daemon's user can reach it)
    /// when it fits in a socket address, otherwise a short one in the temporary folder.</summary>
    public static string ForRun(string preferred, string tag)
    {
        string full = Path.GetFullPath(preferred);
        if (System.Text.Encoding.UTF8.GetByteCount(full) <= MaxUnixPath) return full;
        return Path.Combine(Path.GetTempPath(), $"strata-{tag}-{Environment.ProcessId}.sock");
    }
}
