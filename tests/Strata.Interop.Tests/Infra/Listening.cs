using System.Net.Sockets;

namespace Strata.Interop.Tests;

/// <summary>A daemon's socket file appears at bind(), a moment before listen(): on a loaded machine a client that
/// connects in between is refused. Tests wait until the socket really accepts.</summary>
public static class Listening
{
    /// <summary>Waits until <paramref name="process"/> (called <paramref name="what"/> in errors) listens on every
    /// socket in <paramref name="unixSocketPaths"/>; fails at once with its stderr if it exits first.</summary>
    public static void WaitForProcess(System.Diagnostics.Process process, string what, int timeoutMs, params string[] unixSocketPaths)
    {
        var sw = System.Diagnostics.Stopwatch.StartNew();
        while (!unixSocketPaths.All(File.Exists))
        {
            if (process.HasExited) throw new InvalidOperationException($"{what} exited: {process.StandardError.ReadToEnd()}");
            if (sw.ElapsedMilliseconds > timeoutMs) throw new TimeoutException($"{what} did not start");
            Thread.Sleep(10);
        }
        foreach (var path in unixSocketPaths) WaitFor(path);
    }

    public static void WaitFor(string unixSocketPath, int timeoutMs = 15000)
    {
        var deadline = DateTime.UtcNow.AddMilliseconds(timeoutMs);
        while (true)
        {
            using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            try
            {
                probe.Connect(new UnixDomainSocketEndPoint(unixSocketPath));
                return;
            }
            catch (SocketException) when (DateTime.UtcNow < deadline)
            {
                Thread.Sleep(20);
            }
        }
    }
}
