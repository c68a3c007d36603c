using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using System.Text.Json.Nodes;
using Strata.Block.Bitmaps;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Moving a live disk and its dirty bitmaps from one `strata daemon` to another: under continuous writes the
/// destination ends with every acknowledged write and bitmaps holding exactly the source's bits plus every
/// write made during and after the move (against a model the test keeps); incremental backups go on there
/// without a new full; a source killed at any step leaves the destination complete or clearly inconsistent.
/// </summary>
public class MigrationTests : ScratchDirTest
{
    private const long Size = 64L << 20;

    /// <summary>A strata daemon with QMP and an NBD server; optionally serving disk "vda" from an image.</summary>
    private sealed class Daemon : IDisposable
    {
        public readonly Process Process;
        public readonly string Qmp, Nbd;

        public Daemon(string dir, string name, string? image)
        {
            Qmp = Path.Combine(dir, name + ".qmp");
            Nbd = Path.Combine(dir, name + ".nbd");
            var psi = Tools.StrataStartInfo("daemon");
            psi.RedirectStandardError = psi.RedirectStandardOutput = true;
            psi.UseShellExecute = false;
            if (image is not null)
                foreach (var a in new[] { "--blockdev", $"driver=file,node-name=vda-file,filename={image}", "--blockdev", "driver=qcow2,node-name=vda,file=vda-file",
                             "--export", "type=nbd,id=guest,node-name=vda,name=vda,writable=on" })
                    psi.ArgumentList.Add(a);
            foreach (var a in new[] { "--chardev", $"socket,id=m,path={Qmp},server=on,wait=off", "--monitor", "chardev=m", "--nbd-server", $"addr.type=unix,addr.path={Nbd}" })
                psi.ArgumentList.Add(a);
            Process = Process.Start(psi)!;
            Listening.WaitForProcess(Process, "daemon", 15000, Qmp, Nbd);
        }

        public void Kill()
        {
            Process.Kill();
            Process.WaitForExit();
        }

        public void Dispose()
        {
            if (!Process.HasExited) Process.Kill();
            Process.Dispose();
        }
    }

    /// <summary>What the guest wrote: the bytes of the disk, and a model of each bitmap.</summary>
    private sealed class Model
    {
        public readonly byte[] Disk = new byte[Size];
        public readonly BitmapSet Bitmaps = new(Size, 65536);
        public readonly object Lock = new();

        public void Wrote(long offset, byte[] data)
        {
            lock (Lock)
            {
                data.CopyTo(Disk, offset);
                foreach (var b in Bitmaps.All.Where(b => b.Enabled)) b.MarkDirty(offset, data.Length);
            }
        }
    }

    private static async Task Guest(Func<string> socket, Model model, int seed, CancellationToken stop, int? count = null)
    {
        var rng = new Random(seed);
        NbdClient? nbd = null;
        string? connectedTo = null;
        try
        {
            for (int i = 0; count is null ? !stop.IsCancellationRequested : i < count; i++)
            {
                if (connectedTo != socket())
                {
                    if (nbd is not null)
                    {
                        await nbd.FlushAsync();
                        await nbd.DisposeAsync();
                    }
                    connectedTo = socket();
                    nbd = await NbdClient.ConnectUnixAsync(connectedTo, "vda");
                }
                var data = new byte[4096 * rng.Next(1, 5)];
                rng.NextBytes(data);
                long at = rng.Next(0, (int)(Size / 4096) - 4) * 4096L;
                await nbd!.WriteAsync(at, data);
                model.Wrote(at, data);
            }
        }
        finally
        {
            if (nbd is not null)
            {
                // As a VM does: what the guest flushed must survive its daemon being killed.
                await nbd.FlushAsync();
                await nbd.DisposeAsync();
            }
        }
    }

