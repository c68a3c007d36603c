using Strata.Block;
using Strata.Block.Jobs;

namespace Strata.Tests.Block;

/// <summary>
/// The job state machine in process: every transition and what happens along the way, as the typed events the
/// manager raises, in their order — success, ready and complete, manual finalize and dismiss, cancel, failure,
/// an I/O error that stops the job until it is resumed, and groups where one failure aborts the others.
/// </summary>
public class JobManagerTests
{
    /// <summary>A job whose work ends when the test says: <see cref="Finish"/>, <see cref="Fail"/>, or a cancel.</summary>
    private sealed class ScriptedJob(string id, bool autoFinalize = true, bool autoDismiss = true, bool hasReady = false)
        : Job(id, "scripted", autoFinalize, autoDismiss)
    {
        private readonly TaskCompletionSource<Exception?> _end = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly TaskCompletionSource _started = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public readonly List<string> Settled = [];

        public override bool IsBlockJob => true;
        protected internal override bool SupportsComplete => hasReady;

        public void Finish() => _end.TrySetResult(null);
        public void Fail(Exception e) => _end.TrySetResult(e);
        public void WaitStarted() => Assert.True(_started.Task.Wait(TimeSpan.FromSeconds(10)));
        public void StopWithIoError(string operation) => IoError(operation, "stop");
        public Task PausePoint() => PausePointAsync();

        protected internal override void OnComplete(bool pivot) => Finish();

        protected internal override async Task RunAsync(CancellationToken cancellationToken)
        {
            SetTotal(100);
            _started.TrySetResult();
            if (hasReady)
            {
                AddProgress(100);
                BecomeReady();
            }
            var failure = await _end.Task.WaitAsync(cancellationToken);
            if (failure is not null) throw failure;
            if (!hasReady) AddProgress(100);
        }

        protected internal override void Commit() { lock (Settled) Settled.Add("commit"); }
        protected internal override void Abort() { lock (Settled) Settled.Add("abort"); }
        protected internal override void Clean() { lock (Settled) Settled.Add("clean"); }
    }

    private static (JobManager Manager, JobEventRecorder Events) NewManager()
    {
        var events = new JobEventRecorder();
        return (new JobManager(events.Report), events);
    }

    [Fact]
    public void ASuccessfulJobGoesCreatedRunningWaitingPendingConcludedNull()
    {
        var (jobs, events) = NewManager();
        var job = new ScriptedJob("a");
        jobs.Start([job]);
        job.WaitStarted();
        job.Finish();
        events.WaitForStatus("a", JobStatus.Null);
        Assert.Equal(["created", "running", "waiting", "pending", "COMPLETED", "concluded", "null"], events.Story("a"));
        Assert.Equal(["commit", "clean"], job.Settled);
        var completed = events.Snapshot().OfType<JobCompleted>().Single();
        Assert.Equal((100, 100, null), (completed.Length, completed.Offset, completed.Error));
        Assert.Empty(jobs.All);
    }

    [Fact]
    public void AReadyJobCompletesOnRequestThenWaitsForFinalizeAndDismiss()
    {
        var (jobs, events) = NewManager();
        var job = new ScriptedJob("m", autoFinalize: false, autoDismiss: false, hasReady: true);
        jobs.Start([job]);
        events.WaitFor<JobReady>();
        Assert.Equal(JobStatus.Ready, job.Status);
        // Verbs the state refuses, in QEMU's words.
        var refused = Assert.Throws<JobException>(() => jobs.DismissJob("m"));
        Assert.Equal("Job 'm' in state 'ready' cannot accept command verb 'dismiss'", refused.Message);
        jobs.Complete("m");
        events.WaitFor<JobPending>();
        Assert.Equal(JobStatus.Pending, job.Status);
        Assert.Empty(job.Settled); // nothing settled before the finalize
        jobs.FinalizeJob("m");
        Assert.Equal(JobStatus.Concluded, job.Status);
        jobs.DismissJob("m");
        Assert.Equal(["created", "running", "ready", "READY", "waiting", "pending", "PENDING", "COMPLETED", "concluded", "null"], events.Story("m"));
        Assert.Equal(["commit", "clean"], job.Settled);
        Assert.Throws<JobException>(() => jobs.DismissJob("m"));
    }

    [Fact]
    public void ACancelledJobAbortsAndIsReportedCancelled()
    {
        var (jobs, events) = NewManager();
        var job = new ScriptedJob("c");
        jobs.Start([job]);
        job.WaitStarted();
        jobs.Cancel("c");
        events.WaitForStatus("c", JobStatus.Null);
        Assert.Equal(["created", "running", "aborting", "CANCELLED", "concluded", "null"], events.Story("c"));
        Assert.Equal(["abort", "clean"], job.Settled);
        Assert.Equal("Operation canceled", job.Error);
    }

