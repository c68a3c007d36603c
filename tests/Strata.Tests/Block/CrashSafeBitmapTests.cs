using Strata.Block;
using Strata.Block.Bitmaps;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Block;

/// <summary>
/// Crash-safe tracking of persistent bitmaps, in-process: a "crash" is a copy of the image file taken while the image
/// is still open (what the file holds after the process dies: every write reached the page cache). The power-loss
/// states, built from recorded writes and fsyncs, are in the interop tests with qemu-img check.
/// </summary>
public class CrashSafeBitmapTests
{
    private const long Granule = 65536;
    private const long Region = 1 << 20;

    /// <summary>Checkpoints only where a test takes them: an idle checkpoint on a slow CI machine would otherwise move
    /// the epochs under the test's feet.</summary>
    private static Qcow2Image OpenCrashSafe(string path) =>
        Qcow2Image.Open(HostFile.Open(path, readOnly: false),
            new Qcow2OpenOptions { CrashSafeBitmaps = true, ScheduledCheckpoints = false });

    private static string NewImage(TempDir dir, long size = 64 << 20)
    {
        string path = dir["disk.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size }).Dispose();
        return path;
    }

    /// <summary>What the file holds if the process died now.</summary>
    private static string CrashCopy(TempDir dir, string path, string name = "crashed.qcow2")
    {
        string copy = dir[name];
        File.Copy(path, copy, overwrite: true);
        return copy;
    }

    private static void AssertCovers(DirtyBitmap bitmap, IEnumerable<(long Offset, long Length)> writes)
    {
        foreach (var (offset, length) in writes)
            for (long g = offset / Granule; g <= (offset + length - 1) / Granule; g++)
                Assert.True(bitmap.Bits.Get(g), $"granule {g} (write at {offset}) is missing from '{bitmap.Name}'");
    }

    [Fact]
    public void AfterACrashTheBitmapLoadsConsistentAndCoversEveryWrite()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        var writes = new List<(long, long)> { (0, 4096), (5 << 20, 70000), ((40 << 20) + 12345, 1) };
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        foreach (var (offset, length) in writes) live.Write(offset, new byte[length]);
        string crashed = CrashCopy(dir, path);

        using (var recovered = OpenCrashSafe(crashed))
        {
            var b = recovered.Bitmaps.Get("b0");
            Assert.False(b.Inconsistent);
            Assert.True(recovered.BitmapsRecoveredFromIntents);
            AssertCovers(b, writes);
            // Only the regions written since the checkpoint: three 1 MiB regions, at most, at 16 granules each.
            Assert.InRange(b.Bits.Count, 4, 3 * Region / Granule + 1);
            var report = recovered.Check(RepairMode.None);
            Assert.True(report.Corruptions == 0, string.Join("\n", report.Messages));
        }
    }

