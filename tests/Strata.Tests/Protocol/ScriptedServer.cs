using System.Net.Sockets;
using System.Text;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>A server of one connection on a unix socket whose side of the conversation a test scripts: for clients
/// meeting servers that misbehave in set ways.</summary>
internal static class ScriptedServer
{
    /// <summary>Starts the server, runs <paramref name="client"/> against its socket path, then waits for
    /// <paramref name="script"/> (given the connection's input lines and the stream to write to) to end.</summary>
    public static async Task RunAsync(Func<StreamReader, NetworkStream, Task> script, Func<string, Task> client)
    {
        using var dir = new TempDir();
        string path = dir["scripted.sock"];
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        var server = Task.Run(async () =>
        {
            using var s = await listener.AcceptAsync();
            await using var stream = new NetworkStream(s);
            await script(new StreamReader(stream), stream);
        });
        await client(path);
        await server.WaitAsync(TimeSpan.FromSeconds(30));
    }

    /// <summary>One line as a QMP server ends it (CRLF).</summary>
    public static Task SendLineAsync(this Stream stream, string line) => stream.WriteAsync(Encoding.ASCII.GetBytes(line + "\r\n")).AsTask();
}
