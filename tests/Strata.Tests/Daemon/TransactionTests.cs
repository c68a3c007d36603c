using System.Text.Json.Nodes;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Daemon;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;
using Strata.Tests.Block;

namespace Strata.Tests.Daemon;

/// <summary>
/// transaction in-process, action by action: every action prepares in order, the first failure aborts the prepared
/// ones (newest first) so that nothing of the transaction is left, and a success commits all.
/// </summary>
public sealed class TransactionTests : IDisposable
{
    private const int Cluster = 65536;
    private readonly TempDir _dir = new();
    private readonly DaemonBackend _daemon;
    private readonly BlockNode _disk;

    public TransactionTests()
    {
        foreach (var f in new[] { "disk.qcow2", "target.qcow2" }) Qcow2Image.Create(_dir[f], new Qcow2CreateOptions { Size = 16 * Cluster }).Dispose();
        var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "disk-file", Filename = _dir["disk.qcow2"] });
        _disk = graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "disk", FileNodeName = "disk-file" });
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "target-file", Filename = _dir["target.qcow2"] });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "target", FileNodeName = "target-file" });
        _daemon = new DaemonBackend(graph);
    }

    public void Dispose()
    {
        _daemon.Graph.Dispose();
        _dir.Dispose();
    }

    private object? Qmp(string command, string arguments = "{}") =>
        Task.Run(() => _daemon.ExecuteAsync(command, JsonNode.Parse(arguments)!.AsObject(), CancellationToken.None).AsTask()).GetAwaiter().GetResult();

    private QmpException Refused(string command, string arguments) =>
        Assert.Throws<QmpException>(() => Qmp(command, arguments));

    private string Sha(string bitmap) => (string)((QDict)Qmp("x-debug-block-dirty-bitmap-sha256", $"{{\"node\":\"disk\",\"name\":\"{bitmap}\"}}")!)["sha256"]!;

    private void AddBitmap(string name, bool disabled = false) =>
        Qmp("block-dirty-bitmap-add", $"{{\"node\":\"disk\",\"name\":\"{name}\",\"disabled\":{(disabled ? "true" : "false")}}}");

    private static string Action(string type, string data) => $"{{\"type\":\"{type}\",\"data\":{data}}}";

    private static string Transaction(params string[] actions) => $"{{\"actions\":[{string.Join(',', actions)}]}}";

    [Fact]
    public void AFailedActionLeavesNothingOfTheEarlierOnes()
    {
        AddBitmap("dirty");
        AddBitmap("recording");
        AddBitmap("merged", disabled: true);
        _disk.Image.Write(3 * Cluster, new byte[Cluster]);
        string dirtyBefore = Sha("dirty"), mergedBefore = Sha("merged");
        Assert.NotEqual(dirtyBefore, mergedBefore);

        var e = Refused("transaction", Transaction(
            Action("block-dirty-bitmap-add", "{\"node\":\"disk\",\"name\":\"new\"}"),
            Action("block-dirty-bitmap-merge", "{\"node\":\"disk\",\"target\":\"merged\",\"bitmaps\":[\"dirty\"]}"),
            Action("block-dirty-bitmap-clear", "{\"node\":\"disk\",\"name\":\"dirty\"}"),
            Action("block-dirty-bitmap-disable", "{\"node\":\"disk\",\"name\":\"recording\"}"),
            Action("abort", "{}")));

        Assert.Equal("Transaction aborted using Abort action", e.Message);
        Assert.Null(_disk.Image.Bitmaps.Find("new"));
        Assert.Equal(dirtyBefore, Sha("dirty"));
        Assert.Equal(mergedBefore, Sha("merged"));
        Assert.True(_disk.Image.Bitmaps.Get("recording").Enabled);
    }

    [Fact]
    public void ARemovedBitmapStaysVisibleToLaterActionsAndGoesAtCommit()
    {
        AddBitmap("old");
        AddBitmap("next", disabled: true);
        _disk.Image.Write(5 * Cluster, new byte[Cluster]);
        string oldBits = Sha("old");

        Qmp("transaction", Transaction(
            Action("block-dirty-bitmap-remove", "{\"node\":\"disk\",\"name\":\"old\"}"),
            Action("block-dirty-bitmap-merge", "{\"node\":\"disk\",\"target\":\"next\",\"bitmaps\":[\"old\"]}")));

        Assert.Null(_disk.Image.Bitmaps.Find("old"));
        Assert.Equal(oldBits, Sha("next"));
    }

    [Fact]
    public void GroupedCompletionRefusesAnythingButBackupsAndUndoesTheBackupsBefore()
    {
        var e = Refused("transaction", "{\"actions\":[" +
            Action("blockdev-backup", "{\"job-id\":\"b\",\"device\":\"disk\",\"target\":\"target\",\"sync\":\"full\"}") + "," +
            Action("block-dirty-bitmap-add", "{\"node\":\"disk\",\"name\":\"x\"}") +
            "],\"properties\":{\"completion-mode\":\"grouped\"}}");

        Assert.Equal("Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped", e.Message);
        Assert.Null(_disk.Image.Bitmaps.Find("x"));
        Assert.Empty(_daemon.Jobs.All);
        // The aborted backup let go of its target: nothing uses the node, so it can be deleted.
        Qmp("blockdev-del", "{\"node-name\":\"target\"}");
    }

    [Fact]
    public void ABackupWithABitmapCreatedInTheSameTransactionStartsAtCommit()
    {
        Qmp("transaction", Transaction(
            Action("block-dirty-bitmap-add", "{\"node\":\"disk\",\"name\":\"since-full\"}"),
            Action("blockdev-backup", "{\"job-id\":\"full\",\"device\":\"disk\",\"target\":\"target\",\"sync\":\"full\",\"auto-dismiss\":false}")));

        // Kept after it concludes (auto-dismiss off): a small disk's backup may be over already.
        var job = Assert.Single(_daemon.Jobs.All);
        Assert.Equal("full", job.Id);
        Assert.NotNull(_disk.Image.Bitmaps.Find("since-full"));
        Assert.Equal("Job ID 'full' already in use", Refused("blockdev-backup", "{\"job-id\":\"full\",\"device\":\"disk\",\"target\":\"target\",\"sync\":\"full\"}").Message);
    }

    [Fact]
    public void TwoBackupsWithOneJobIdAreRefusedBeforeEitherStarts()
    {
        var e = Refused("transaction", Transaction(
            Action("blockdev-backup", "{\"job-id\":\"b\",\"device\":\"disk\",\"target\":\"target\",\"sync\":\"full\"}"),
            Action("blockdev-backup", "{\"job-id\":\"b\",\"device\":\"disk\",\"target\":\"target\",\"sync\":\"full\"}")));

        Assert.Equal("Job ID 'b' already in use", e.Message);
        Assert.Empty(_daemon.Jobs.All);
    }

    [Fact]
    public void ASnapshotTakenInAFailedTransactionIsTakenBack()
    {
        string overlay = _dir["overlay.qcow2"];
        Refused("transaction", Transaction(
            Action("blockdev-snapshot-sync", $"{{\"node-name\":\"disk\",\"snapshot-file\":\"{overlay}\",\"snapshot-node-name\":\"top\"}}"),
            Action("abort", "{}")));

        Assert.Null(_daemon.Graph.Find("top"));
        Assert.False(_disk.Image.ReadOnly);
        _disk.Image.Write(0, new byte[512]);
    }

    [Fact]
    public void ASnapshotCommitsWithTheTransaction()
    {
        string overlay = _dir["overlay.qcow2"];
        Qmp("transaction", Transaction(
            Action("block-dirty-bitmap-add", "{\"node\":\"disk\",\"name\":\"b\"}"),
            Action("blockdev-snapshot-sync", $"{{\"node-name\":\"disk\",\"snapshot-file\":\"{overlay}\",\"snapshot-node-name\":\"top\"}}")));

        var top = Assert.IsType<BlockNode>(_daemon.Graph.Find("top"));
        Assert.Same(_disk.Image, top.Image.Backing);
        Assert.True(_disk.Image.ReadOnly);
    }
}
