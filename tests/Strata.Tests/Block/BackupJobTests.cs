using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Jobs;

namespace Strata.Tests.Block;

/// <summary>
/// A push backup in process, on disks in memory: the bitmap frozen with a successor while the job runs, and its
/// fate by bitmap-mode when the job succeeds or fails (so the next incremental is right); and copy-before-write —
/// a guest write during the backup first copies the old data to the target.
/// </summary>
public class BackupJobTests
{
    private const int Cluster = 65536;

    private static byte[] Filled(byte value, int length = Cluster) => MemoryImage.Filled(value, length);

    /// <summary>The dirty clusters of a bitmap, by index.</summary>
    private static List<long> DirtyClusters(DirtyBitmap b) =>
        b.DirtyExtents().SelectMany(e => Enumerable.Range(0, (int)(e.Length / Cluster)).Select(i => e.Offset / Cluster + i)).ToList();

    /// <summary>A 16-cluster disk with b0 dirty at clusters 0 and 5, a target of the same size, and a job manager.</summary>
    private static (MemoryImage Source, MemoryImage Target, DirtyBitmap B0, JobManager Jobs, JobEventRecorder Events) Setup()
    {
        var source = new MemoryImage(16 * Cluster, "source");
        var target = new MemoryImage(16 * Cluster, "target");
        var b0 = source.Bitmaps.Add("b0");
        source.Write(0, Filled(1));
        source.Write(5 * Cluster, Filled(5));
        Assert.Equal([0, 5], DirtyClusters(b0));
        var events = new JobEventRecorder();
        return (source, target, b0, new JobManager(events.Report), events);
    }

    /// <summary>Fixes the point in time as the daemon does (drained), then starts the job.</summary>
    private static BackupJob Start(JobManager jobs, BackupOptions options, bool autoFinalize = true, Action? beforeStart = null)
    {
        var job = new BackupJob("j", options, autoFinalize, autoDismiss: true);
        using (options.Source.Drain()) job.Prepare(options.Source.Bitmaps);
        beforeStart?.Invoke();
        jobs.Start([job]);
        return job;
    }

    [Theory]
    [InlineData(BitmapMode.OnSuccess, new long[] { 9 })]
    [InlineData(BitmapMode.Always, new long[] { 9 })]
    [InlineData(BitmapMode.Never, new long[] { 0, 5, 9 })]
    public void OnSuccessTheSuccessorReplacesTheBitmapUnlessTheModeIsNever(BitmapMode mode, long[] expected)
    {
        var (source, target, b0, jobs, events) = Setup();
        Start(jobs, new BackupOptions { Source = source, Target = target, Sync = BackupSync.Bitmap, Bitmap = b0, Mode = mode }, autoFinalize: false);
        events.WaitFor<JobPending>();
        // Frozen while the job lasts: a successor records what the guest writes now.
        Assert.NotNull(b0.Successor);
        Assert.True(b0.Busy);
        Assert.False(b0.Enabled);
        source.Write(9 * Cluster, Filled(9));
        Assert.Equal([0, 5], DirtyClusters(b0));
        Assert.Equal([9], DirtyClusters(b0.Successor!));
        jobs.FinalizeJob("j");
        Assert.Null(b0.Successor);
        Assert.False(b0.Busy);
        Assert.True(b0.Enabled);
        Assert.Equal(expected, DirtyClusters(b0));
        // What the job copied is the bitmap's clusters as they were at the start.
        Assert.Equal(Filled(1), target.Bytes(0, Cluster));
        Assert.Equal(Filled(5), target.Bytes(5 * Cluster, Cluster));
        Assert.Equal(Filled(0), target.Bytes(9 * Cluster, Cluster));
    }

