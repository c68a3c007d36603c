using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>Exports past 4 GiB: block status asked for the whole disk at once (length 0xffffffff, as nbdinfo asks)
/// answers as qemu-storage-daemon's does, for allocation and for a dirty bitmap.</summary>
public class LargeExportTests : ScratchDirTest
{
    private async Task<List<string>> Maps(string kind)
    {
        string dir = Directory.CreateDirectory(P(kind)).FullName;
        string image = Path.Combine(dir, "big.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", image, "9G").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x41 5G 1M", "-c", "write -P 0x42 8G 64k", image).Exit);
        using var src = new BackupSourceProcess(kind, dir, ["big"], createImages: false);
        await using (var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath))
        {
            await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "big", name = "b" });
            Assert.Equal(0, Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x43 3G 128k", "-c", "write -z 7G 64k", $"nbd+unix:///big?socket={src.NbdPath}").Exit);
            await qmp.ExecuteAsync("block-dirty-bitmap-disable", new { node = "big", name = "b" });
            await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"ro","node-name":"big","name":"ro","bitmaps":["b"]}"""));
            var log = new List<string>();
            foreach (var map in new[] { "base:allocation", "qemu:dirty-bitmap:b" })
            {
                var r = Tools.Run("nbdinfo", "--map=" + map, $"nbd+unix:///ro?socket={src.NbdPath}");
                Assert.True(r.Exit == 0, r.Stderr);
                log.Add(map + ":\n" + r.Stdout.Trim());
            }
            await qmp.ExecuteAsync("quit");
            return log;
        }
    }

    [Fact]
    public async Task WholeDiskBlockStatusOnANineGigabyteExportMatchesQemuStorageDaemon()
    {
        var qemu = await Maps("qsd");
        var strata = await Maps("strata");
        Assert.Equal(string.Join("\n", qemu), string.Join("\n", strata));
    }

    private string NullMap(string kind, bool readZeroes)
    {
        string sock = P($"{kind}-{readZeroes}.nbd"), qmp = P($"{kind}-{readZeroes}.qmp");
        var psi = kind == "qsd" ? new System.Diagnostics.ProcessStartInfo("qemu-storage-daemon")
            : Tools.StrataStartInfo("daemon");
        foreach (var a in new[] { "--blockdev", $"driver=null-co,node-name=big,size=1099511627776,read-zeroes={(readZeroes ? "on" : "off")}",
                     "--chardev", $"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m",
                     "--nbd-server", $"addr.type=unix,addr.path={sock}", "--export", "type=nbd,id=e,node-name=big,name=big" })
            psi.ArgumentList.Add(a);
        psi.RedirectStandardError = psi.RedirectStandardOutput = true;
        using var p = System.Diagnostics.Process.Start(psi)!;
        // Drain the daemon's output as it comes, so a full pipe never stalls it and a failure can show it.
        var output = new System.Collections.Concurrent.ConcurrentQueue<string>();
        p.OutputDataReceived += (_, e) => { if (e.Data is not null) output.Enqueue(e.Data); };
        p.ErrorDataReceived += (_, e) => { if (e.Data is not null) output.Enqueue(e.Data); };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        string Context() => $"{kind} read-zeroes={readZeroes}, daemon {(p.HasExited ? $"exited {p.ExitCode}" : "running")}: {string.Join('\n', output)}";
        try
        {
            for (int i = 0; i < 750 && !File.Exists(sock) && !p.HasExited; i++) Thread.Sleep(20);
            Assert.True(File.Exists(sock), Context());
            Listening.WaitFor(sock);
            var r = Tools.Run("nbdinfo", "--map", $"nbd+unix:///big?socket={sock}");
            Assert.True(r.Exit == 0, $"nbdinfo: {r.Stderr}\n{Context()}");
            return r.Stdout.Trim();
        }
        finally
        {
            p.Kill();
            p.WaitForExit();
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ANullDiskOfOneTebibyteMapsAsInQemuStorageDaemon(bool readZeroes) =>
        Assert.Equal(NullMap("qsd", readZeroes), NullMap("strata", readZeroes));
}
