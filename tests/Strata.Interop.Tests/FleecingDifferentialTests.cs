using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Image fleecing, the same QMP and NBD steps against qemu-storage-daemon and `strata daemon` (our QMP and NBD
/// clients drive both): the frozen view's dirty extents, the data a pull reads while a guest keeps writing,
/// refusals of a second fleecing and of teardown in the wrong order, a client that vanishes mid-pull, a failing
/// fleecing target — each daemon's transcript must be the same, and each must be right on its own.
/// </summary>
public class FleecingDifferentialTests : ScratchDirTest
{
    private static async Task<long> BitmapCount(QmpClient qmp, string name) =>
        (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().First(n => n!["node-name"]!.GetValue<string>() == "src")!["dirty-bitmaps"]!.AsArray()
            .First(b => b!["name"]?.GetValue<string>() == name)!["count"]!.GetValue<long>();

    /// <summary>The guest: seeded random 64 KiB writes, each applied to <paramref name="model"/> once acknowledged.</summary>
    private static async Task Writer(string socket, string export, int seed, int count, byte[] model)
    {
        await using var nbd = await NbdClient.ConnectUnixAsync(socket, export);
        var rng = new Random(seed);
        for (int i = 0; i < count; i++)
        {
            var data = new byte[65536];
            rng.NextBytes(data);
            long at = rng.Next(0, (int)(nbd.Size / 65536)) * 65536L;
            await nbd.WriteAsync(at, data);
            data.CopyTo(model.AsSpan((int)at));
        }
        await nbd.FlushAsync();
    }

    /// <summary>Both recipes; returns the transcript, asserting on the way what must hold for any correct daemon.</summary>
    private async Task<List<string>> Fleece(string kind, string recipe)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var events = new EventLog(qmp);
        var t = new QmpTranscript(qmp);
        string nbd = src.NbdPath;
        await t.Try("block-dirty-bitmap-add", """{"node":"src","name":"b0"}""");
        await src.GuestWritesAsync("src", seed: 1);
        await src.CopyAsync("src", Path.Combine(dir, "freeze.raw"));
        var model = File.ReadAllBytes(Path.Combine(dir, "freeze.raw"));
        t.Add($"b0 count before the freeze: {await BitmapCount(qmp, "b0")}");
        foreach (var name in new[] { "tmp", "tmp2" })
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, name + ".qcow2"), "32M").Exit);
        string guestExport;
        if (recipe == "cbw")
        {
            // The guest's path goes through the filter: its export moves from the node onto the filter.
            await t.Try("block-export-del", """{"id":"guest-src"}""");
            await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tmp\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/tmp.qcow2\"}}");
            await t.Try("blockdev-add", """{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp"}""");
            await t.Try("transaction", """{"actions":[{"type":"block-dirty-bitmap-disable","data":{"node":"src","name":"b0"}},{"type":"block-dirty-bitmap-add","data":{"node":"src","name":"b1"}}]}""");
            await t.Try("block-export-add", """{"type":"nbd","id":"guest","node-name":"cbw","name":"guest","writable":true}""");
            await t.Try("blockdev-add", """{"driver":"snapshot-access","node-name":"acc","file":"cbw"}""");
            await t.Try("block-export-add", """{"type":"nbd","id":"fleece","node-name":"acc","name":"fleece","bitmaps":[{"node":"src","name":"b0"}]}""");
            guestExport = "guest";
            // A second fleecing of the same node, and teardown in the wrong order.
            await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tmp2\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/tmp2.qcow2\"}}");
            await t.Try("blockdev-add", """{"driver":"copy-before-write","node-name":"cbw2","file":"src","target":"tmp2"}""");
            await t.Try("blockdev-del", """{"node-name":"cbw"}""");
            await t.Try("blockdev-del", """{"node-name":"tmp"}""");
            await t.Try("blockdev-del", """{"node-name":"acc"}""");
        }
        else
        {
            await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tmp\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/tmp.qcow2\"},\"backing\":\"src\"}");
            await t.Try("transaction", """{"actions":[{"type":"block-dirty-bitmap-disable","data":{"node":"src","name":"b0"}},{"type":"block-dirty-bitmap-add","data":{"node":"src","name":"b1"}},{"type":"blockdev-backup","data":{"job-id":"fleecing","device":"src","target":"tmp","sync":"none"}}]}""");
            await t.Try("block-export-add", """{"type":"nbd","id":"fleece","node-name":"tmp","name":"fleece","bitmaps":[{"node":"src","name":"b0"}]}""");
            guestExport = "src";
            await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tmp2\",\"file\":{\"driver\":\"file\",\"filename\":\"" + dir + "/tmp2.qcow2\"},\"backing\":\"src\"}");
            await t.Try("blockdev-backup", """{"job-id":"fleecing2","device":"src","target":"tmp2","sync":"none"}""");
            await t.Try("blockdev-del", """{"node-name":"tmp"}""");
        }

        // Pull while the guest writes: exactly the freeze point, and the extents of the frozen bitmap.
        var writer = Writer(nbd, guestExport, seed: 2, count: 200, model);
        // nbdcopy takes the whole frozen view (a full pull) while our client follows the bitmap.
        string nbdcopyOut = Path.Combine(dir, "nbdcopy.raw");
        var nbdcopy = Task.Run(() => Tools.Run("nbdcopy", $"nbd+unix:///fleece?socket={nbd}", nbdcopyOut));
        await using (var client = await NbdClient.ConnectUnixAsync(nbd, "fleece", ["base:allocation", "qemu:dirty-bitmap:b0"]))
        {
            var dirty = await client.ExtentsWithFlagAsync("qemu:dirty-bitmap:b0", 1);
            t.Add("dirty extents of b0: " + string.Join(" ", dirty.Select(d => $"{d.Offset}+{d.Length}")));
            var pulled = await client.ReadAllAsync();
            Assert.True(pulled.AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(dir, "freeze.raw"))), $"{kind}/{recipe}: the pull is the disk at the freeze point");
            // A second client that goes away with reads in flight.
            var rude = await NbdClient.ConnectUnixAsync(nbd, "fleece");
            var inFlight = Enumerable.Range(0, 16).Select(i => rude.ReadAsync(i * (1L << 20), new byte[1 << 20])).ToList();
            await rude.DisposeAsync();
            foreach (var r in inFlight) try { await r; } catch (Exception e) when (e is NbdException or IOException or ObjectDisposedException or OperationCanceledException) { }
            var again = new byte[1 << 20];
            await client.ReadAsync(12L << 20, again);
            Assert.True(again.AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(dir, "freeze.raw")).AsSpan(12 << 20, 1 << 20)), "the export still serves after a client vanished");
        }
        await writer;
        Assert.Equal(0, (await nbdcopy).Exit);
        Assert.True(File.ReadAllBytes(nbdcopyOut).AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(dir, "freeze.raw"))), $"{kind}/{recipe}: nbdcopy pulled the freeze point");

        // Teardown in the right order leaves the node with every write the guest made.
        await t.Try("block-export-del", """{"id":"fleece"}""");
        if (recipe == "cbw")
        {
            await t.Try("blockdev-del", """{"node-name":"acc"}""");
            await t.Try("block-export-del", """{"id":"guest"}""");
            await qmp.ExecuteAsync("query-block-exports");
            for (int i = 0; i < 100 && (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Count > 0; i++) await Task.Delay(20);
            await t.Try("blockdev-del", """{"node-name":"cbw"}""");
            await t.Try("blockdev-del", """{"node-name":"cbw2"}""");
            await t.Try("blockdev-del", """{"node-name":"tmp"}""");
            await t.Try("blockdev-del", """{"node-name":"tmp2"}""");
            await t.Try("block-export-add", """{"type":"nbd","id":"check","node-name":"src","name":"check"}""");
        }
        else
        {
            await t.Try("block-job-cancel", """{"device":"fleecing"}""");
            // fleecing2 goes on running (its target stays in use): only the cancelled job goes.
            await JobWaits.UntilStatus(events, "fleecing", "null");
            for (int i = 0; i < 100 && (await qmp.ExecuteAsync("query-block-exports"))!.AsArray().Count > 1; i++) await Task.Delay(20);
            await t.Try("blockdev-del", """{"node-name":"tmp"}""");
            await t.Try("blockdev-del", """{"node-name":"tmp2"}""");
            await t.Try("block-export-add", """{"type":"nbd","id":"check","node-name":"src","name":"check"}""");
        }
        await using (var check = await NbdClient.ConnectUnixAsync(nbd, "check"))
            Assert.True((await check.ReadAllAsync()).AsSpan().SequenceEqual(model), $"{kind}/{recipe}: every guest write reached the disk");
        // b1 recorded exactly the guest's writes since the freeze: the next incremental is complete.
        t.Add($"b1 count: {await BitmapCount(qmp, "b1")}, b0 count: {await BitmapCount(qmp, "b0")}");
        await qmp.ExecuteAsync("quit");
        return t.Lines;
    }

    [Theory]
    [InlineData("cbw")]
    [InlineData("sync-none")]
    public async Task FleecingBehavesAsInQemuStorageDaemon(string recipe)
    {
        await Differential.AssertSameAsQemu(kind => Fleece(kind, recipe));
    }

    /// <summary>A fleecing target that fails every write (blkdebug, ENOSPC as a full disk would): what the guest's write,
    /// the snapshot's reads and the disk see under each on-cbw-error policy.</summary>
    private async Task<List<string>> FailingTarget(string kind, string policy)
    {
        string dir = Directory.CreateDirectory(P(kind + policy)).FullName;
        using var src = new BackupSourceProcess(kind, dir, ["src"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        var t = new QmpTranscript(qmp);
        await src.CopyAsync("src", Path.Combine(dir, "freeze.raw"));
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Path.Combine(dir, "tmp.qcow2"), "32M").Exit);
        await t.Try("block-export-del", """{"id":"guest-src"}""");
        await t.Try("blockdev-add", "{\"driver\":\"qcow2\",\"node-name\":\"tmp\",\"file\":{\"driver\":\"blkdebug\",\"image\":{\"driver\":\"file\",\"filename\":\"" + dir + "/tmp.qcow2\"},\"inject-error\":[{\"event\":\"write_aio\",\"errno\":28}]}}");
        string policyArg = policy == "default" ? "" : $",\"on-cbw-error\":\"{policy}\"";
        await t.Try("blockdev-add", $$"""{"driver":"copy-before-write","node-name":"cbw","file":"src","target":"tmp"{{policyArg}}}""");
        await t.Try("block-export-add", """{"type":"nbd","id":"guest","node-name":"cbw","name":"guest","writable":true}""");
        await t.Try("blockdev-add", """{"driver":"snapshot-access","node-name":"acc","file":"cbw"}""");
        await t.Try("block-export-add", """{"type":"nbd","id":"fleece","node-name":"acc","name":"fleece"}""");
        var written = Enumerable.Repeat((byte)0xee, 65536).ToArray();
        await using (var guest = await NbdClient.ConnectUnixAsync(src.NbdPath, "guest"))
        {
            try { await guest.WriteAsync(1 << 20, written); t.Add("guest write: ok"); }
            catch (NbdException e) { t.Add($"guest write: errno {e.Errno}"); }
            var now = new byte[65536];
            await guest.ReadAsync(1 << 20, now);
            t.Add("the disk holds the new data: " + now.AsSpan().SequenceEqual(written));
        }
        await using (var fleece = await NbdClient.ConnectUnixAsync(src.NbdPath, "fleece"))
        {
            foreach (long at in new[] { 1L << 20, 13L << 20 })
            {
                var buf = new byte[65536];
                try
                {
                    await fleece.ReadAsync(at, buf);
                    t.Add($"snapshot read at {at}: " + (buf.AsSpan().SequenceEqual(File.ReadAllBytes(Path.Combine(dir, "freeze.raw")).AsSpan((int)at, 65536)) ? "the frozen data" : "other data"));
                }
                catch (NbdException e) { t.Add($"snapshot read at {at}: errno {e.Errno}"); }
            }
        }
        await t.Try("block-export-del", """{"id":"fleece"}""");
        await t.Try("blockdev-del", """{"node-name":"acc"}""");
        await qmp.ExecuteAsync("quit");
        return t.Lines;
    }

    [Theory]
    [InlineData("default")]
    [InlineData("break-snapshot")]
    public async Task AFailingFleecingTargetBehavesAsInQemuStorageDaemon(string policy)
    {
        await Differential.AssertSameAsQemu(kind => FailingTarget(kind, policy));
    }
}