    [Theory]
    [InlineData(BitmapMode.OnSuccess, new long[] { 0, 5, 9 })]
    [InlineData(BitmapMode.Never, new long[] { 0, 5, 9 })]
    [InlineData(BitmapMode.Always, new long[] { 5, 9 })]
    public void OnFailureTheSuccessorMergesBackSoTheNextIncrementalMissesNothing(BitmapMode mode, long[] expected)
    {
        var (source, target, b0, jobs, events) = Setup();
        // Cluster 0 copies, cluster 5 fails: with always, only what was copied leaves the bitmap.
        target.FailWritesAt = 5 * Cluster;
        Start(jobs, new BackupOptions { Source = source, Target = target, Sync = BackupSync.Bitmap, Bitmap = b0, Mode = mode, Workers = 1 },
            beforeStart: () => source.Write(9 * Cluster, Filled(9))); // not in the copy map: no copy, only the successor
        events.WaitForStatus("j", JobStatus.Null);
        Assert.Equal("Input/output error", events.WaitFor<JobCompleted>().Error);
        Assert.Equal(["created", "running", "IO-ERROR(write,report)", "aborting", "COMPLETED(Input/output error)", "concluded", "null"], events.Story("j"));
        Assert.Null(b0.Successor);
        Assert.False(b0.Busy);
        Assert.Equal(expected, DirtyClusters(b0));
    }

    [Fact]
    public void AGuestWriteDuringABackupCopiesTheOldDataFirst()
    {
        var source = new MemoryImage(64 * Cluster, "source");
        var target = new MemoryImage(64 * Cluster, "target");
        for (int c = 0; c < 64; c++) source.Write(c * Cluster, Filled((byte)(c + 1)));
        var events = new JobEventRecorder();
        var jobs = new JobManager(events.Report);
        // One byte a second: the first 1 MiB chunk goes, then the loop waits for its rate — the rest is copied only
        // if a guest write makes it so.
        var job = Start(jobs, new BackupOptions { Source = source, Target = target, Sync = BackupSync.Full, Speed = 1 });
        source.Write(40 * Cluster + 100, Filled(0xee, 1000));
        // The old cluster is on the target; the guest's bytes are on the source; the neighbours were left alone.
        Assert.Equal(Filled(41), target.Bytes(40 * Cluster, Cluster));
        Assert.Equal(Filled(0xee, 1000), source.Bytes(40 * Cluster + 100, 1000));
        Assert.Equal(Filled(0), target.Bytes(39 * Cluster, Cluster));
        Assert.Equal(Filled(0), target.Bytes(41 * Cluster, Cluster));
        // The copy counts as progress, and the filter lists it as handled (beside its access map: everything).
        Assert.Equal([Cluster, 64 * Cluster], job.Filter!.Bitmaps.Listed.Select(b => b.CountBytes).Order());
        Assert.True(job.Progress >= Cluster, $"progress {job.Progress}");
        // A second write to the same cluster copies nothing again.
        int writes = target.DriverWrites;
        source.Write(40 * Cluster, Filled(0xdd, 512));
        Assert.Equal(Filled(41), target.Bytes(40 * Cluster, Cluster));
        jobs.SetSpeed("j", 0);
        events.WaitFor<JobCompleted>();
        Assert.True(target.DriverWrites > writes);
        // The target is the disk as it was when the job started.
        for (int c = 0; c < 64; c++) Assert.Equal(Filled((byte)(c + 1)), target.Bytes(c * Cluster, Cluster));
    }

    /// <summary>A 64-cluster disk with every other cluster dirty in b0 (32 runs of one cluster), a target whose third
    /// write waits at a gate, and a one-worker bitmap backup started on them.</summary>
    private static (MemoryImage Source, MemoryImage Target, JobManager Jobs, JobEventRecorder Events, ManualResetEventSlim AtGate, ManualResetEventSlim Open)
        StartScatteredBackup()
    {
        var source = new MemoryImage(64 * Cluster, "source");
        var target = new MemoryImage(64 * Cluster, "target");
        var b0 = source.Bitmaps.Add("b0");
        for (int c = 0; c < 64; c += 2) source.Write(c * Cluster, Filled((byte)(c + 1)));
        var (atGate, open) = target.HoldWrite(3);
        var events = new JobEventRecorder();
        var jobs = new JobManager(events.Report);
        Start(jobs, new BackupOptions { Source = source, Target = target, Sync = BackupSync.Bitmap, Bitmap = b0, Workers = 1 });
        Assert.True(atGate.Wait(TimeSpan.FromSeconds(10)), "the third copy never reached the target");
        return (source, target, jobs, events, atGate, open);
    }

