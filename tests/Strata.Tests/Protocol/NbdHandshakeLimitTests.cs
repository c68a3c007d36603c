using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;

namespace Strata.Tests.Protocol;

/// <summary>A client that does not finish its option haggling within the server's handshake limit is disconnected
/// (qemu-storage-daemon's rule since CVE-2024-7409); one that did is never timed out.</summary>
public class NbdHandshakeLimitTests
{
    // Long enough for the negotiated client's own handshake on a loaded two-core machine running the suite in parallel.
    private static readonly TimeSpan Limit = TimeSpan.FromMilliseconds(1500);

    /// <summary>Reads until the server closes the connection; the time it took, or null if it stayed open.</summary>
    private static async Task<TimeSpan?> UntilClosed(Socket socket, Stopwatch since, TimeSpan patience)
    {
        var sink = new byte[4096];
        using var cts = new CancellationTokenSource(patience);
        try
        {
            while (await socket.ReceiveAsync(sink, SocketFlags.None, cts.Token) > 0) { }
            return since.Elapsed;
        }
        catch (OperationCanceledException)
        {
            return null;
        }
        catch (SocketException)
        {
            return since.Elapsed;   // reset by the server: closed as well
        }
    }

    [Fact]
    public async Task AClientThatNeverNegotiatesOrHagglesTooLongIsDroppedAndANegotiatedOneIsNot()
    {
        await using var served = new ServedQcow2("limit", writable: false, allocationDepth: false, s => s.HandshakeLimit = Limit);

        await using var negotiated = await NbdClient.ConnectUnixAsync(served.Socket, "e");

        // Connects, takes the greeting, says nothing.
        using var silent = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var silentClock = Stopwatch.StartNew();
        await silent.ConnectAsync(new UnixDomainSocketEndPoint(served.Socket));
        var silentClosed = UntilClosed(silent, silentClock, TimeSpan.FromSeconds(10));

        // Sends its flags, then asks for the export list every 100 ms: every read is quick, the haggling is not.
        using var haggler = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        var hagglerClock = Stopwatch.StartNew();
        await haggler.ConnectAsync(new UnixDomainSocketEndPoint(served.Socket));
        var hagglerClosed = UntilClosed(haggler, hagglerClock, TimeSpan.FromSeconds(10));
        var flags = new byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(flags, 3);   // fixed newstyle, no zeroes
        await haggler.SendAsync(flags, SocketFlags.None);
        var list = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(list, NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(list.AsSpan(8), (uint)NbdOption.List);
        while (!hagglerClosed.IsCompleted && hagglerClock.Elapsed < TimeSpan.FromSeconds(10))
        {
            try
            {
                await haggler.SendAsync(list, SocketFlags.None);
            }
            catch (SocketException)
            {
                break;   // the server closed the connection under our feet
            }
            await Task.Delay(100);
        }

        var silentAfter = await silentClosed;
        var hagglerAfter = await hagglerClosed;
        Assert.True(silentAfter is not null, "a client that never negotiated was not disconnected");
        Assert.True(hagglerAfter is not null, "a client still haggling past the limit was not disconnected");
        Assert.True(silentAfter >= Limit - TimeSpan.FromMilliseconds(50), $"disconnected after {silentAfter}, before the limit");
        Assert.True(hagglerAfter >= Limit - TimeSpan.FromMilliseconds(50), $"disconnected after {hagglerAfter}, before the limit");

        // The negotiated client sat idle through all of it and still reads.
        var buf = new byte[4096];
        await negotiated.ReadAsync(0, buf);
        Assert.All(buf, b => Assert.Equal(ServedQcow2.Fill, b));
    }
}
