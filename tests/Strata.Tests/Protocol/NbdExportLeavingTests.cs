using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>A safe export delete waits for connections whose client has left, and for a client still connected only
/// a moment (its disconnect may not have been read yet).</summary>
public class NbdExportLeavingTests
{
    /// <summary>An export of a 1 MiB disk in memory with <paramref name="connections"/> open, <paramref name="leaving"/>
    /// of them leaving.</summary>
    private static NbdExport Export(int connections, int leaving) =>
        new("e", "e", null, new MemoryImage(1 << 20), writable: false, [], allocationDepth: false)
        {
            Connections = connections,
            LeavingConnections = leaving,
        };

    [Fact]
    public async Task WaitsUntilLeavingConnectionsAreClosed()
    {
        var export = Export(connections: 2, leaving: 2);
        var closer = Task.Run(async () =>
        {
            await Task.Delay(100);
            Interlocked.Decrement(ref export.Connections);
            Interlocked.Decrement(ref export.LeavingConnections);
            await Task.Delay(100);
            Interlocked.Decrement(ref export.Connections);
            Interlocked.Decrement(ref export.LeavingConnections);
        });
        await Task.Run(() => export.WaitForLeavingConnections(TimeSpan.FromHours(1), unread: TimeSpan.Zero)).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(0, Volatile.Read(ref export.Connections));
        await closer;
    }

    [Fact]
    public async Task WaitsForAClientStillConnectedOnlyForItsUnreadDisconnect()
    {
        var export = Export(connections: 2, leaving: 1); // one client is still there: the delete is refused after the grace, not an hour
        var waited = System.Diagnostics.Stopwatch.StartNew();
        await Task.Run(() => export.WaitForLeavingConnections(TimeSpan.FromHours(1), unread: TimeSpan.FromMilliseconds(200))).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(2, export.Connections);
        Assert.InRange(waited.ElapsedMilliseconds, 150, 30_000);
    }

    [Fact]
    public async Task AClientWhoseDisconnectIsReadWithinTheGraceIsWaitedFor()
    {
        var export = Export(connections: 1, leaving: 0);
        // Threads of their own, not the pool's: with the other test classes running, a pool thread for the reader's
        // next step came later than the whole grace (CI saw the wait give up at 999 ms), which is not what is tested.
        var reader = Task.Factory.StartNew(() =>
        {
            Thread.Sleep(50);
            Interlocked.Increment(ref export.LeavingConnections); // the reader sees NBD_CMD_DISC
            Thread.Sleep(1500); // longer than the grace: from here on the 30 s limit counts
            Interlocked.Decrement(ref export.Connections);
            Interlocked.Decrement(ref export.LeavingConnections);
        }, TaskCreationOptions.LongRunning);
        await Task.Factory.StartNew(() => export.WaitForLeavingConnections(TimeSpan.FromSeconds(30), unread: TimeSpan.FromSeconds(1)), TaskCreationOptions.LongRunning)
            .WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(0, Volatile.Read(ref export.Connections));
        await reader;
    }
}