    /// <summary>Waits for the target's writes to reach <paramref name="count"/> (the copy let through the gate ends),
    /// then checks that no other copy starts for a while.</summary>
    internal static async Task AssertStaysAtAsync(MemoryImage target, int count)
    {
        // Awaited, not slept: a blocked test thread is one fewer for the jobs of the tests running beside it.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (target.DriverWrites < count && DateTime.UtcNow < deadline) await Task.Delay(5);
        Assert.True(target.DriverWrites >= count, $"writes {target.DriverWrites}");
        await Task.Delay(300);
        Assert.Equal(count, target.DriverWrites);
    }

    /// <summary>The copies run many to a trip on a copy thread; each is still a pause point.</summary>
    [Fact]
    public async Task APauseStopsTheCopiesAfterTheOneInFlight()
    {
        var (_, target, jobs, events, _, open) = StartScatteredBackup();
        jobs.Pause("j");
        open.Set();
        await AssertStaysAtAsync(target, 3);
        jobs.Resume("j");
        events.WaitFor<JobCompleted>();
        Assert.Equal(32, target.DriverWrites);
        for (int c = 0; c < 64; c++) Assert.Equal(Filled(c % 2 == 0 ? (byte)(c + 1) : (byte)0), target.Bytes(c * Cluster, Cluster));
    }

    [Fact]
    public async Task ADrainedSourceWaitsForTheCopyInFlightAndGetsNoNewOnesUntilItEnds()
    {
        var (source, target, _, events, _, open) = StartScatteredBackup();
        // The copy at the gate counts as a request in flight on the source (as QEMU's drain waits for its job's
        // copies): the drain begins only once it is let through.
        var drain = Task.Run(source.Drain);
        await Task.Delay(200);
        Assert.False(drain.IsCompleted);
        open.Set();
        using (await drain)
            await AssertStaysAtAsync(target, 3);
        events.WaitFor<JobCompleted>();
        Assert.Equal(32, target.DriverWrites);
    }

    [Fact]
    public async Task ASpeedSetWhileCopyingTakesEffectAtTheNextRun()
    {
        var (_, target, jobs, events, _, open) = StartScatteredBackup();
        jobs.SetSpeed("j", 1);
        open.Set();
        // The copy in flight ends, then one run on the new slice's quota, and the loop waits for its rate.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (target.DriverWrites < 3 && DateTime.UtcNow < deadline) await Task.Delay(5);
        await Task.Delay(300);
        Assert.InRange(target.DriverWrites, 3, 4);
        jobs.SetSpeed("j", 0);
        events.WaitFor<JobCompleted>();
        Assert.Equal(32, target.DriverWrites);
    }

    /// <summary>A run whose write fails stays the failing worker's until the error is handled: with on-target-error
    /// stop, the other workers do not retry it before the job pauses, so there is one error event, not several.</summary>
    [Fact]
    public async Task AFailedRunIsNotRetriedByAnotherWorkerBeforeTheJobPauses()
    {
        var source = new MemoryImage(64 * Cluster, "source");
        var target = new MemoryImage(64 * Cluster, "target");
        var b0 = source.Bitmaps.Add("b0");
        for (int c = 0; c < 64; c += 2) source.Write(c * Cluster, Filled((byte)(c + 1)));
        int attempts = 0;
        target.BeforeDriverWrite = offset =>
        {
            if (offset == 10 * Cluster) Interlocked.Increment(ref attempts);
        };
        target.FailWritesAt = 10 * Cluster;
        var events = new JobEventRecorder();
        var jobs = new JobManager(events.Report);
        Start(jobs, new BackupOptions { Source = source, Target = target, Sync = BackupSync.Bitmap, Bitmap = b0, Workers = 4, OnTargetError = "stop" });
        events.WaitForStatus("j", JobStatus.Paused);
        await Task.Delay(100);
        Assert.Equal(1, attempts);
        target.FailWritesAt = null;
        jobs.Resume("j");
        events.WaitFor<JobCompleted>();
        Assert.Equal(2, attempts);
        Assert.Single(events.Story("j"), e => e.StartsWith("IO-ERROR"));
        for (int c = 0; c < 64; c++) Assert.Equal(Filled(c % 2 == 0 ? (byte)(c + 1) : (byte)0), target.Bytes(c * Cluster, Cluster));
    }
}
