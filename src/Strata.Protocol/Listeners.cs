using System.Net;
using System.Net.Sockets;

namespace Strata.Protocol;

/// <summary>Listening sockets for the daemon's servers (QMP and NBD): unix paths and TCP addresses.</summary>
internal static class Listeners
{
    public static Socket Unix(string path, int backlog)
    {
        if (File.Exists(path)) File.Delete(path);
        var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Bind(new UnixDomainSocketEndPoint(path));
        s.Listen(backlog);
        return s;
    }

    public static Socket Tcp(string host, int port, int backlog)
    {
        var address = host is "" or "localhost" ? IPAddress.Loopback : IPAddress.Parse(host);
        var s = new Socket(address.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        s.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        s.Bind(new IPEndPoint(address, port));
        s.Listen(backlog);
        return s;
    }
}
