using Strata.Block;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>A safe export delete waits for connections whose client has left, and only for those.</summary>
public class NbdExportLeavingTests
{
    private static NbdExport Export(BlockImage image) => new("e", "e", null, image, writable: false, [], allocationDepth: false);

    [Fact]
    public async Task WaitsUntilLeavingConnectionsAreClosed()
    {
        using var dir = new TempDir();
        using var image = RawImage.Create(dir["d.raw"], 1 << 20);
        var export = Export(image);
        export.Connections = 2;
        export.LeavingConnections = 2;
        var closer = Task.Run(async () =>
        {
            await Task.Delay(100);
            Interlocked.Decrement(ref export.Connections);
            Interlocked.Decrement(ref export.LeavingConnections);
            await Task.Delay(100);
            Interlocked.Decrement(ref export.Connections);
            Interlocked.Decrement(ref export.LeavingConnections);
        });
        await Task.Run(() => export.WaitForLeavingConnections(TimeSpan.FromHours(1))).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(0, Volatile.Read(ref export.Connections));
        await closer;
    }

    [Fact]
    public async Task DoesNotWaitForAClientStillConnected()
    {
        using var dir = new TempDir();
        using var image = RawImage.Create(dir["d.raw"], 1 << 20);
        var export = Export(image);
        export.Connections = 2;
        export.LeavingConnections = 1; // one client is still there: the delete is refused at once, not delayed
        // With an hour's limit a wait would hang the test (the guard below fails it); not waiting returns at once.
        await Task.Run(() => export.WaitForLeavingConnections(TimeSpan.FromHours(1))).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(2, export.Connections);
    }
}