    [Fact]
    public void QemusRuleStaysOnDiskAReadOnlyOpenSeesTheBitmapInconsistent()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        live.Write(0, new byte[512]);
        string crashed = CrashCopy(dir, path);
        using var ro = Qcow2Image.Open(HostFile.Open(crashed, readOnly: true));
        Assert.True(ro.Bitmaps.Get("b0").Inconsistent);
    }

    [Fact]
    public void ABitmapAddedBeforeTheCrashStillExistsAfterIt()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("new", persistent: true, disabled: true);
        live.PersistBitmapChanges();
        using var recovered = OpenCrashSafe(CrashCopy(dir, path));
        var b = recovered.Bitmaps.Get("new");
        Assert.False(b.Inconsistent);
        Assert.False(b.Enabled);
    }

    [Fact]
    public void ACheckpointKeepsOnlyRegionsStillBeingWritten()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        live.Write(0, new byte[100]);
        live.Write(5 * Region, new byte[100]);
        live.CheckpointBitmaps();
        // Written in two epochs in a row, region 0 is hot: writing it again costs no fsync.
        live.Write(100, new byte[100]);
        live.CheckpointBitmaps();
        long persists = live.WriteIntents!.Persists;
        live.Write(200, new byte[100]);
        Assert.Equal(persists, live.WriteIntents.Persists);
        // Two epochs without writes there, and it is dropped.
        live.CheckpointBitmaps();
        live.CheckpointBitmaps();
        Assert.Equal(0, live.WriteIntents.MarkedCount);
        live.Write(9 * Region + 7, new byte[100]);
        Assert.Equal(1, live.WriteIntents.MarkedCount);

        using var recovered = OpenCrashSafe(CrashCopy(dir, path));
        var b = recovered.Bitmaps.Get("b0");
        // The checkpoint's two granules exactly, and region 9 whole from the record.
        Assert.Equal(2 + Region / Granule, b.Bits.Count);
        Assert.True(b.Bits.Get(0) && b.Bits.Get(5 * Region / Granule) && b.Bits.Get(9 * Region / Granule));
    }

    [Fact]
    public void ADisabledBitmapGetsNoIntents()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("on", persistent: true);
        live.Bitmaps.Add("off", persistent: true, disabled: true);
        live.PersistBitmapChanges();
        live.Write(3 * Region, new byte[10]);
        using var recovered = OpenCrashSafe(CrashCopy(dir, path));
        Assert.Equal(Region / Granule, recovered.Bitmaps.Get("on").Bits.Count);
        Assert.Equal(0, recovered.Bitmaps.Get("off").Bits.Count);
    }

    [Fact]
    public void ACleanCloseLeavesAnImageQemuCallsClean()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using (var live = OpenCrashSafe(path))
        {
            live.Bitmaps.Add("b0", persistent: true);
            live.PersistBitmapChanges();
            live.Write(2 * Region, new byte[10]);
        }
        var cluster0 = File.ReadAllBytes(path).AsSpan(0, 65536).ToArray();
        var header = Qcow2Header.Parse(cluster0);
        Assert.Equal(Qcow2AutoclearFeatures.None, header.AutoclearFeatures & WriteIntentRecord.ValidBit);
        Assert.Null(Qcow2HeaderExtensionCodec.Parse(header, cluster0).Find(WriteIntentRecord.ExtensionType));
        using var ro = Qcow2Image.Open(HostFile.Open(path, readOnly: true));
        var b = ro.Bitmaps.Get("b0");
        Assert.False(b.Inconsistent);
        Assert.Equal(1, b.Bits.Count);
    }

    [Fact]
    public void WithoutTheOptionAStrataOpenRecoversOnceThenDropsTheRecord()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        live.Write(0, new byte[10]);
        string crashed = CrashCopy(dir, path);
        using (var plain = Qcow2Image.Open(HostFile.Open(crashed, readOnly: false)))
        {
            Assert.False(plain.Bitmaps.Get("b0").Inconsistent);
            // The record no longer covers what this writer does: the bit that validates it is gone before any write.
            var header = Qcow2Header.Parse(File.ReadAllBytes(crashed).AsSpan(0, 4096));
            Assert.Equal(Qcow2AutoclearFeatures.None, header.AutoclearFeatures & WriteIntentRecord.ValidBit);
        }
    }

    [Fact]
    public async Task ConcurrentWritersAndCheckpointsNeverLoseABit()
    {
        using var dir = new TempDir();
        string path = NewImage(dir, 256 << 20);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        var writes = new System.Collections.Concurrent.ConcurrentBag<(long, long)>();
        using var stop = new CancellationTokenSource();
        var checkpoints = Task.Run(() =>
        {
            while (!stop.IsCancellationRequested) live.CheckpointBitmaps();
        });
        var writers = Enumerable.Range(0, 4).Select(seed => Task.Run(() =>
        {
            var random = new Random(seed);
            var data = new byte[4096];
            for (int i = 0; i < 300; i++)
            {
                long offset = random.NextInt64((256 << 20) - 4096) & ~511L;
                live.Write(offset, data);
                writes.Add((offset, data.Length));
            }
        })).ToArray();
        await Task.WhenAll(writers);
        stop.Cancel();
        await checkpoints;
        using var recovered = OpenCrashSafe(CrashCopy(dir, path));
        AssertCovers(recovered.Bitmaps.Get("b0"), writes);
        var report = recovered.Check(RepairMode.None);
        Assert.True(report.Corruptions == 0, string.Join("\n", report.Messages));
    }

    [Fact]
    public void AResizeReestablishesTheRecordForTheNewSize()
    {
        using var dir = new TempDir();
        string path = NewImage(dir);
        using var live = OpenCrashSafe(path);
        live.Bitmaps.Add("b0", persistent: true);
        live.PersistBitmapChanges();
        live.Resize(128 << 20);
        live.CheckpointBitmaps();
        live.Write(100 << 20, new byte[10]);
        using var recovered = OpenCrashSafe(CrashCopy(dir, path));
        Assert.Equal(128 << 20, recovered.Size);
        Assert.True(recovered.Bitmaps.Get("b0").Bits.Get((100 << 20) / Granule));
    }
}

