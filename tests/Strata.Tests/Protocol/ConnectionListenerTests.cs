using System.Collections.Concurrent;
using System.Net.Sockets;
using Strata.Protocol;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>Connections get a thread of their own up to the listener's bound; those past it are served on the pool,
/// and a thread's end frees its place.</summary>
public class ConnectionListenerTests
{
    private sealed record Session(bool OnPool, string? Thread, TaskCompletionSource Release);

    [Fact]
    public async Task ConnectionsPastTheThreadBoundAreServedOnThePoolUntilAThreadIsFree()
    {
        using var dir = new TempDir();
        var sessions = new ConcurrentQueue<Session>();
        await using var listener = ConnectionListener.Unix(dir["s"], 8, 0, async (input, output, _, ct) =>
        {
            var session = new Session(Thread.CurrentThread.IsThreadPoolThread, Thread.CurrentThread.Name,
                new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously));
            sessions.Enqueue(session);
            await session.Release.Task.WaitAsync(ct);
        }, connectionThreads: 1);
        listener.Start();

        var clients = new List<Socket>();
        async Task<Session> Connect()
        {
            int before = sessions.Count;
            var c = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
            clients.Add(c);
            await c.ConnectAsync(new UnixDomainSocketEndPoint(dir["s"]));
            for (int wait = 0; sessions.Count <= before && wait < 3000; wait++) await Task.Delay(10);
            return sessions.ToArray()[before];
        }
        try
        {
            var first = await Connect();
            Assert.Equal((false, "connection"), (first.OnPool, first.Thread));
            Assert.True((await Connect()).OnPool);
            Assert.True((await Connect()).OnPool);

            // The first session ends: its thread's place goes to a later connection (as soon as the thread is gone).
            first.Release.SetResult();
            Session? later = null;
            for (int attempt = 0; attempt < 100 && later is not { OnPool: false }; attempt++)
            {
                if (attempt > 0) await Task.Delay(50);
                later = await Connect();
            }
            Assert.Equal((false, "connection"), (later!.OnPool, later.Thread));
        }
        finally
        {
            foreach (var s in sessions) s.Release.TrySetResult();
            foreach (var c in clients) c.Dispose();
        }
    }
}
