using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using Strata.Interop.Tests.Infra;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// A client that sends NBD_CMD_DISC, closes its socket and at once deletes the export over QMP (a pull-backup tool
/// ending its run) finds the export free, in qemu-storage-daemon and in strata daemon: the disconnect may still lie
/// unread in the daemon's socket when the QMP command comes.
/// </summary>
public class ExportDeleteAfterDisconnectTests : ScratchDirTest
{
    /// <summary>The shortest honest client: fixed newstyle handshake, NBD_OPT_EXPORT_NAME, NBD_CMD_DISC, close — no
    /// waiting for the server to close its end (QEMU's client and the bench's python client do not wait either).</summary>
    private static void ConnectAndLeave(string socketPath, string export)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(socketPath));
        var greeting = new byte[18];
        Receive(s, greeting); // NBDMAGIC, IHAVEOPT, handshake flags
        Assert.Equal("NBDMAGIC", Encoding.ASCII.GetString(greeting, 0, 8));
        s.Send([0, 0, 0, 3]); // FIXED_NEWSTYLE | NO_ZEROES
        byte[] name = Encoding.UTF8.GetBytes(export);
        var option = new byte[16 + name.Length];
        "IHAVEOPT"u8.CopyTo(option);
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(8), 1); // NBD_OPT_EXPORT_NAME
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(12), (uint)name.Length);
        name.CopyTo(option, 16);
        s.Send(option);
        Receive(s, new byte[10]); // size, transmission flags
        var disc = new byte[28];
        BinaryPrimitives.WriteUInt32BigEndian(disc, 0x25609513);
        BinaryPrimitives.WriteUInt16BigEndian(disc.AsSpan(6), 2); // NBD_CMD_DISC
        s.Send(disc);
    }

    private static void Receive(Socket s, byte[] buffer)
    {
        for (int got = 0; got < buffer.Length;)
        {
            int n = s.Receive(buffer, got, buffer.Length - got, SocketFlags.None);
            Assert.True(n > 0, "the server closed the connection during the handshake");
            got += n;
        }
    }

    [Theory]
    [InlineData("qsd")]
    [InlineData("strata")]
    public async Task AnExportItsLastClientJustLeftIsDeletedSafely(string kind)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["vda"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        for (int round = 0; round < 20; round++)
        {
            await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"t","node-name":"vda","name":"t","writable":true}"""));
            ConnectAndLeave(src.NbdPath, "t");
            await qmp.ExecuteAsync("block-export-del", JsonNode.Parse("""{"id":"t"}"""));
            // Deleted for good: BLOCK_EXPORT_DELETED comes, and the id can be used again in the next round.
            for (int i = 0; i < 200 && (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Count != 1; i++) await Task.Delay(10);
        }
    }
}
