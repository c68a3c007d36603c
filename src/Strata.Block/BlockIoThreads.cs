namespace Strata.Block;

/// <summary>A piece of blocking block I/O queued to <see cref="BlockIoThreads"/> (a request object that is reused,
/// so queuing it allocates nothing).</summary>
public interface IBlockIoWork
{
    /// <summary>Runs on a block I/O thread; it must not throw (an escaping exception is logged and dropped).</summary>
    void Execute();
}

/// <summary>
/// Dedicated threads for synchronous block I/O (pread/pwrite, image locks, sync-over-async drivers), so that work
/// which blocks never occupies the .NET thread pool: accept loops, handshakes and replies run there and must always
/// make progress. Like QEMU's thread pool: a thread is started when work is queued and none is idle, up to a
/// bound (work queues beyond it); threads above the minimum leave after being idle for a while.
/// </summary>
public sealed class BlockIoThreads
{
    /// <summary>The process's block I/O threads: QEMU's defaults (at most 64 workers, 10 s idle timeout).</summary>
    public static BlockIoThreads Shared { get; } = new("strata-io", minThreads: 2, maxThreads: 64, TimeSpan.FromSeconds(10));

    private readonly object _lock = new();
    private readonly Queue<IBlockIoWork> _queue = new();
    private readonly string _name;
    private readonly int _minThreads;
    private readonly int _maxThreads;
    private readonly TimeSpan _idleTimeout;
    private int _threads;
    private int _idle;
    private int _peakThreads;

    public BlockIoThreads(string name, int minThreads, int maxThreads, TimeSpan idleTimeout)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxThreads, 1);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(minThreads, maxThreads);
        _name = name;
        _minThreads = minThreads;
        _maxThreads = maxThreads;
        _idleTimeout = idleTimeout;
    }

    public int MaxThreads => _maxThreads;

    /// <summary>Threads alive now.</summary>
    public int Threads
    {
        get { lock (_lock) return _threads; }
    }

    /// <summary>The most threads ever alive at once (the bound holds: never above <see cref="MaxThreads"/>).</summary>
    public int PeakThreads
    {
        get { lock (_lock) return _peakThreads; }
    }

    /// <summary>Work waiting for a thread.</summary>
    public int Queued
    {
        get { lock (_lock) return _queue.Count; }
    }

    public void Queue(IBlockIoWork work)
    {
        lock (_lock)
        {
            _queue.Enqueue(work);
            Volatile.Write(ref _queued, _queue.Count);
            // Every idle or spinning thread takes one item; start another only for work none of them will take, and
            // wake a sleeper only for work the spinners leave.
            if (_queue.Count > _idle + _spinning && _threads < _maxThreads) StartThread();
            else if (_idle > 0 && _queue.Count > _spinning) Monitor.Pulse(_lock);
        }
    }

    /// <summary>Runs <paramref name="action"/> on a block I/O thread (allocates: for paths that are not per request).</summary>
    public Task RunAsync(Action action)
    {
        var work = new DelegateWork(action);
        Queue(work);
        return work.Done.Task;
    }

    private sealed class DelegateWork(Action action) : IBlockIoWork
    {
        public readonly TaskCompletionSource Done = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public void Execute()
        {
            try
            {
                action();
                Done.TrySetResult();
            }
            catch (Exception e)
            {
                Done.TrySetException(e);
            }
        }
    }

    private void StartThread()
    {
        _threads++;
        _peakThreads = Math.Max(_peakThreads, _threads);
        // The thread pool's idea of stack size is fine for qcow2 code; background: never keeps the process alive.
        new Thread(Worker) { IsBackground = true, Name = _name }.Start();
    }

    /// <summary>How long a thread that ran out of work watches the queue before it sleeps: a request arriving that
    /// soon (the next one of a client waiting for each reply) is taken without a sleep and a wake, which cost tens
    /// of microseconds each on a VM — what made a queue-depth-1 request slower than on the .NET pool, which spins too.</summary>
    private static readonly long SpinTicks = System.Diagnostics.Stopwatch.Frequency / 20_000; // 50 µs

    private int _spinning;
    private int _queued;

    private void Worker()
    {
        while (true)
        {
            IBlockIoWork work;
            bool spun = false;
            lock (_lock)
            {
                if (_queue.Count == 0)
                {
                    _spinning++;
                    spun = true;
                }
            }
            if (spun)
            {
                long until = System.Diagnostics.Stopwatch.GetTimestamp() + SpinTicks;
                // Pause instructions only: a yield (what SpinWait does now and then) is a context switch whenever another
                // thread of the process is runnable, and with a dozen threads watching the queue those yields were
                // most of the switches the daemon made.
                while (Volatile.Read(ref _queued) == 0 && System.Diagnostics.Stopwatch.GetTimestamp() < until) Thread.SpinWait(20);
            }
            lock (_lock)
            {
                if (spun) _spinning--;
                while (_queue.Count == 0)
                {
                    _idle++;
                    bool woken = Monitor.Wait(_lock, _idleTimeout);
                    _idle--;
                    if (!woken && _queue.Count == 0 && _threads > _minThreads)
                    {
                        _threads--;
                        return;
                    }
                }
                work = _queue.Dequeue();
                Volatile.Write(ref _queued, _queue.Count);
            }
            try
            {
                work.Execute();
            }
            catch (Exception e)
            {
                // A work item that throws has a bug; the thread must survive it or queued work would wait forever.
                Console.Error.WriteLine($"strata: unexpected error on a block I/O thread: {e}");
            }
        }
    }
}
