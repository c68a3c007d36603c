using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup` against a real QEMU virtual machine: qemu-system-x86_64 with the disk on a virtio-blk device,
/// held before its first instruction (-S), so no guest is needed and QMP, jobs and the NBD server are QEMU's own.
/// The VM is restarted between backups and the disk written meanwhile by qemu-io: the persistent bitmap the
/// manager created must carry the changes across, as it does for a VM that reboots.
/// </summary>
public class QemuVmBackupTests : ScratchDirTest
{
    private sealed class Vm : IDisposable
    {
        private readonly Process _process;
        public string QmpPath { get; }

        public Vm(string dir, string disk)
        {
            QmpPath = Path.Combine(dir, "vm.qmp");
            File.Delete(QmpPath);
            var psi = new ProcessStartInfo("qemu-system-x86_64") { RedirectStandardError = true, RedirectStandardOutput = true };
            foreach (var a in new[]
                     {
                         "-M", "q35", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
                         "-blockdev", $"driver=file,node-name=vda-file,filename={disk}", "-blockdev", "driver=qcow2,node-name=vda,file=vda-file",
                         "-device", "virtio-blk-pci,drive=vda,id=virtio0", "-qmp", $"unix:{QmpPath},server=on,wait=off",
                     })
                psi.ArgumentList.Add(a);
            _process = Process.Start(psi)!;
            Listening.WaitForProcess(_process, "qemu-system-x86_64", 30000, QmpPath);
        }

        /// <summary>Shuts the VM down as a management tool would, and waits until it has stored its bitmaps and exited.</summary>
        public async Task QuitAsync()
        {
            await using (var qmp = await QmpClient.ConnectUnixAsync(QmpPath))
                await qmp.ExecuteAsync("quit");
            Assert.True(_process.WaitForExit(30000), "the VM did not exit");
            Assert.Equal(0, _process.ExitCode);
        }

        public void Dispose()
        {
            if (!_process.HasExited)
            {
                _process.Kill();
                _process.WaitForExit();
            }
            _process.Dispose();
        }
    }

    [Theory]
    [InlineData("push")]
    [InlineData("pull")]
    [InlineData("chunks")] // into a chunk repository (on a folder: the S3 runs are in ChunkBackupTests), always pulled
    public async Task AFullAndTwoIncrementalsOfARealVmRestoreEveryPoint(string mode)
    {
        string disk = P("vda.qcow2"), repo = P("repo");
        Tools.QemuImg("create", "-q", "-f", "qcow2", disk, "64M").Ok();
        Tools.QemuIo(disk, ["write -P 0x11 0 8M", "write -P 0x12 40M 1M"]);
        if (mode == "chunks") Tools.StrataCmd("backup", "init", "--chunks", "--chunk-size", "1M", repo).Ok();
        else Tools.StrataCmd("backup", "init", repo).Ok();
        string[] modeOption = mode == "chunks" ? [] : ["--mode", mode];
        var points = new List<(string Id, string Level, string Copy)>();
        for (int round = 0; round < 3; round++)
        {
            // The disk as the VM will see it: every point must restore to exactly this.
            string copy = P($"at-{round}.raw");
            Tools.QemuImg("convert", "-O", "raw", disk, copy).Ok();
            using (var vm = new Vm(Dir, disk))
            {
                var r = Tools.StrataCmd(["backup", "run", "--socket", vm.QmpPath, "--disk", "vda", .. modeOption, "--json", repo]).Ok();
                var point = r.Json()[0];
                points.Add((point.GetProperty("id").GetString()!, point.GetProperty("level").GetString()!, copy));
                await vm.QuitAsync();
            }
            // While the VM is down, writes made through QEMU's block layer land in the persistent bitmap.
            Tools.QemuIo(disk, [$"write -P 0x{0x20 + round:x2} {4 * round + 2}M 256k", $"write -z {24 + round}M 64k"]);
        }
        Assert.Equal(["full", "inc", "inc"], points.Select(p => p.Level));
        foreach (var (id, _, copy) in points)
        {
            string to = P($"restored-{id}.raw");
            Tools.StrataCmd("backup", "restore", "--at", id, "--disk", "vda", "--to", to, repo).Ok();
            Assert.True(File.ReadAllBytes(to).AsSpan().SequenceEqual(File.ReadAllBytes(copy)), $"vda@{id} does not restore to the disk as it was");
        }
        Tools.StrataCmd("backup", "verify", repo).Ok();
        foreach (var f in Directory.EnumerateFiles(repo, "*.qcow2", SearchOption.AllDirectories)) Tools.AssertQemuCheckClean(f);
        // The incrementals copied only what changed between the VM's runs.
        var list = Tools.StrataCmd("backup", "list", "--json", repo).Ok().Json().EnumerateArray().ToArray();
        Assert.All(list.Skip(1), p => Assert.True(p.GetProperty("copied-bytes").GetInt64() <= 2L << 20, p.ToString()));
    }
}
