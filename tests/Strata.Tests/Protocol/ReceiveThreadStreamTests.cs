using System.Net.Sockets;
using Strata.Protocol;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>A connection's input received by the connection's own thread: the session runs there, reads that start
/// elsewhere resume there, a cancelled read ends its wait, and nothing is taken from the socket before it is asked for.</summary>
public class ReceiveThreadStreamTests : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly Socket _server;
    private readonly Socket _client;

    public ReceiveThreadStreamTests()
    {
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(_dir["s"]));
        listener.Listen(1);
        _client = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _client.Connect(new UnixDomainSocketEndPoint(_dir["s"]));
        _server = listener.Accept();
    }

    public void Dispose()
    {
        _client.Dispose();
        _server.Dispose();
        _dir.Dispose();
    }

    /// <summary>Runs <paramref name="session"/> on a new thread through the stream, as the connection listener does.</summary>
    private static Task RunOnThread(ReceiveThreadStream input, Func<Task> session)
    {
        var ended = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        new Thread(() =>
        {
            try
            {
                input.Run(session).GetAwaiter().GetResult();
                ended.SetResult();
            }
            catch (Exception e)
            {
                ended.SetException(e);
            }
        }) { IsBackground = true }.Start();
        return ended.Task;
    }

    [Fact]
    public async Task AReadThatStartsOnAnotherThreadResumesTheSessionOnTheConnectionsThread()
    {
        using var input = new ReceiveThreadStream(_server);
        Thread? connectionThread = null, movedTo = null, resumedOn = null;
        var movedAway = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var got = new List<byte>();
        var session = RunOnThread(input, async () =>
        {
            connectionThread = Thread.CurrentThread;
            var buffer = new byte[16];
            int n = await input.ReadAsync(buffer); // on the thread: a receive of its own, which waits for the client
            got.AddRange(buffer.AsSpan(0, n).ToArray());
            await Task.Yield(); // the session moves to a pool thread, as after waiting for a request slot
            movedTo = Thread.CurrentThread;
            movedAway.SetResult();
            n = await input.ReadAsync(buffer);
            resumedOn = Thread.CurrentThread;
            got.AddRange(buffer.AsSpan(0, n).ToArray());
        });
        _client.Send([1, 2, 3]);
        await movedAway.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await Task.Delay(200); // the second read is waiting on the connection's thread before its data comes
        _client.Send([4, 5]);
        await session.WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal([1, 2, 3, 4, 5], got);
        Assert.NotSame(connectionThread, movedTo);
        Assert.Same(connectionThread, resumedOn);
    }

    [Fact]
    public async Task AReadHandedOverWhoseDataIsAlreadyThereAlsoResumesOnTheConnectionsThread()
    {
        using var input = new ReceiveThreadStream(_server);
        Thread? connectionThread = null;
        var resumedOn = new List<Thread>();
        var session = RunOnThread(input, async () =>
        {
            connectionThread = Thread.CurrentThread;
            var buffer = new byte[1];
            for (int i = 0; i < 20; i++)
            {
                await Task.Yield(); // to a pool thread
                Assert.Equal(1, await input.ReadAsync(buffer));
                resumedOn.Add(Thread.CurrentThread);
            }
        });
        _client.Send(new byte[20]); // all there before the first read
        await session.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(20, resumedOn.Count);
        Assert.All(resumedOn, t => Assert.Same(connectionThread, t));
    }

    [Fact]
    public async Task NothingIsTakenFromTheSocketBeyondWhatTheSessionAsksFor()
    {
        using var input = new ReceiveThreadStream(_server);
        var sent = new byte[128 << 10]; // within the socket buffer: the send does not wait for a reader
        Random.Shared.NextBytes(sent);
        await _client.SendAsync(sent).WaitAsync(TimeSpan.FromSeconds(30));
        int availableAfterRead = -1;
        var first = new byte[100];
        await RunOnThread(input, async () =>
        {
            int n = await input.ReadAsync(first);
            Assert.Equal(first.Length, n);
            availableAfterRead = _server.Available;
        }).WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(sent.AsSpan(0, 100).ToArray(), first);
        Assert.Equal(sent.Length - first.Length, availableAfterRead);
    }

    [Fact]
    public async Task ACancelledReadStopsWaitingForTheClient()
    {
        using var input = new ReceiveThreadStream(_server);
        using var cts = new CancellationTokenSource();
        var waiting = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var session = RunOnThread(input, async () =>
        {
            var buffer = new byte[8];
            Assert.Equal(1, await input.ReadAsync(buffer, cts.Token));
            waiting.SetResult();
            _ = await input.ReadAsync(buffer, cts.Token); // nothing comes: waits in poll until cancelled
        });
        _client.Send([9]);
        await waiting.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await Task.Delay(100);
        cts.Cancel();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => session.WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task TheClientsCloseIsAnEndOfInputAfterItsLastBytes()
    {
        using var input = new ReceiveThreadStream(_server);
        _client.Send([7, 7]);
        _client.Shutdown(SocketShutdown.Send);
        var reads = new List<int>();
        await RunOnThread(input, async () =>
        {
            var buffer = new byte[8];
            int n;
            while ((n = await input.ReadAsync(buffer)) > 0) reads.Add(n);
            reads.Add(n);
        }).WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal([2, 0], reads);
    }

    [Fact]
    public async Task AReadHandedOverAfterTheThreadHasEndedFailsInsteadOfWaiting()
    {
        using var input = new ReceiveThreadStream(_server);
        await RunOnThread(input, () => Task.CompletedTask).WaitAsync(TimeSpan.FromSeconds(30));
        var read = input.ReadAsync(new byte[8]).AsTask();
        await Assert.ThrowsAsync<IOException>(() => read.WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task ASecondReadWhileOneWaitsIsRefused()
    {
        using var input = new ReceiveThreadStream(_server);
        var handedOver = new TaskCompletionSource<(ValueTask<int> First, ValueTask<int> Second)>(TaskCreationOptions.RunContinuationsAsynchronously);
        var release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var session = RunOnThread(input, async () =>
        {
            await Task.Yield(); // to a pool thread
            var buffer = new byte[8];
            handedOver.SetResult((input.ReadAsync(buffer), input.ReadAsync(buffer)));
            await release.Task;
        });
        var (first, second) = await handedOver.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await Assert.ThrowsAsync<InvalidOperationException>(() => second.AsTask());
        _client.Send([3]);
        Assert.Equal(1, await first.AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        release.SetResult();
        await session.WaitAsync(TimeSpan.FromSeconds(30));
    }
}
