using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Buffers.Binary;
using System.Diagnostics;
using Strata.Block;
using Strata.Cli.Io;

namespace Strata.Interop.Tests;

/// <summary>
/// A child process writes a deterministic stream through Strata's qcow2 driver (allocating clusters, growing L2
/// and refcount structures) and is killed with SIGKILL at a random moment. After each kill qemu-img check must
/// find no corruption (leaks are allowed) and every sector must hold the data of the last write flushed before
/// the kill, or of a later write to it: nothing flushed is lost.
/// </summary>
public class CrashSafetyTests
{
    public static TheoryData<int, int> Cases => new() { { 512, 1 }, { 512, 2 }, { 4096, 3 }, { 65536, 4 }, { 65536, 5 } };

    [Theory]
    [MemberData(nameof(Cases))]
    public void KilledWriterLeavesAConsistentImage(int clusterSize, int seed)
    {
        string dir = Directory.CreateTempSubdirectory("strata-crash-").FullName;
        try
        {
            var rng = new Random(seed * 7919);
            for (int round = 0; round < 3; round++)
            {
                string path = Path.Combine(dir, $"crash-{round}.qcow2");
                long size = 32 << 20;
                Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", path, size.ToString()).Exit);
                int streamSeed = seed * 100 + round;
                var (flushed, ranLong) = RunAndKill(path, streamSeed, flushEvery: 25, killAfterMs: rng.Next(150, 900));
                Assert.True(ranLong, "the writer must still be running when it is killed");

                var check = Tools.Run("qemu-img", "check", "--output=json", path);
                Assert.True(check.Exit is 0 or 3, $"qemu-img check exit {check.Exit}: {check.Stdout}{check.Stderr}");
                Assert.DoesNotContain("\"corruptions\"", check.Stdout);

                VerifyContent(path, streamSeed, size, flushed);
            }
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void KilledWriterLeavesItsBitmapsInconsistentNotStale()
    {
        string dir = Directory.CreateTempSubdirectory("strata-crash-").FullName;
        try
        {
            string path = Path.Combine(dir, "bm.qcow2");
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", path, "32M").Exit);
            Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", path, "b0").Exit);
            RunAndKill(path, seed: 99, flushEvery: 25, killAfterMs: 300);
            var check = Tools.Run("qemu-img", "check", path);
            Assert.True(check.Exit is 0 or 3, check.Stdout + check.Stderr);
            Assert.Contains("in-use", Tools.Run("qemu-img", "info", path).Stdout);
            using var image = ImageOpener.Open(path, "qcow2");
            Assert.True(image.Bitmaps.Get("b0").Inconsistent);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static (long Flushed, bool RanLong) RunAndKill(string path, int seed, int flushEvery, int killAfterMs)
    {
        var psi = Tools.StrataStartInfo();
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        foreach (var a in new[] { "io", "-f", "qcow2", "-c", $"x-stress {seed} {flushEvery}", path }) psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        long flushed = 0;
        var reader = Task.Run(() =>
        {
            string? line;
            while ((line = p.StandardOutput.ReadLine()) is not null)
                if (line.StartsWith("flushed ", StringComparison.Ordinal))
                    Interlocked.Exchange(ref flushed, long.Parse(line[8..]));
        });
        var stderr = p.StandardError.ReadToEndAsync();
        // Wait until writing has begun (first flush), then let it run a random while before the kill.
        var sw = Stopwatch.StartNew();
        while (Interlocked.Read(ref flushed) == 0 && !p.HasExited && sw.ElapsedMilliseconds < 20000) Thread.Sleep(5);
        Thread.Sleep(killAfterMs);
        bool running = !p.HasExited;
        if (running) p.Kill(); // SIGKILL
        p.WaitForExit();
        reader.Wait();
        Assert.True(running, "writer exited early: " + stderr.Result);
        return (Interlocked.Read(ref flushed), running);
    }

    private static void VerifyContent(string path, int seed, long size, long flushed)
    {
        // Replay the plan: for every sector, the write that was current at the flush point and the later ones.
        long sectors = size / 512;
        var atFlush = new long[sectors];
        var later = new Dictionary<long, HashSet<long>>();
        foreach (var w in StressWriter.Plan(seed, size))
        {
            if (w.Sequence > flushed + 2000) break;
            long stamp = w.Zero ? 0 : w.Sequence;
            for (long s = w.Offset / 512; s < (w.Offset + w.Length) / 512; s++)
            {
                if (w.Sequence <= flushed) atFlush[s] = stamp;
                else (later.TryGetValue(s, out var set) ? set : later[s] = new HashSet<long>()).Add(stamp);
            }
        }
        using var image = ImageOpener.Open(path, "qcow2");
        var buf = new byte[1 << 20];
        for (long off = 0; off < size; off += buf.Length)
        {
            image.Read(off, buf);
            for (int i = 0; i < buf.Length; i += 512)
            {
                long sector = (off + i) / 512;
                long stamp = BinaryPrimitives.ReadInt64LittleEndian(buf.AsSpan(i));
                for (int k = 8; k < 512; k += 8)
                    Assert.True(BinaryPrimitives.ReadInt64LittleEndian(buf.AsSpan(i + k)) == stamp, $"sector {sector} is torn");
                bool ok = stamp == atFlush[sector] || (later.TryGetValue(sector, out var set) && set.Contains(stamp));
                Assert.True(ok, $"sector {sector} holds write {stamp}; flushed state says {atFlush[sector]} (flushed up to {flushed})");
            }
        }
    }
}
