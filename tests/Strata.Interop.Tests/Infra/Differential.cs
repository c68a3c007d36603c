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

    /// <summary>The whole export, read in 1 MiB requests.</summary>
    public static async Task<byte[]> ReadAllAsync(this NbdClient nbd)
    {
        var data = new byte[nbd.Size];
        for (long pos = 0; pos < nbd.Size; pos += 1 << 20)
            await nbd.ReadAsync(pos, data.AsMemory((int)pos, (int)Math.Min(1 << 20, nbd.Size - pos)));
        return data;
    }
}
