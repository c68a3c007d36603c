using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Jobs;
using Strata.Block.Qcow2;
using Strata.Daemon;

namespace Strata.Tests.Block;

/// <summary>
/// The one request path: drain holds new requests and waits for those in flight, a backup's point in time is
/// taken drained, failed allocations roll back, and host errors come out as block errors with their errno.
/// </summary>
public class RequestPathTests
{
    private const int Cluster = 65536;

    private static (DaemonBackend Backend, Qcow2Image Source) NewDaemon(TempDir dir)
    {
        string disk = dir["disk.qcow2"], target = dir["target.qcow2"];
        Qcow2Image.Create(disk, new Qcow2CreateOptions { Size = 16 * Cluster }).Dispose();
        Qcow2Image.Create(target, new Qcow2CreateOptions { Size = 16 * Cluster }).Dispose();
        var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "disk-file", Filename = disk });
        var source = graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "disk-file" });
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "target-file", Filename = target });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "target", FileNodeName = "target-file" });
        return (new DaemonBackend(graph), (Qcow2Image)source.Image);
    }

    /// <summary>Runs a command as a QMP session would, off the test's thread (a command that drains may block).</summary>
    private static Task<object?> Qmp(DaemonBackend backend, string command, string arguments) =>
        Task.Run(() => backend.ExecuteAsync(command, JsonNode.Parse(arguments)!.AsObject(), CancellationToken.None).AsTask());

    private static byte[] Filled(byte value, int length) => Enumerable.Repeat(value, length).ToArray();

    /// <summary>Holds the next guest-data write of an image after the request path has counted it and marked the
    /// bitmaps, before its bytes land, until <see cref="Release"/>.</summary>
    private sealed class HeldWrite : IDisposable
    {
        private readonly ManualResetEventSlim _reached = new(), _release = new();

        public HeldWrite(Qcow2Image image) => image.File.BeforeDataIo = (write, _, _) =>
        {
            if (!write || _reached.IsSet) return;
            _reached.Set();
            _release.Wait(TimeSpan.FromSeconds(30));
        };

        public bool WaitReached() => _reached.Wait(TimeSpan.FromSeconds(10));

        public void Release() => _release.Set();

        public void Dispose()
        {
            _release.Set();
            _reached.Dispose();
            _release.Dispose();
        }
    }

    /// <summary>A write that has marked the bitmap but not yet reached the disk when an incremental backup starts must
    /// end up in that backup or in the bitmap the next one uses. Without a drain it was in neither: the job copied
    /// the cluster before the write landed, and the write's mark went to the bitmap the job then consumed.</summary>
    [Fact]
    public async Task AWriteInFlightAcrossABackupStartLandsInTheBackupOrTheNextBitmap()
    {
        using var dir = new TempDir();
        var (backend, source) = NewDaemon(dir);
        try
        {
            source.Write(3 * Cluster, Filled(0x11, Cluster));
            await Qmp(backend, "block-dirty-bitmap-add", """{"node":"disk","name":"b0"}""");
            source.Write(5 * Cluster, Filled(0x22, Cluster)); // something for the incremental besides the held write

            // Hold the next data write to cluster 3 after the request path has marked b0, before its bytes land.
            using var hold = new HeldWrite(source);
            var held = Task.Run(() => source.Write(3 * Cluster, Filled(0x33, Cluster)));
            Assert.True(hold.WaitReached(), "the write never reached the disk");
            Assert.Equal(1, source.Requests.InFlight);

            var backup = Qmp(backend, "blockdev-backup", """{"device":"disk","target":"target","sync":"incremental","bitmap":"b0","job-id":"inc","auto-dismiss":false}""");
            // The backup's start waits for the write in flight, with new requests held meanwhile.
            var deadline = DateTime.UtcNow.AddSeconds(10);
            while (!source.Requests.IsDrained && DateTime.UtcNow < deadline) await Task.Delay(5);
            Assert.True(source.Requests.IsDrained, "the backup did not drain its source");
            await Task.Delay(200);
            Assert.False(backup.IsCompleted, "the backup started with a write in flight");
            hold.Release();
            await held.WaitAsync(TimeSpan.FromSeconds(10));
            await backup.WaitAsync(TimeSpan.FromSeconds(10));
            source.File.BeforeDataIo = null;
            await WaitConcluded(backend, "inc");

            var job = backend.Jobs.All.Single(j => j.Id == "inc");
            Assert.Null(job.Error);
            var target = backend.Graph.Find("target")!.Image;
            var copied = new byte[Cluster];
            target.Read(3 * Cluster, copied);
            bool inBackup = copied.All(b => b == 0x33);
            bool inNextBitmap = source.Bitmaps.Get("b0").Bits.Get(3 * Cluster / source.Bitmaps.Get("b0").Granularity);
            Assert.True(inBackup || inNextBitmap, "the write is in neither the backup nor the next incremental's bitmap");
            Assert.True(inBackup, "with the start drained, the write that was in flight belongs to this backup");
            target.Read(5 * Cluster, copied);
            Assert.All(copied, b => Assert.Equal(0x22, b));
        }
        finally
        {
            backend.Graph.Dispose();
        }
    }

    private static async Task WaitConcluded(DaemonBackend backend, string id)
    {
        var deadline = DateTime.UtcNow.AddSeconds(20);
        while (DateTime.UtcNow < deadline)
        {
            var job = backend.Jobs.All.FirstOrDefault(j => j.Id == id);
            if (job is null || job.Status is JobStatus.Concluded or JobStatus.Null) return;
            await Task.Delay(10);
        }
        Assert.Fail($"job {id} did not conclude");
    }

    private static async Task<bool> Finishes(Task task, int milliseconds) => await Task.WhenAny(task, Task.Delay(milliseconds)) == task;

    [Fact]
    public async Task ADrainWaitsForRequestsInFlightAndHoldsNewOnesUntilItEnds()
    {
        using var dir = new TempDir();
        string path = dir["d.qcow2"];
        using var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 4 * Cluster });
        using var hold = new HeldWrite(img);
        var first = Task.Run(() => img.Write(0, Filled(1, 4096)));
        Assert.True(hold.WaitReached());

        // The drainer is one thread from begin to end, as a QMP command is.
        var drainedNow = new TaskCompletionSource();
        var end = new TaskCompletionSource();
        var ownRead = new byte[4096];
        var drainer = new Thread(() =>
        {
            using (img.Drain())
            {
                drainedNow.SetResult();
                end.Task.Wait();
                img.Read(0, ownRead); // the drainer's own request passes its gate
            }
        });
        drainer.Start();
        Assert.False(await Finishes(drainedNow.Task, 200), "the drain ended with a write in flight");
        hold.Release();
        await drainedNow.Task.WaitAsync(TimeSpan.FromSeconds(10));
        // The request has left the node; its task completes a moment later, on its own thread.
        Assert.True(await Finishes(first, 5000), "the held write never completed");

        // While drained, a request from outside waits.
        var second = Task.Run(() => img.Write(Cluster, Filled(2, 4096)));
        Assert.False(await Finishes(second, 200), "a new request went past the drain");
        Assert.Equal(0, img.Requests.InFlight);
        end.SetResult();
        await second.WaitAsync(TimeSpan.FromSeconds(10));
        drainer.Join();
        Assert.All(ownRead, b => Assert.Equal(1, b));
    }

    [Fact]
    public async Task DrainingANodeHoldsTheFiltersAboveIt()
    {
        using var dir = new TempDir();
        string path = dir["d.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 4 * Cluster }).Dispose();
        using var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f", Filename = path });
        var disk = graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "f" });
        graph.ThrottleGroups["g"] = new Strata.Block.Filters.ThrottleGroup("g", 0);
        var throttle = graph.Add(new BlockNodeSpec { Driver = "throttle", NodeName = "t", FileNodeName = "disk", ThrottleGroup = "g" });
        var drainedNow = new TaskCompletionSource();
        var end = new TaskCompletionSource();
        var drainer = new Thread(() =>
        {
            using (disk.Image.Drain())
            {
                drainedNow.SetResult();
                end.Task.Wait();
            }
        });
        drainer.Start();
        await drainedNow.Task.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.True(throttle.Image.Requests.IsDrained);
        var through = Task.Run(() => throttle.Image.Write(0, Filled(7, 512)));
        Assert.False(await Finishes(through, 200), "a write through the filter went past the drain of the node below");
        end.SetResult();
        drainer.Join();
        Assert.False(throttle.Image.Requests.IsDrained);
        await through.WaitAsync(TimeSpan.FromSeconds(10));
    }

    [Fact]
    public async Task AFailedAllocatingWriteGivesItsClustersBackAndLaterWritesGoOn()
    {
        using var dir = new TempDir();
        string path = dir["d.qcow2"];
        using (var img = Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 8 * Cluster }))
        {
            img.File.Faults = new Blkdebug([], [new BlkdebugErrorRule("write_aio", 28, null, null, Once: true)]);
            var e = Assert.Throws<BlockIOException>(() => img.Write(Cluster + 512, Filled(9, 4096)));
            Assert.Equal(28, e.Errno);
            // The guest cluster is not left "being allocated": the same write now goes through at once.
            var retry = Task.Run(() => img.Write(Cluster + 512, Filled(9, 4096)));
            Assert.True(await Finishes(retry, 10_000), "a write to the cluster of a failed allocation hung");
            img.Flush();
        }
        using var check = (Qcow2Image)ImageOpener.Open(path, "qcow2", readOnly: true);
        var buffer = new byte[4096];
        check.Read(Cluster + 512, buffer);
        Assert.All(buffer, b => Assert.Equal(9, b));
        var report = check.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void HostErrorsComeOutAsBlockErrorsWithTheirErrno()
    {
        // /dev/full answers every write with ENOSPC, as a full disk does.
        using var full = HostFile.Open("/dev/full", readOnly: false);
        var e = Assert.Throws<BlockIOException>(() => full.Write(0, new byte[4096]));
        Assert.Equal(28, e.Errno);
        Assert.Equal("write", e.Operation);

        // Whatever a driver lets out of the host is converted at the request path, and the request is no longer counted.
        using var failing = new FailingImage(new IOException("host said no", 5));
        var read = Assert.Throws<BlockIOException>(() => failing.Read(0, new byte[512]));
        Assert.Equal(5, read.Errno);
        Assert.Equal("read", read.Operation);
        Assert.Equal(0, failing.Requests.InFlight);
        using var denied = new FailingImage(new UnauthorizedAccessException());
        Assert.Equal(1, Assert.Throws<BlockIOException>(() => denied.Write(0, new byte[512])).Errno);
        Assert.Equal(0, denied.Requests.InFlight);
    }

    /// <summary>A driver whose host fails every request with the exception given.</summary>
    private sealed class FailingImage : BlockImage
    {
        private readonly Exception _error;

        public FailingImage(Exception error)
        {
            _error = error;
            Bitmaps = new Strata.Block.Bitmaps.BitmapSet(1 << 20, 65536);
        }

        public override string FormatName => "failing";
        public override long Size => 1 << 20;
        public override bool ReadOnly => false;
        public override string FileName => "failing://";
        protected override void DriverRead(long offset, Span<byte> buffer) => throw _error;
        protected override void DriverWrite(long offset, ReadOnlySpan<byte> data) => throw _error;
        protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => throw _error;
        protected override void DriverDiscard(long offset, long length) => throw _error;
        protected override void DriverFlush() => throw _error;
        public override LayerExtent GetLayerStatus(long offset, long maxLength) => new(offset, maxLength, LayerState.Data, -1);
        public override void Resize(long newSize) => throw _error;
    }
}
