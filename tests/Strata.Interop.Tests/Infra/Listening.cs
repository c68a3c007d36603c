namespace Strata.Interop.Tests;

/// <summary>A daemon's socket file appears at bind(), a moment before listen(): on a loaded machine a client that
/// connects in between is refused. Tests wait until the socket really listens — read from /proc/net/unix, never by
/// connecting: a probe connection is a client too, and qemu-storage-daemon's one-client QMP monitor may still be
/// busy closing it when the test's own client arrives (seen as "Connection reset by peer" on the greeting).</summary>
public static class Listening
{
    /// <summary>Waits until <paramref name="process"/> (called <paramref name="what"/> in errors) listens on every
    /// socket in <paramref name="unixSocketPaths"/>; fails at once with its stderr if it exits first.</summary>
    public static void WaitForProcess(System.Diagnostics.Process process, string what, int timeoutMs, params string[] unixSocketPaths)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (!unixSocketPaths.All(IsListening))
        {
            if (process.HasExited) throw new InvalidOperationException($"{what} exited: {process.StandardError.ReadToEnd()}");
            if (sw.ElapsedMilliseconds > timeoutMs) throw new TimeoutException($"{what} did not start");
            Thread.Sleep(10);
        }
    }

    public static void WaitFor(string unixSocketPath, int timeoutMs = 15000)
    {
        var deadline = DateTime.UtcNow.AddMilliseconds(timeoutMs);
        while (!IsListening(unixSocketPath))
        {
            if (DateTime.UtcNow > deadline) throw new TimeoutException($"nothing listens on {unixSocketPath}");
            Thread.Sleep(10);
        }
    }

    /// <summary>Whether a socket bound to <paramref name="path"/> is in listen(): /proc/net/unix marks such sockets
    /// with the flag __SO_ACCEPTCON (00010000).</summary>
    public static bool IsListening(string path)
    {
        string full = Path.GetFullPath(path);
        foreach (var line in File.ReadLines("/proc/net/unix"))
        {
            var f = line.Split(' ', 8, StringSplitOptions.RemoveEmptyEntries);
            if (f.Length == 8 && f[3] == "00010000" && (f[7] == full || f[7] == path)) return true;
        }
        return false;
    }
}