    private static async Task<string> Sha(QmpClient qmp, string name) =>
        (await qmp.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "vda", name }))!["sha256"]!.GetValue<string>();

    /// <summary>Source A (disk vda with bitmaps, seeded) and an empty destination B, stopped together.</summary>
    private sealed record Pair(Daemon A, Daemon B, Model Model) : IDisposable
    {
        public void Dispose()
        {
            A.Dispose();
            B.Dispose();
        }
    }

    private async Task<Pair> StartSeeded()
    {
        string image = P("a.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, $"{Size}").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x33 0 8M", image).Exit);
        var pair = new Pair(new Daemon(Dir, "a", image), new Daemon(Dir, "b", null), new Model());
        await Seed(pair.A, pair.Model);
        return pair;
    }

    private static async Task Seed(Daemon a, Model model)
    {
        await using var qmp = await QmpClient.ConnectUnixAsync(a.Qmp);
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "bp", persistent = true });
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "bt", granularity = 4096 });
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "bd", granularity = 131072 });
        model.Bitmaps.Add("bp");
        model.Bitmaps.Add("bt", 4096);
        model.Bitmaps.Add("bd", 131072);
        await using (var nbd = await NbdClient.ConnectUnixAsync(a.Nbd, "vda"))
            (await nbd.ReadAllAsync()).CopyTo(model.Disk, 0);
        // Some bits before the move; then bd stops recording (a disabled bitmap keeps its bits and no more).
        await Guest(() => a.Nbd, model, seed: 1, CancellationToken.None, count: 50);
        await qmp.ExecuteAsync("block-dirty-bitmap-disable", new { node = "vda", name = "bd" });
        lock (model.Lock) model.Bitmaps.Disable("bd");
    }

    [Fact]
    public async Task ALiveDiskMovesWithEveryWriteAndExactBitmapsAndBackupsContinueIncrementally()
    {
        using var pair = await StartSeeded();
        var (a, b, model) = pair;
        // A backup chain starts on the source.
        string repo = P("repo");
        Tools.StrataCmd("backup", "init", repo).Ok();
        Tools.StrataCmd("backup", "run", "--socket", a.Qmp, "--disk", "vda", repo).Ok();
        lock (model.Lock) model.Bitmaps.Add("backup"); // tracks what the repository's bitmap must hold from here

        // The guest writes on, through the source, while the disk moves; then through the destination.
        string guestSocket = a.Nbd;
        using var stop = new CancellationTokenSource();
        var guest = Guest(() => guestSocket, model, seed: 2, stop.Token);
        await Task.Delay(300);
        var moved = await Task.Run(() => Tools.StrataCmd("migrate", "--from", a.Qmp, "--to", b.Qmp, "--disk", "vda", "--image", P("b.qcow2"), "--from-nbd", a.Nbd, "--to-nbd", b.Nbd));
        Assert.True(moved.Exit == 0, moved.ToString());
        Assert.Contains("switched over", moved.Stdout);
        await Task.Delay(300);
        guestSocket = b.Nbd;
        await Task.Delay(300);
        stop.Cancel();
        await guest;
        a.Kill(); // the source is gone; nothing may depend on it now

        await using var qmp = await QmpClient.ConnectUnixAsync(b.Qmp);
        await using (var nbd = await NbdClient.ConnectUnixAsync(b.Nbd, "vda"))
        {
            var disk = await nbd.ReadAllAsync();
            Assert.True(disk.AsSpan().SequenceEqual(model.Disk), "every acknowledged write is on the destination");
        }
        var listed = (await qmp.ExecuteAsync("query-named-block-nodes"))!.AsArray().First(n => n!["node-name"]!.GetValue<string>() == "vda")!["dirty-bitmaps"]!.AsArray();
        foreach (var name in new[] { "bp", "bt", "bd" })
        {
            var info = listed.First(x => x!["name"]?.GetValue<string>() == name)!;
            var expect = model.Bitmaps.Get(name);
            Assert.Equal(expect.Granularity, info["granularity"]!.GetValue<long>());
            Assert.Equal(name == "bp", info["persistent"]!.GetValue<bool>());
            Assert.Equal(name != "bd", info["recording"]!.GetValue<bool>());
            Assert.False(info["busy"]!.GetValue<bool>());
            Assert.Equal($"{name}: {expect.CountBytes} {expect.Bits.Sha256()}", $"{name}: {info["count"]} {await Sha(qmp, name)}");
        }

        // Incremental backups continue on the destination: no new full, and the point restores exactly.
        var inc = Tools.StrataCmd("backup", "run", "--socket", b.Qmp, "--disk", "vda", "--json", repo).Ok().Json()[0];
        Assert.Equal("inc", inc.GetProperty("level").GetString());
        string restored = P("restored.raw");
        Tools.StrataCmd("backup", "restore", "--disk", "vda", "--to", restored, repo).Ok();
        Assert.True(File.ReadAllBytes(restored).AsSpan().SequenceEqual(model.Disk), "the incremental taken on the destination restores the disk");
        long dirtyBytes = model.Bitmaps.Get("backup").CountBytes;
        Assert.InRange(inc.GetProperty("copied-bytes").GetInt64(), 1, dirtyBytes);
        await qmp.ExecuteAsync("quit");
    }

    /// <summary>The documented QMP sequence, step by step, with the source killed after <paramref name="killAfter"/>
    /// steps: before the switch-over the disk stays (and restarts) on the source with every write; after it, the
    /// destination has every write and its bitmaps are inconsistent, and it says so.</summary>
    [Theory]
    [InlineData(1)] // mirror started, not ready
    [InlineData(2)] // ready, destination recording
    [InlineData(3)] // switched over, bitmaps not yet moved
    public async Task KillingTheSourceAtAnyStepLeavesTheDestinationCompleteOrClearlyInconsistent(int killAfter)
    {
        using var pair = await StartSeeded();
        var (a, b, model) = pair;
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("b.qcow2"), $"{Size}").Exit);
        await using var qa = await QmpClient.ConnectUnixAsync(a.Qmp);
        await using var qb = await QmpClient.ConnectUnixAsync(b.Qmp);
        var eventsA = new EventLog(qa);
        await qb.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"qcow2\",\"node-name\":\"vda\",\"file\":{\"driver\":\"file\",\"filename\":\"" + P("b.qcow2") + "\"}}"));
        await qb.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"vda","node-name":"vda","name":"vda","writable":true}"""));
        await qa.ExecuteAsync("blockdev-add", JsonNode.Parse("{\"driver\":\"nbd\",\"node-name\":\"dst\",\"export\":\"vda\",\"server\":{\"type\":\"unix\",\"path\":\"" + b.Nbd + "\"}}"));
        // Step 1: the mirror (slowed down, so that it is caught before it is ready).
        await qa.ExecuteAsync("blockdev-mirror", JsonNode.Parse(killAfter == 1
            ? """{"job-id":"m","device":"vda","target":"dst","sync":"full","granularity":4096,"speed":1048576}"""
            : """{"job-id":"m","device":"vda","target":"dst","sync":"full","granularity":4096}"""));
        await Guest(() => a.Nbd, model, seed: 3, CancellationToken.None, count: 40);
        if (killAfter >= 2)
        {
            await eventsA.WaitAsync("BLOCK_JOB_READY");
            await qb.ExecuteAsync("x-strata-bitmap-import-begin", JsonNode.Parse("""{"node":"vda","bitmaps":[{"name":"bp","granularity":65536,"persistent":true},{"name":"bt","granularity":4096},{"name":"bd","granularity":131072,"recording":false}]}"""));
            await Guest(() => a.Nbd, model, seed: 4, CancellationToken.None, count: 40);
        }
        if (killAfter >= 3)
        {
            await qa.ExecuteAsync("job-complete", new { id = "m" });
            Assert.Null((await eventsA.WaitAsync("BLOCK_JOB_COMPLETED"))["data"]!["error"]);
            // Writes through the source's export now land on the destination.
            await Guest(() => a.Nbd, model, seed: 5, CancellationToken.None, count: 40);
            await qa.ExecuteAsync("transaction", JsonNode.Parse("""{"actions":[{"type":"block-dirty-bitmap-disable","data":{"node":"vda","name":"bp"}},{"type":"block-dirty-bitmap-disable","data":{"node":"vda","name":"bt"}}]}"""));
            await qa.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"bm","node-name":"vda","name":"bm","writable":false,"bitmaps":["bp","bt","bd"]}"""));
        }
        a.Kill();

        if (killAfter < 3)
        {
            // Not switched: the destination is not the disk. The source, restarted on its image, has every write.
            try { await qb.ExecuteAsync("x-strata-bitmap-import-cancel", new { node = "vda" }); } catch (QmpException) { Assert.Equal(1, killAfter); }
            await qb.ExecuteAsync("quit");
            using var again = new Daemon(Dir, "a2", P("a.qcow2"));
            await using var nbd = await NbdClient.ConnectUnixAsync(again.Nbd, "vda");
            var disk = await nbd.ReadAllAsync();
            Assert.True(disk.AsSpan().SequenceEqual(model.Disk), "the source kept every acknowledged write");
            return;
        }
        // Switched: the destination has the disk; the bitmaps cannot be had and are marked so, loudly.
        var e = await Assert.ThrowsAsync<QmpException>(() => qb.ExecuteAsync("x-strata-bitmap-import",
            JsonNode.Parse("{\"node\":\"vda\",\"export\":\"bm\",\"server\":{\"type\":\"unix\",\"path\":\"" + a.Nbd + "\"}}")));
        Assert.Contains("marked inconsistent", e.Message);
        Assert.Contains("'bp'", e.Message);
        var listed = (await qb.ExecuteAsync("query-named-block-nodes"))!.AsArray().First(n => n!["node-name"]!.GetValue<string>() == "vda")!["dirty-bitmaps"]!.AsArray();
        Assert.All(listed, x => Assert.True(x!["inconsistent"]?.GetValue<bool>() == true, x!.ToJsonString()));
        await using (var nbd = await NbdClient.ConnectUnixAsync(b.Nbd, "vda"))
        {
            var disk = await nbd.ReadAllAsync();
            Assert.True(disk.AsSpan().SequenceEqual(model.Disk), "the destination has every acknowledged write");
        }
        // An inconsistent bitmap can only be removed; a backup using it is refused.
        await Assert.ThrowsAsync<QmpException>(() => qb.ExecuteAsync("block-dirty-bitmap-clear", new { node = "vda", name = "bp" }));
        await qb.ExecuteAsync("block-dirty-bitmap-remove", new { node = "vda", name = "bp" });
        await qb.ExecuteAsync("quit");
    }

    [Fact]
    public async Task AMirrorThatFailsBeforeTheSwitchLeavesTheSourceAndItsBitmapsUntouched()
    {
        using var pair = await StartSeeded();
        var (a, b, model) = pair;
        await using (var qa = await QmpClient.ConnectUnixAsync(a.Qmp))
        {
            var before = new[] { await Sha(qa, "bp"), await Sha(qa, "bt") };
            // The destination goes away during the copy: the CLI reports, cleans up and the source goes on.
            b.Kill();
            var moved = Tools.StrataCmd("migrate", "--from", a.Qmp, "--to", b.Qmp, "--disk", "vda", "--image", P("b.qcow2"));
            Assert.NotEqual(0, moved.Exit);
            Assert.False(Tools.LooksLikeCrash(moved.Stderr), moved.ToString());
            Assert.Equal(before, new[] { await Sha(qa, "bp"), await Sha(qa, "bt") });
            var nodes = (await qa.ExecuteAsync("query-named-block-nodes"))!.AsArray();
            Assert.True(nodes.First(n => n!["node-name"]!.GetValue<string>() == "vda")!["dirty-bitmaps"]!.AsArray().All(x => x!["busy"]!.GetValue<bool>() == false));
        }
        await Guest(() => a.Nbd, model, seed: 9, CancellationToken.None, count: 20);
        await using var nbd = await NbdClient.ConnectUnixAsync(a.Nbd, "vda");
        var disk = await nbd.ReadAllAsync();
        Assert.True(disk.AsSpan().SequenceEqual(model.Disk));
    }
}
