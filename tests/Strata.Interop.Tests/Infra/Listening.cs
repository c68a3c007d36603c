using System.Net.Sockets;

namespace Strata.Interop.Tests;

/// <summary>A daemon's socket file appears at bind(), a moment before listen(): on a loaded machine a client that
/// connects in between is refused. Tests wait until the socket really accepts.</summary>
public static class Listening
{
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
