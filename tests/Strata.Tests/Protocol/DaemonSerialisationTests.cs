using System.Text.Json.Nodes;
using Strata.Block.Filters;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Daemon;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>
/// The daemon's state changes between QMP commands only, as in QEMU's main loop: a mirror's switch-over (run by
/// the job, not by a command) takes the dispatcher's turn to change the export table, and exports added or
/// deleted by commands while it waits are handled, not lost.
/// </summary>
public class DaemonSerialisationTests
{
    private static async Task<JsonNode?> Q(DaemonBackend backend, string command, string json = "{}") =>
        QmpValues.ToNode(await backend.ExecuteAsync(command, JsonNode.Parse(json)!.AsObject(), CancellationToken.None));

    [Fact]
    public async Task ExportsAddedAndDeletedDuringAMirrorSwitchOverAreHeldMovedOrForgotten()
    {
        using var dir = new TempDir();
        const int size = 1 << 20;
        foreach (var f in new[] { "src.qcow2", "tgt.qcow2" }) Qcow2Image.Create(dir[f], new Qcow2CreateOptions { Size = size }).Dispose();
        var graph = new BlockGraph();
        // The mirror's target is a throttle node passing 256 KiB/s (each request pays for the one before), and the
        // copy is write-blocking: once 1 MiB is charged, a guest write stays in flight for 4 s waiting for its copy,
        // and the switch-over waits for it (drain) with the exports held.
        graph.ThrottleGroups["tg"] = new ThrottleGroup("tg", 256 << 10);
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "src-file", Filename = dir["src.qcow2"] });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "vda", FileNodeName = "src-file" });
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "tgt-file", Filename = dir["tgt.qcow2"] });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "tgt", FileNodeName = "tgt-file" });
        graph.Add(new BlockNodeSpec { Driver = "throttle", NodeName = "thr", FileNodeName = "tgt", ThrottleGroup = "tg" });
        var backend = new DaemonBackend(graph);
        var ready = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var completed = new TaskCompletionSource<QDict>(TaskCreationOptions.RunContinuationsAsynchronously);
        using var events = backend.SubscribeEvents(e =>
        {
            if (e["event"] is "BLOCK_JOB_READY") ready.TrySetResult();
            if (e["event"] is "BLOCK_JOB_COMPLETED" or "BLOCK_JOB_CANCELLED") completed.TrySetResult(e);
            return ValueTask.CompletedTask;
        });
        string nbd = dir["nbd.sock"];
        try
        {
            await Q(backend, "nbd-server-start", $"{{\"addr\":{{\"type\":\"unix\",\"data\":{{\"path\":\"{nbd}\"}}}}}}");
            await Q(backend, "block-export-add", "{\"type\":\"nbd\",\"id\":\"e1\",\"node-name\":\"vda\",\"writable\":true}");
            await Q(backend, "block-export-add", "{\"type\":\"nbd\",\"id\":\"e3\",\"node-name\":\"vda\",\"name\":\"e3\"}");
            await Q(backend, "blockdev-mirror", "{\"job-id\":\"m\",\"device\":\"vda\",\"target\":\"thr\",\"sync\":\"full\",\"copy-mode\":\"write-blocking\"}");
            await ready.Task.WaitAsync(TimeSpan.FromSeconds(60));

            await using var c1 = await NbdClient.ConnectUnixAsync(nbd, "vda");
            graph.ThrottleGroups["tg"].Take(size);
            var slowWrite = c1.WriteAsync(0, Enumerable.Repeat((byte)0x11, 64 << 10).ToArray());
            await Task.Delay(500);
            await Q(backend, "job-complete", "{\"id\":\"m\"}");
            await Task.Delay(1000);
            // The switch-over is waiting for the write in flight. Commands still run, and what they do to the
            // source's exports is part of the switch.
            Assert.False(slowWrite.IsCompleted, "the throttled write finished too early for this test to mean anything");
            await Q(backend, "block-export-add", "{\"type\":\"nbd\",\"id\":\"e2\",\"node-name\":\"vda\",\"name\":\"e2\",\"writable\":true}");
            await Q(backend, "block-export-del", "{\"id\":\"e3\"}");
            Assert.Equal(2, (await Q(backend, "query-block-exports"))!.AsArray().Count);
            await using var c2 = await NbdClient.ConnectUnixAsync(nbd, "e2");
            var lateWrite = c2.WriteAsync(512 << 10, Enumerable.Repeat((byte)0x77, 64 << 10).ToArray());

            await slowWrite.WaitAsync(TimeSpan.FromSeconds(30));
            var done = await completed.Task.WaitAsync(TimeSpan.FromSeconds(60));
            Assert.Equal("BLOCK_JOB_COMPLETED", done["event"]);
            Assert.Null(((QDict)done["data"]!)["error"]);
            await lateWrite.WaitAsync(TimeSpan.FromSeconds(30));

            var exports = (await Q(backend, "query-block-exports"))!.AsArray()
                .ToDictionary(e => e!["id"]!.GetValue<string>(), e => e!["node-name"]!.GetValue<string>());
            Assert.Equal(new Dictionary<string, string> { ["e1"] = "thr", ["e2"] = "thr" }, exports);
            // The export added during the switch was held: its write waited and went to the target only.
            var buffer = new byte[64 << 10];
            graph.Find("tgt")!.Image.Read(512 << 10, buffer);
            Assert.All(buffer, b => Assert.Equal(0x77, b));
            graph.Find("vda")!.Image.Read(512 << 10, buffer);
            Assert.All(buffer, b => Assert.Equal(0, b));
            // The write the switch-over waited for reached the target in its last copy.
            graph.Find("tgt")!.Image.Read(0, buffer);
            Assert.All(buffer, b => Assert.Equal(0x11, b));
        }
        finally
        {
            try { await Q(backend, "nbd-server-stop"); } catch (QmpException) { }
            graph.Dispose();
        }
    }

    [Fact]
    public async Task ABitmapImportWithABadAddressLeavesTheBitmapsWaitingAndAFailedOneReleasesThem()
    {
        using var dir = new TempDir();
        Qcow2Image.Create(dir["d.qcow2"], new Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f0", Filename = dir["d.qcow2"] });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "vda", FileNodeName = "f0" });
        var backend = new DaemonBackend(graph);
        try
        {
            const string begin = "{\"node\":\"vda\",\"bitmaps\":[{\"name\":\"m1\",\"granularity\":65536},{\"name\":\"m2\",\"granularity\":65536}]}";
            await Q(backend, "x-strata-bitmap-import-begin", begin);
            var e = await Assert.ThrowsAsync<QmpException>(() => Q(backend, "x-strata-bitmap-import",
                "{\"node\":\"vda\",\"server\":{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"x\"},\"export\":\"vda\"}"));
            Assert.Equal("GenericError", e.ErrorClass);
            Assert.Equal("address resolution failed for 127.0.0.1:x: Servname not supported for ai_socktype", e.Message);
            // Refused before anything was touched: still waiting, so cancel finds them.
            Assert.True(graph.Find("vda")!.Image.Bitmaps.Get("m1").Busy);
            await Q(backend, "x-strata-bitmap-import-cancel", "{\"node\":\"vda\"}");
            Assert.Null(graph.Find("vda")!.Image.Bitmaps.Find("m1"));

            await Q(backend, "x-strata-bitmap-import-begin", begin);
            e = await Assert.ThrowsAsync<QmpException>(() => Q(backend, "x-strata-bitmap-import",
                $"{{\"node\":\"vda\",\"server\":{{\"type\":\"unix\",\"path\":\"{dir["nobody.nbd"]}\"}},\"export\":\"vda\"}}"));
            Assert.Contains("marked inconsistent", e.Message);
            foreach (var name in new[] { "m1", "m2" })
            {
                var b = graph.Find("vda")!.Image.Bitmaps.Get(name);
                Assert.False(b.Busy, $"{name} stayed busy");
                Assert.True(b.Inconsistent);
                await Q(backend, "block-dirty-bitmap-remove", $"{{\"node\":\"vda\",\"name\":\"{name}\"}}");
            }
        }
        finally
        {
            graph.Dispose();
        }
    }
}
