using Strata.Backup;
using Strata.Protocol.Qmp;

namespace Strata.Tests.Protocol;

/// <summary>The client sends qmp_capabilities on connecting and its first commands right behind it, waiting neither
/// for the greeting nor for the negotiation's reply; what goes wrong in the negotiation fails those commands.</summary>
public class QmpClientNegotiationTests
{
    /// <summary>A scripted server (<see cref="ScriptedServer"/>): <paramref name="script"/> gets the connection's input
    /// lines and a way to send a line.</summary>
    private static Task WithServer(Func<StreamReader, Func<string, Task>, Task> script, Func<string, Task> client) =>
        ScriptedServer.RunAsync((input, stream) => script(input, stream.SendLineAsync), client);

    private const string Greeting = "{\"QMP\":{\"version\":{\"qemu\":{\"major\":7,\"minor\":2,\"micro\":0},\"package\":\"\"},\"capabilities\":[]}}";

    [Fact]
    public async Task TheFirstCommandGoesOutBeforeTheGreetingAndTheNegotiationAreAnswered()
    {
        // This server says nothing, not even its greeting, until both lines are in: a client that waited for either
        // would never send its command.
        await WithServer(async (input, send) =>
        {
            var caps = await input.ReadLineAsync();
            var command = await input.ReadLineAsync();
            Assert.Contains("\"qmp_capabilities\"", caps);
            Assert.Contains("\"query-version\"", command);
            await send(Greeting);
            await send("{\"return\":{},\"id\":1}");
            await send("{\"return\":{\"answer\":42},\"id\":2}");
            await input.ReadLineAsync();
        }, async path =>
        {
            await using var client = await QmpClient.ConnectUnixAsync(path).WaitAsync(TimeSpan.FromSeconds(20));
            var reply = await client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(20));
            Assert.Equal(42, reply!["answer"]!.GetValue<int>());
        });
    }

    [Fact]
    public async Task TheGreetingsQemuVersionIsKnownOnceACommandHasCompleted()
    {
        await WithServer(async (input, send) =>
        {
            await input.ReadLineAsync();
            await input.ReadLineAsync();
            await send(Greeting.Replace("\"major\":7,\"minor\":2", "\"major\":9,\"minor\":1"));
            await send("{\"return\":{},\"id\":1}");
            await send("{\"return\":{},\"id\":2}");
            await input.ReadLineAsync();
        }, async path =>
        {
            await using var client = await QmpClient.ConnectUnixAsync(path).WaitAsync(TimeSpan.FromSeconds(20));
            await client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(20));
            Assert.Equal(new Version(9, 1, 0), client.ServerVersion);
        });
    }

    [Theory]
    [InlineData("{\"QMP\":{\"version\":{\"qemu\":{\"micro\":22,\"minor\":2,\"major\":7},\"package\":\"Debian\"},\"capabilities\":[\"oob\"]}}", "7.2.22")]
    [InlineData("{\"QMP\":{\"version\":{\"qemu\":{\"micro\":0,\"minor\":0,\"major\":6}},\"capabilities\":[]}}", "6.0.0")]
    [InlineData("{\"QMP\":{\"capabilities\":[]}}", null)]
    [InlineData("{\"QMP\":{\"version\":{\"qemu\":{\"major\":\"7\",\"minor\":2,\"micro\":0}}}}", null)]
    [InlineData("{\"QMP\":{\"version\":{\"qemu\":{\"major\":-1,\"minor\":2,\"micro\":0}}}}", null)]
    [InlineData("{\"QMP\":{\"version\":{\"qemu\":[7,2,0]}}}", null)]
    [InlineData("{\"QMP\":[]}", null)]
    [InlineData("{\"QMP\":{\"version\":[7,2,0]}}", null)]
    public void AGreetingsVersionIsReadOnlyWhenItIsThreeWholeNumbers(string greeting, string? version) =>
        Assert.Equal(version is null ? null : Version.Parse(version), QmpClient.GreetingVersion(System.Text.Json.Nodes.JsonNode.Parse(greeting)!));

    [Fact]
    public async Task ARefusedNegotiationFailsTheCommandsBehindIt()
    {
        await WithServer(async (input, send) =>
        {
            await send(Greeting);
            await input.ReadLineAsync();
            await send("{\"error\":{\"class\":\"GenericError\",\"desc\":\"negotiation refused here\"},\"id\":1}");
            await input.ReadLineAsync();
            // QEMU answers a command sent before a successful negotiation with CommandNotFound; the caller must hear
            // why the negotiation failed instead.
            await send("{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"Expecting capabilities negotiation with 'qmp_capabilities'\"},\"id\":2}");
            await input.ReadLineAsync();
        }, async path =>
        {
            await using var client = await QmpClient.ConnectUnixAsync(path).WaitAsync(TimeSpan.FromSeconds(20));
            var e = await Assert.ThrowsAsync<QmpException>(() => client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains("negotiation refused here", e.Message);
            Assert.Contains("negotiation refused here", (await Assert.ThrowsAsync<QmpException>(() => client.Negotiated)).Message);
        });
    }

    [Theory]
    [InlineData("{\"hello\":\"world\"}", "not a QMP greeting")]
    [InlineData("SSH-2.0-OpenSSH_9.2", "not a QMP greeting")]
    [InlineData(null, "closed the connection before its QMP greeting")]
    public async Task AServerThatDoesNotGreetLikeQmpFailsTheFirstCommandWithTheReason(string? firstLine, string reason)
    {
        await WithServer(async (input, send) =>
        {
            // Both lines are in before the server says anything (or hangs up).
            await input.ReadLineAsync();
            await input.ReadLineAsync();
            if (firstLine is not null) await send(firstLine);
        }, async path =>
        {
            await using var client = await QmpClient.ConnectUnixAsync(path).WaitAsync(TimeSpan.FromSeconds(20));
            var e = await Assert.ThrowsAsync<QmpGreetingException>(() => client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains(reason, e.Message);
            Assert.Contains(reason, (await Assert.ThrowsAsync<QmpGreetingException>(() => client.Negotiated)).Message);
        });
    }

    [Fact]
    public async Task ABackupSourceThatIsNotQmpIsReportedAsUnreachable()
    {
        // What `backup run --socket` pointed at another service's socket says, on its first query.
        await WithServer(async (input, send) =>
        {
            await input.ReadLineAsync();
            await send("220 mail.example ESMTP");
        }, async path =>
        {
            await using var source = await QmpSource.ConnectAsync(path).WaitAsync(TimeSpan.FromSeconds(20));
            var e = await Assert.ThrowsAsync<BackupException>(() => source.NodesAsync().WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.Contains($"cannot reach QMP at '{path}'", e.Message);
            Assert.Contains("not a QMP greeting", e.Message);
            Assert.Equal(BackupExitCodes.Source, e.ExitCode);
        });
    }

    [Fact]
    public async Task ABackupSourceThatNeverGreetsIsGivenUpOnAfterTheGreetingTimeout()
    {
        // A monitor that already has a client queues the next one without a word (qemu-storage-daemon, QEMU).
        await WithServer(async (input, send) =>
        {
            await input.ReadLineAsync();
            await input.ReadLineAsync();
            await input.ReadLineAsync(); // until the client hangs up
        }, async path =>
        {
            var clock = System.Diagnostics.Stopwatch.StartNew();
            await using var source = await QmpSource.ConnectAsync(path, TimeSpan.FromMilliseconds(300)).WaitAsync(TimeSpan.FromSeconds(20));
            var e = await Assert.ThrowsAsync<BackupException>(() => source.NodesAsync().WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(8), $"gave up after {clock.Elapsed}, not after the 0.3 s asked for");
            Assert.Contains($"QMP at '{path}' accepted the connection but sent no greeting within 0.3 s", e.Message);
            Assert.Contains("another client may be connected to its monitor", e.Hint);
            Assert.Equal(BackupExitCodes.Source, e.ExitCode);
            await Assert.ThrowsAsync<BackupException>(() => source.NegotiatedAsync().WaitAsync(TimeSpan.FromSeconds(20)));
        });
    }

    [Fact]
    public async Task ABackupSourceThatGreetsLateButInTimeIsServed()
    {
        await WithServer(async (input, send) =>
        {
            await input.ReadLineAsync();
            await input.ReadLineAsync();
            await Task.Delay(300);
            await send(Greeting);
            await send("{\"return\":{},\"id\":1}");
            await send("{\"return\":[],\"id\":2}");
            await input.ReadLineAsync();
        }, async path =>
        {
            await using var source = await QmpSource.ConnectAsync(path, TimeSpan.FromSeconds(10)).WaitAsync(TimeSpan.FromSeconds(20));
            Assert.Empty(await source.NodesAsync().WaitAsync(TimeSpan.FromSeconds(20)));
        });
    }
}