    [Fact]
    public void AFailedJobReportsItsIoErrorThenCompletesWithTheError()
    {
        var (jobs, events) = NewManager();
        var job = new ScriptedJob("f", autoDismiss: false);
        jobs.Start([job]);
        job.WaitStarted();
        job.Fail(new BlockIOException("Input/output error", 5) { Operation = "write" });
        events.WaitForStatus("f", JobStatus.Concluded);
        Assert.Equal(["created", "running", "IO-ERROR(write,report)", "aborting", "COMPLETED(Input/output error)", "concluded"], events.Story("f"));
        Assert.Equal(["abort", "clean"], job.Settled);
        Assert.Equal("Input/output error", jobs.QueryJobs().Cast<Strata.Formats.Json.QDict>().Single()["error"]);
    }

    [Fact]
    public void AnIoErrorWithStopPausesTheJobUntilItIsResumed()
    {
        var (jobs, events) = NewManager();
        var job = new ScriptedJob("s");
        jobs.Start([job]);
        job.WaitStarted();
        job.StopWithIoError("read");
        Assert.Equal(JobStatus.Paused, job.Status);
        Assert.False(job.PausePoint().IsCompleted);
        jobs.Resume("s");
        Assert.True(job.PausePoint().IsCompleted);
        job.Finish();
        events.WaitForStatus("s", JobStatus.Null);
        Assert.Equal(["created", "running", "IO-ERROR(read,stop)", "paused", "running", "waiting", "pending", "COMPLETED", "concluded", "null"], events.Story("s"));
    }

    [Fact]
    public void InAGroupOneFailureCancelsTheRunningAndAbortsTheFinished()
    {
        var (jobs, events) = NewManager();
        var done = new ScriptedJob("done");
        var running = new ScriptedJob("running");
        var failing = new ScriptedJob("failing");
        jobs.Start([done, running, failing]);
        foreach (var j in new[] { done, running, failing }) j.WaitStarted();
        done.Finish();
        events.WaitForStatus("done", JobStatus.Waiting);
        failing.Fail(new BlockException("target gone"));
        events.WaitForStatus("done", JobStatus.Null);
        events.WaitForStatus("running", JobStatus.Null);
        events.WaitForStatus("failing", JobStatus.Null);
        // The finished one waited for its group, then was aborted with it (reported cancelled, offset == len).
        Assert.Equal(["created", "running", "waiting", "aborting", "CANCELLED", "concluded", "null"], events.Story("done"));
        Assert.Equal(["created", "running", "aborting", "CANCELLED", "concluded", "null"], events.Story("running"));
        Assert.Equal(["created", "running", "aborting", "COMPLETED(target gone)", "concluded", "null"], events.Story("failing"));
        foreach (var j in new[] { done, running, failing }) Assert.Equal(["abort", "clean"], j.Settled);
        var cancelled = events.Snapshot().OfType<JobCancelled>().Single(e => e.Job == done);
        Assert.Equal(cancelled.Length, cancelled.Offset);
    }

    [Fact]
    public void AGroupThatSucceedsCommitsOnlyOnceEveryJobFinished()
    {
        var (jobs, events) = NewManager();
        var first = new ScriptedJob("first");
        var second = new ScriptedJob("second");
        jobs.Start([first, second]);
        first.WaitStarted();
        second.WaitStarted();
        first.Finish();
        events.WaitForStatus("first", JobStatus.Waiting);
        Assert.Empty(first.Settled);
        second.Finish();
        events.WaitForStatus("first", JobStatus.Null);
        events.WaitForStatus("second", JobStatus.Null);
        Assert.Equal(["commit", "clean"], first.Settled);
        Assert.Equal(["commit", "clean"], second.Settled);
        // Both become pending together, once the last one stopped running.
        var order = events.Snapshot().OfType<JobStatusChanged>().Select(e => $"{e.Job.Id}:{JobTables.Name(e.Status)}").ToList();
        Assert.True(order.IndexOf("second:waiting") < order.IndexOf("first:pending"), string.Join(" ", order));
    }

    [Fact]
    public void ADuplicateIdIsRefusedAndNothingStarts()
    {
        var (jobs, events) = NewManager();
        var a = new ScriptedJob("x");
        jobs.Start([a]);
        var e = Assert.Throws<JobException>(() => jobs.Start([new ScriptedJob("y"), new ScriptedJob("x")]));
        Assert.Equal("Job ID 'x' already in use", e.Message);
        Assert.DoesNotContain(events.Snapshot(), ev => ev.Job.Id == "y");
        a.Finish();
        events.WaitForStatus("x", JobStatus.Null);
    }
}
