using System.Diagnostics;
using System.Net.Sockets;

namespace Strata.Interop.Tests;

/// <summary>qemu-storage-daemon 7.2.22 (with the fix for CVE-2024-7409) disconnects a client that has not finished
/// negotiating 10 s after it connected; strata daemon does the same, and neither times out a negotiated client.</summary>
public class NbdHandshakeLimitTests : ScratchDirTest
{
    /// <summary>When the daemon closed a connection that took the greeting and said nothing, and whether a client that
    /// negotiated first still reads afterwards.</summary>
    private async Task<(TimeSpan? Closed, bool NegotiatedStillReads)> Idle(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["vda"]);
        await using var negotiated = await Strata.Protocol.Nbd.NbdClient.ConnectUnixAsync(src.NbdPath, "vda");
        using var silent = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var clock = Stopwatch.StartNew();
        await silent.ConnectAsync(new UnixDomainSocketEndPoint(src.NbdPath));
        var sink = new byte[4096];
        TimeSpan? closed = null;
        using (var patience = new CancellationTokenSource(TimeSpan.FromSeconds(25)))
        {
            try
            {
                while (await silent.ReceiveAsync(sink, SocketFlags.None, patience.Token) > 0) { }
                closed = clock.Elapsed;
            }
            catch (OperationCanceledException) { }
            catch (SocketException) { closed = clock.Elapsed; }
        }
        var buf = new byte[4096];
        bool reads;
        try
        {
            await negotiated.ReadAsync(0, buf);
            reads = buf.All(b => b == 0x11);   // the source's first 4 MiB are 0x11
        }
        catch (IOException)
        {
            reads = false;
        }
        return (closed, reads);
    }

    [Fact]
    public async Task AClientThatDoesNotNegotiateIsDisconnectedAfterTenSecondsAsByQemuStorageDaemon()
    {
        // Side by side: each waits out the same 10 s.
        var qemu = Idle("qsd");
        var strata = Idle("strata");
        foreach (var (kind, result) in new[] { ("qsd", await qemu), ("strata", await strata) })
        {
            Assert.True(result.Closed is not null, $"{kind} kept a client that never negotiated for 25 s");
            Assert.InRange(result.Closed!.Value.TotalSeconds, 9.5, 20);
            Assert.True(result.NegotiatedStillReads, $"{kind} dropped a negotiated client");
        }
    }
}
