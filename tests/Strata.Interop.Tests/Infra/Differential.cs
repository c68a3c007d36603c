using System.Text.Json.Nodes;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>What a differential test writes down of one daemon's run: each command's outcome (ok, or error class
/// and message, with the scratch folder's path replaced by DIR) and any observation the test adds.</summary>
public sealed class QmpTranscript(QmpClient qmp, string? dir = null)
{
    public List<string> Lines { get; } = [];

    public async Task<bool> Try(string cmd, string json)
    {
        try
        {
            await qmp.ExecuteAsync(cmd, JsonNode.Parse(json));
            Lines.Add($"{cmd}: ok");
            return true;
        }
        catch (QmpException e)
        {
            Lines.Add($"{cmd}: {e.ErrorClass}: {(dir is null ? e.Message : e.Message.Replace(dir, "DIR"))}");
            return false;
        }
    }

    public void Add(string line) => Lines.Add(line);
}

public static class Differential
{
    /// <summary>Runs a scenario against qemu-storage-daemon, then against strata daemon, and asserts the two
    /// transcripts are the same, showing both whole when they are not.</summary>
    public static async Task AssertSameAsQemu(Func<string, Task<List<string>>> scenario)
    {
        var qemu = await scenario("qsd");
        var strata = await scenario("strata");
        Assert.True(qemu.SequenceEqual(strata), $"qemu-storage-daemon:\n{string.Join("\n", qemu)}\n\nstrata daemon:\n{string.Join("\n", strata)}");
    }

    /// <summary>Runs a QMP scenario against qemu-storage-daemon and then strata daemon, each started with one
    /// placeholder node and reached on a fresh connection; the scenario gets the client and a per-daemon prefix
    /// ("q", "s") for the names it creates, and its transcripts come back for the test to compare.</summary>
    public static async Task<(List<string> Qemu, List<string> Strata)> OnBothDaemons(string dir,
        Func<QmpClient, string, Task<List<string>>> scenario)
    {
        string dummy = Path.Combine(dir, "dummy.qcow2");
        Assert.Equal(0, Infra.Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", dummy, "1M").Exit);
        List<string> qemu, strata;
        using (var qsd = new QsdProcess(dummy, "x", connect: false))
        {
            await using var c = await QmpClient.ConnectUnixAsync(qsd.QmpPath);
            qemu = await scenario(c, "q");
        }
        using (var d = new StrataDaemonProcess(dir, "s", ["--blockdev", "driver=null-co,node-name=x"]))
        {
            await using var c = await QmpClient.ConnectUnixAsync(d.QmpPath);
            strata = await scenario(c, "s");
            Assert.Equal(0, d.WaitForExit());
        }
        return (qemu, strata);
    }

    /// <summary>The whole export, read in 1 MiB requests.</summary>
    public static async Task<byte[]> ReadAllAsync(this NbdClient nbd)
    {
        var data = new byte[nbd.Size];
        for (long pos = 0; pos < nbd.Size; pos += 1 << 20)
            await nbd.ReadAsync(pos, data.AsMemory((int)pos, (int)Math.Min(1 << 20, nbd.Size - pos)));
        return data;
    }
}
