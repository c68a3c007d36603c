using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// The seed talk's examples, sent to strata daemon as printed there (paths filled in): a new chain, a new sync
/// point, incrementals, and the multi-drive transaction — with writes over NBD in between. Restoring every
/// point with qemu-img convert gives the disks as they were at each backup.
/// </summary>
public class SeedTalkTests : ScratchDirTest
{
    [Fact]
    public async Task TheTalksExamplesRunAsPrintedAndEveryPointRestores()
    {
        foreach (var n in new[] { "drive0", "drive1" })
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P(n + ".qcow2"), "32M").Exit);
        using var d = new StrataDaemonProcess(Dir, "seed", [
            "--blockdev", $"driver=file,node-name=drive0-file,filename={P("drive0.qcow2")}", "--blockdev", "driver=qcow2,node-name=drive0,file=drive0-file",
            "--blockdev", $"driver=file,node-name=drive1-file,filename={P("drive1.qcow2")}", "--blockdev", "driver=qcow2,node-name=drive1,file=drive1-file",
            "--nbd-server", $"addr.type=unix,addr.path={P("seed.nbd")}",
            "--export", "type=nbd,id=e0,node-name=drive0,writable=on", "--export", "type=nbd,id=e1,node-name=drive1,writable=on"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
        var events = new EventLog(qmp);
        async Task Run(string json)
        {
            var msg = JsonNode.Parse(json)!;
            await qmp.ExecuteAsync(msg["execute"]!.GetValue<string>(), msg["arguments"]?.DeepClone());
            // Every job here runs to completion before the next step (auto-dismiss removes it).
            await JobWaits.UntilNoJobs(events);
        }
        void Guest(string drive, params string[] writes)
        {
            var r = Tools.Run("qemu-io", ["-f", "raw", .. writes.SelectMany(w => new[] { "-c", w }), $"nbd+unix:///{drive}?socket={P("seed.nbd")}"]);
            Assert.True(r.Exit == 0, r.Stderr);
        }
        void Point(string drive, string name) => Assert.Equal(0, Tools.Run("nbdcopy", $"nbd+unix:///{drive}?socket={P("seed.nbd")}", P(name)).Exit);
        void Restores(string image, string point)
        {
            Assert.Equal(0, Tools.Run("qemu-img", "check", P(image)).Exit);
            var cmp = Tools.Run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", P(image), P(point));
            Assert.True(cmp.Exit == 0, $"{image} vs {point}: {cmp.Stdout}");
        }

        Guest("drive0", "write -P 0x01 0 1M", "write -P 0x02 8M 2M");
        Point("drive0", "p0.raw");
        // Example 1: start a new backup chain atomically.
        await Run($$$"""
            { "execute": "transaction",
              "arguments": {
                "actions": [
                  {"type": "block-dirty-bitmap-add",
                   "data": {"node": "drive0", "name": "bitmap0"} },
                  {"type": "drive-backup",
                   "data": {"device": "drive0",
                            "target": "{{{P("full.qcow2")}}}",
                            "sync": "full", "format": "qcow2"} }
                ]
              }
            }
            """);
        Restores("full.qcow2", "p0.raw");

        Guest("drive0", "write -P 0x03 1M 64k");
        Point("drive0", "p1.raw");
        // Example 2: an existing bitmap and a new full backup as a synchronisation point.
        await Run($$$"""
            { "execute": "transaction",
              "arguments": {
                "actions": [
                  {"type": "block-dirty-bitmap-clear",
                    "data": {"node": "drive0", "name": "bitmap0"} },
                  {"type": "drive-backup",
                    "data": {"device": "drive0",
                              "target": "{{{P("new_full_backup.qcow2")}}}",
                              "sync": "full", "format": "qcow2"} }
                ]
              }
            }
            """);
        Restores("new_full_backup.qcow2", "p1.raw");

        // Examples 3 and 4: incrementals, each on top of the previous image.
        string previous = "new_full_backup.qcow2";
        for (int n = 0; n < 3; n++)
        {
            Guest("drive0", $"write -P 0x{0x10 + n:x2} {n * 3 + 2}M 128k", $"write -z {20 + n}M 64k");
            Point("drive0", $"inc{n}.raw");
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P($"inc.{n}.qcow2"), "-b", previous, "-F", "qcow2").Exit);
            await Run($$$"""
                { "execute": "drive-backup",
                  "arguments": {
                    "device": "drive0",
                    "bitmap": "bitmap0",
                    "target": "{{{P($"inc.{n}.qcow2")}}}",
                    "format": "qcow2",
                    "sync": "incremental",
                    "mode": "existing"
                  }
                }
                """);
            Restores($"inc.{n}.qcow2", $"inc{n}.raw");
            previous = $"inc.{n}.qcow2";
        }

        // Multi-drive coherency: both drives backed up at one point in time.
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive1", name = "bitmap1" });
        await qmp.ExecuteAsync("drive-backup", new Dictionary<string, string>
            { ["job-id"] = "d1full", ["device"] = "drive1", ["target"] = P("d1full.qcow2"), ["sync"] = "full", ["format"] = "qcow2" });
        await JobWaits.UntilNoJobs(events);
        Guest("drive0", "write -P 0x41 5M 64k");
        Guest("drive1", "write -P 0x42 6M 64k");
        Point("drive0", "m0.raw");
        Point("drive1", "m1.raw");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("inc0.a.qcow2"), "-b", previous, "-F", "qcow2").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", P("inc1.a.qcow2"), "-b", "d1full.qcow2", "-F", "qcow2").Exit);
        await Run($$$"""
            { "execute": "transaction",
              "arguments": {
                "actions": [
                  { "type": "drive-backup",
                    "data": { "device": "drive0", "bitmap": "bitmap0",
                              "format": "qcow2", "mode": "existing",
                              "sync": "incremental",
                              "target": "{{{P("inc0.a.qcow2")}}}" } },
                  { "type": "drive-backup",
                    "data": { "device": "drive1", "bitmap": "bitmap1",
                              "format": "qcow2", "mode": "existing",
                              "sync": "incremental",
                              "target": "{{{P("inc1.a.qcow2")}}}" } }
                ]
              }
            }
            """);
        Restores("inc0.a.qcow2", "m0.raw");
        Restores("inc1.a.qcow2", "m1.raw");
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, d.WaitForExit());
    }
}
