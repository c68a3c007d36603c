using System.Diagnostics;
using Strata.Block;
using Strata.Block.Filters;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>The NBD server under load over real sockets: blocking image I/O never stalls the rest of the server.</summary>
public class NbdServerLoadTests
{
    /// <summary>Reads wait at a gate: the slowest possible I/O.</summary>
    private sealed class GatedImage(BlockImage child, ManualResetEventSlim gate) : FilterImage(child)
    {
        public int ReadsWaiting;
        public override string FormatName => "gated";

        protected override void DriverRead(long offset, Span<byte> buffer)
        {
            Interlocked.Increment(ref ReadsWaiting);
            gate.Wait();
            Interlocked.Decrement(ref ReadsWaiting);
            base.DriverRead(offset, buffer);
        }
    }

    /// <summary>8 connections with 16 reads each stuck in the image (more than there are I/O threads): a new
    /// connection still completes its handshake at once and has a request refused (EINVAL) at once; when the
    /// image moves again, every stuck read is answered.</summary>
    [Fact]
    public async Task StuckIoOnManyConnectionsDoesNotDelayANewConnection()
    {
        using var dir = new TempDir();
        using var raw = RawImage.Create(dir["d.raw"], 64 << 20);
        raw.Write(0, Enumerable.Repeat((byte)0x3c, 1 << 20).ToArray());
        using var gate = new ManualResetEventSlim();
        var image = new GatedImage(raw, gate);
        var io = new BlockIoThreads("test-io", 0, 64, TimeSpan.FromSeconds(5));
        await using var server = NbdServer.ListenUnix(dir["s.nbd"], maxConnections: 0, ioThreads: io);
        server.AddExport(new NbdExport("e", "e", null, image, writable: false, [], allocationDepth: false));
        server.Start();

        var clients = new List<NbdClient>();
        var reads = new List<Task>();
        try
        {
            for (int c = 0; c < 8; c++) clients.Add(await NbdClient.ConnectUnixAsync(dir["s.nbd"], "e"));
            var sw = Stopwatch.StartNew();
            foreach (var client in clients)
                for (int i = 0; i < 16; i++) reads.Add(client.ReadAsync(i * 65536L, new byte[65536]));
            // 64 reads hold every I/O thread, 64 more wait for one; nothing holds a thread-pool thread.
            Assert.True(SpinWait.SpinUntil(() => image.ReadsWaiting == 64 && io.Queued == 64, 20000),
                $"{image.ReadsWaiting} reads in the image, {io.Queued} queued");
            Assert.Equal(64, io.PeakThreads);
            var loaded = sw.Elapsed;

            await using (var late = await NbdClient.ConnectUnixAsync(dir["s.nbd"], "e").WaitAsync(TimeSpan.FromSeconds(30)))
            {
                var handshake = sw.Elapsed - loaded;
                var e = await Assert.ThrowsAsync<NbdException>(() => late.ReadAsync(late.Size, new byte[1]).WaitAsync(TimeSpan.FromSeconds(30)));
                Assert.Equal(NbdErrno.EINVAL, e.Errno);
                // Generous for a loaded machine; with blocking I/O on the thread pool this took 15 s and more.
                Assert.True(sw.Elapsed < TimeSpan.FromSeconds(5),
                    $"the requests were in after {loaded.TotalMilliseconds:F0} ms, a new handshake took {handshake.TotalMilliseconds:F0} ms, a refusal came after {sw.Elapsed.TotalMilliseconds:F0} ms");
            }
            Assert.All(reads, t => Assert.False(t.IsCompleted));
            gate.Set();
            await Task.WhenAll(reads).WaitAsync(TimeSpan.FromSeconds(30));
        }
        finally
        {
            gate.Set();
            foreach (var c in clients) await c.DisposeAsync();
        }
    }
}
