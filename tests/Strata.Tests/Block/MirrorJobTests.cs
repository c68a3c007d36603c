using Strata.Block;
using Strata.Block.Jobs;

namespace Strata.Tests.Block;

/// <summary>
/// A mirror in process, on disks in memory, against a guest that dirties clusters faster than the background copy
/// (held to a low speed) can copy them: the job turns write-blocking once it has not converged in its grace, gets
/// ready, and ends with the target equal to the source. A quiet guest never meets the switch.
/// </summary>
public class MirrorJobTests
{
    private const int Cluster = 65536;
    private const int Size = 64 * Cluster;

    private static (MemoryImage Source, MemoryImage Target, JobManager Jobs, JobEventRecorder Events) Setup()
    {
        var source = new MemoryImage(Size, "source");
        var target = new MemoryImage(Size, "target");
        source.Write(0, MemoryImage.Filled(7, Size));
        var events = new JobEventRecorder();
        return (source, target, new JobManager(events.Report), events);
    }

    private static MirrorJob Start(JobManager jobs, MemoryImage source, MemoryImage target, TimeSpan convergeWithin)
    {
        // 2 MiB/s: a pass over the 4 MiB disk takes about 2 s, while the guest below dirties every cluster in ~0.1 s.
        var job = new MirrorJob("m", new MirrorOptions
        {
            Source = source, Target = target, Sync = MirrorSync.Full, Granularity = Cluster, Speed = 2 << 20, Workers = 1,
            ConvergeWithin = convergeWithin,
        }, autoFinalize: true, autoDismiss: true);
        job.Prepare();
        jobs.Start([job]);
        return job;
    }

    /// <summary>Writes 4 KiB of fresh random data at random places, one about every millisecond, until stopped.</summary>
    private static async Task GuestAsync(MemoryImage disk, CancellationToken stop)
    {
        var rng = new Random(5);
        var data = new byte[4096];
        while (!stop.IsCancellationRequested)
        {
            rng.NextBytes(data);
            disk.Write(rng.Next(0, Size / 4096) * 4096L, data);
            await Task.Delay(1, CancellationToken.None);
        }
    }

    [Fact]
    public async Task AMirrorThatGuestWritesOutpaceTurnsWriteBlockingGetsReadyAndEndsEqual()
    {
        var (source, target, jobs, events) = Setup();
        using var stop = new CancellationTokenSource();
        var guest = Task.Run(() => GuestAsync(source, stop.Token));
        var job = Start(jobs, source, target, TimeSpan.FromMilliseconds(300));
        Assert.False(job.WriteBlocking);
        // Without the switch this never comes: the copy runs at a 20th of the rate the guest dirties clusters.
        events.WaitFor<JobReady>();
        Assert.True(job.WriteBlocking);
        await Task.Delay(200);
        // Write-blocking: each write the guest completed since is on the target already; once the guest stops, a
        // soft cancel ends the job with the target a copy of the source.
        await stop.CancelAsync();
        await guest;
        jobs.Cancel("m", force: false);
        events.WaitFor<JobEvent>(e => e is JobCompleted or JobCancelled);
        Assert.Equal(source.Bytes(0, Size), target.Bytes(0, Size));
    }

    [Fact]
    public void AMirrorWithAQuietGuestStaysInTheBackground()
    {
        var (source, target, jobs, events) = Setup();
        var job = Start(jobs, source, target, TimeSpan.Zero);
        events.WaitFor<JobReady>();
        Assert.False(job.WriteBlocking);
        jobs.Cancel("m", force: false);
        events.WaitFor<JobEvent>(e => e is JobCompleted or JobCancelled);
        Assert.Equal(source.Bytes(0, Size), target.Bytes(0, Size));
    }

    /// <summary>An unthrottled one-worker mirror of the 4 MiB disk (four runs of 1 MiB) whose second write to the
    /// target waits at a gate.</summary>
    private static (MemoryImage Source, MemoryImage Target, JobManager Jobs, JobEventRecorder Events, ManualResetEventSlim Open) StartHeldAtSecondRun()
    {
        var (source, target, jobs, events) = Setup();
        var (atGate, open) = target.HoldWrite(2);
        var job = new MirrorJob("m", new MirrorOptions { Source = source, Target = target, Sync = MirrorSync.Full, Granularity = Cluster, Workers = 1 },
            autoFinalize: true, autoDismiss: true);
        job.Prepare();
        jobs.Start([job]);
        Assert.True(atGate.Wait(TimeSpan.FromSeconds(10)), "the second copy never reached the target");
        return (source, target, jobs, events, open);
    }

    /// <summary>The copies run many to a trip on a copy thread; each is still a pause point.</summary>
    [Fact]
    public async Task APausedMirrorStopsAfterTheCopyInFlight()
    {
        var (source, target, jobs, events, open) = StartHeldAtSecondRun();
        jobs.Pause("m");
        open.Set();
        await BackupJobTests.AssertStaysAtAsync(target, 2);
        jobs.Resume("m");
        events.WaitFor<JobReady>();
        jobs.Cancel("m", force: false);
        events.WaitFor<JobEvent>(e => e is JobCompleted or JobCancelled);
        Assert.Equal(source.Bytes(0, Size), target.Bytes(0, Size));
    }

    [Fact]
    public async Task ADrainedSourceWaitsForTheMirrorCopyInFlightAndGetsNoNewOnesUntilItEnds()
    {
        var (source, target, jobs, events, open) = StartHeldAtSecondRun();
        var drain = Task.Run(source.Drain);
        await Task.Delay(200);
        Assert.False(drain.IsCompleted);
        open.Set();
        using (await drain)
            await BackupJobTests.AssertStaysAtAsync(target, 2);
        events.WaitFor<JobReady>();
        Assert.Equal(4, target.DriverWrites);
        jobs.Cancel("m", force: false);
        events.WaitFor<JobEvent>(e => e is JobCompleted or JobCancelled);
    }
}
