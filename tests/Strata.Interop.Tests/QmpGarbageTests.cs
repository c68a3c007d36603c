using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>Every command the daemon lists, fed nothing, wrong types and unknown arguments: each gets an answer
/// (a result or an error with a class), and the daemon keeps serving the disk and its other clients.</summary>
public class QmpGarbageTests : ScratchDirTest
{
    [Fact]
    public async Task EveryCommandAnswersBadArgumentsWithAnErrorAndTheDaemonKeepsServing()
    {
        using var src = new BackupSourceProcess("strata", Dir, ["vda"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "b" });
        var schema = (await qmp.ExecuteAsync("query-qmp-schema"))!.AsArray();
        var commands = (await qmp.ExecuteAsync("query-commands"))!.AsArray().Select(c => c!["name"]!.GetValue<string>())
            .Where(c => c is not ("quit" or "nbd-server-stop")).ToList();
        Assert.Contains("blockdev-mirror", commands);
        Assert.Contains("x-strata-bitmap-import", commands);
        JsonNode[] garbage = [JsonValue.Create(1)!, JsonValue.Create("x")!, new JsonObject(), new JsonArray(JsonValue.Create(-1)), JsonValue.Create(true)!];
        int answered = 0;
        foreach (var command in commands)
        {
            var info = schema.FirstOrDefault(e => e!["name"]?.GetValue<string>() == command);
            string? argType = info?["arg-type"]?.GetValue<string>();
            var members = schema.FirstOrDefault(e => e!["name"]?.GetValue<string>() == argType)?["members"]?.AsArray()
                .Select(m => m!["name"]!.GetValue<string>()).ToList() ?? [];
            var attempts = new List<JsonObject> { new(), new() { ["no-such-argument"] = 1 } };
            foreach (var member in members)
                foreach (var g in garbage)
                    attempts.Add(new JsonObject { [member] = g.DeepClone() });
            foreach (var args in attempts)
            {
                try
                {
                    await qmp.ExecuteAsync(command, args).WaitAsync(TimeSpan.FromSeconds(20));
                }
                catch (QmpException e)
                {
                    Assert.False(string.IsNullOrEmpty(e.ErrorClass), $"{command} {args.ToJsonString()}: error without a class");
                }
                answered++;
            }
        }
        Assert.True(answered > 100, $"only {answered} attempts");
        // Still serving: QMP, the disk over NBD, and a new client.
        await qmp.ExecuteAsync("query-version");
        await src.CopyAsync("vda", P("after.raw"));
        await using var second = await QmpClient.ConnectUnixAsync(src.QmpPath);
        await second.ExecuteAsync("query-named-block-nodes");
        await qmp.ExecuteAsync("quit");
    }
}