/// <summary>The intent log alone: group commit and epochs.</summary>
public class WriteIntentLogTests
{
    [Fact]
    public void ARegionIsPersistedOnceAndTheRecordHasItsBit()
    {
        var persisted = new List<byte[]>();
        var log = new WriteIntentLog(16 << 20, 20, persisted.Add);
        log.BeginEpoch(active: true);
        log.MakeDurable(3 << 20, 10);
        log.MakeDurable((3 << 20) + 500, 10);
        Assert.Single(persisted);
        Assert.Equal(1 << 3, persisted[0][0]);
        log.MakeDurable((1 << 20) - 1, 2); // spans regions 0 and 1
        Assert.Equal(2, persisted.Count);
        Assert.Equal(0b1011, persisted[1][0]);
        Assert.Equal(3, log.MarkedCount);
    }

    [Fact]
    public void InactiveLogPersistsNothing()
    {
        int persists = 0;
        var log = new WriteIntentLog(16 << 20, 20, _ => persists++);
        log.MakeDurable(0, 100);
        log.BeginEpoch(active: false);
        log.MakeDurable(0, 100);
        Assert.Equal(0, persists);
    }

    [Fact]
    public void UntilTheCommitTheRecordKeepsTheOldEpochsRegions()
    {
        var persisted = new List<byte[]>();
        var log = new WriteIntentLog(16 << 20, 20, persisted.Add);
        log.BeginEpoch(active: true);
        log.MakeDurable(0, 1);
        log.BeginEpoch(active: true);
        log.MakeDurable(2 << 20, 1);
        Assert.Equal(0b101, persisted[^1][0]); // the header still names the old checkpoint: region 0 must stay
        byte[]? committed = null;
        log.Commit(r => committed = r);
        // Region 0 was written in one epoch only: dropped by the checkpoint.
        Assert.Equal(0b100, committed![0]);
        // Written in two epochs in a row, a region is hot: it stays recorded (no fsync when it is written again).
        log.MakeDurable(4 << 20, 1);
        log.BeginEpoch(active: true);
        log.MakeDurable(4 << 20, 1);
        log.MakeDurable(6 << 20, 1);
        log.BeginEpoch(active: true);
        log.Commit(r => committed = r);
        Assert.Equal(0b10000, committed[0]);
        int before = persisted.Count;
        log.MakeDurable(4 << 20, 1);
        Assert.Equal(before, persisted.Count);
        // After an epoch with no writes there, it is dropped too.
        log.BeginEpoch(active: true);
        log.BeginEpoch(active: true);
        log.Commit(r => committed = r);
        Assert.Equal(0, committed[0]);
    }

    [Fact]
    public void ConcurrentFirstWritesShareFsyncs()
    {
        int persists = 0;
        var log = new WriteIntentLog(1L << 30, 20, _ =>
        {
            Interlocked.Increment(ref persists);
            Thread.Sleep(5);
        });
        log.BeginEpoch(active: true);
        using var start = new Barrier(16);
        var threads = Enumerable.Range(0, 16).Select(t => new Thread(() =>
        {
            start.SignalAndWait();
            for (int i = t; i < 64; i += 16) log.MakeDurable((long)i << 20, 1);
        })).ToList();
        threads.ForEach(t => t.Start());
        threads.ForEach(t => t.Join());
        Assert.Equal(64, log.MarkedCount);
        Assert.True(persists < 64, $"{persists} persists for 64 regions");
    }
}
