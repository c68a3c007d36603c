using Strata.Block;

namespace Strata.Tests.Block;

public class BlockIoThreadsTests
{
    private sealed class Blocking(ManualResetEventSlim gate, CountdownEvent started, CountdownEvent finished) : IBlockIoWork
    {
        public void Execute()
        {
            started.Signal();
            gate.Wait();
            finished.Signal();
        }
    }

    /// <summary>Work beyond the bound queues instead of starting threads, and runs as threads come free; blocked
    /// work runs on the set's own threads.</summary>
    [Fact]
    public async Task BlockingWorkIsBoundedAndAllOfItRuns()
    {
        var threads = new BlockIoThreads("test-io", minThreads: 0, maxThreads: 4, TimeSpan.FromMilliseconds(200));
        using var gate = new ManualResetEventSlim();
        using var started = new CountdownEvent(10);
        using var finished = new CountdownEvent(10);
        for (int i = 0; i < 10; i++) threads.Queue(new Blocking(gate, started, finished));
        Assert.True(SpinWait.SpinUntil(() => started.CurrentCount == 6, 5000), "four items should start at once");
        Thread.Sleep(100);
        Assert.Equal(6, started.CurrentCount); // the other six wait for a thread
        Assert.Equal(4, threads.Threads);
        Assert.Equal(6, threads.Queued);
        gate.Set();
        Assert.True(finished.Wait(5000), "queued work never ran");
        Assert.Equal(4, threads.PeakThreads);
        // Idle threads above the minimum leave.
        Assert.True(SpinWait.SpinUntil(() => threads.Threads == 0, 5000), $"{threads.Threads} idle threads stayed");
        // And come back for new work.
        await threads.RunAsync(() => { }).WaitAsync(TimeSpan.FromSeconds(5));
    }

    [Fact]
    public async Task RunAsyncCarriesTheResultAndTheException()
    {
        var threads = new BlockIoThreads("test-io", minThreads: 1, maxThreads: 2, TimeSpan.FromSeconds(1));
        string? name = null;
        await threads.RunAsync(() => name = Thread.CurrentThread.Name);
        Assert.Equal("test-io", name);
        await Assert.ThrowsAsync<IOException>(() => threads.RunAsync(() => throw new IOException("boom")));
        // A work item that throws (a bug) does not kill its thread: later work still runs.
        threads.Queue(new Throwing());
        await threads.RunAsync(() => { }).WaitAsync(TimeSpan.FromSeconds(5));
    }

    private sealed class Throwing : IBlockIoWork
    {
        public void Execute() => throw new InvalidOperationException("a bug in a work item");
    }
}
