using System.Collections.Concurrent;
using System.Net.Sockets;
using Strata.Protocol;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>Connections get a thread of their own up to the listener's bound; those past it are served on the pool.</summary>
public class ConnectionListenerTests
{
    [Fact]
    public async Task ConnectionsPastTheThreadBoundAreServedOnThePool()
    {
        using var dir = new TempDir();
        var sessions = new ConcurrentQueue<(bool OnPool, string? Thread)>();
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        await using var listener = ConnectionListener.Unix(dir["s"], 8, 0, async (input, output, _, ct) =>
        {
            sessions.Enqueue((Thread.CurrentThread.IsThreadPoolThread, Thread.CurrentThread.Name));
            await release.Task.WaitAsync(ct);
        }, connectionThreads: 1);
        listener.Start();

        var clients = new List<Socket>();
        try
        {
            for (int i = 0; i < 3; i++)
            {
                var c = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
                clients.Add(c);
                await c.ConnectAsync(new UnixDomainSocketEndPoint(dir["s"]));
                for (int wait = 0; sessions.Count <= i && wait < 3000; wait++) await Task.Delay(10);
            }
            var seen = sessions.ToArray();
            Assert.Equal(3, seen.Length);
            Assert.Equal((false, "connection"), seen[0]);
            Assert.True(seen[1].OnPool);
            Assert.True(seen[2].OnPool);
        }
        finally
        {
            release.SetResult();
            foreach (var c in clients) c.Dispose();
        }
    }
}
