using System.IO.Pipelines;
using System.Net.Sockets;
using System.Text;
using System.Text.Json.Nodes;
using Strata.Formats.Json;
using Strata.Daemon;
using Strata.Protocol.Qmp;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>Whatever a command handler throws is that command's GenericError; the session goes on.</summary>
public class QmpHandlerFailureTests
{
    /// <summary>A backend whose "fail" command throws the exception under test and whose "ok" command answers.</summary>
    private sealed class ThrowingBackend(Func<Exception> failure) : IQmpBackend
    {
        public List<(string Command, Exception Error)> Failures { get; } = new();

        public QDict Version { get; } = new QDict().Add("qemu", new QDict().Add("major", 7).Add("minor", 2).Add("micro", 0)).Add("package", "");

        public ValueTask<object?> ExecuteAsync(string command, JsonObject arguments, CancellationToken cancellationToken) =>
            command == "fail" ? throw failure() : ValueTask.FromResult<object?>(new QDict().Add("fine", true));

        public void CommandFailed(string command, Exception error) => Failures.Add((command, error));

        public IDisposable SubscribeEvents(Func<QDict, ValueTask> onEvent) => new Nothing();

        private sealed class Nothing : IDisposable
        {
            public void Dispose() { }
        }
    }

    public static TheoryData<string> Failures() => new() { "io", "invalid-operation", "null-reference", "canceled", "argument-out-of-range", "aggregate" };

    private static Exception Make(string kind) => kind switch
    {
        "io" => new IOException("Input/output error"),
        "invalid-operation" => new InvalidOperationException("Collection was modified"),
        "null-reference" => new NullReferenceException(),
        // Canceled for a reason of its own (a timeout inside the handler), not because the session is closing.
        "canceled" => new OperationCanceledException("timed out"),
        "argument-out-of-range" => new ArgumentOutOfRangeException("port"),
        _ => new AggregateException(new IOException("inner")),
    };

    [Theory]
    [MemberData(nameof(Failures))]
    public async Task AnyExceptionIsAGenericErrorReplyAndTheSessionKeepsServing(string kind)
    {
        var backend = new ThrowingBackend(() => Make(kind));
        var toServer = new Pipe();
        var toClient = new Pipe();
        var run = new QmpSession(backend, toClient.Writer).RunAsync(toServer.Reader, CancellationToken.None);
        var reader = new StreamReader(toClient.Reader.AsStream(), Encoding.ASCII);
        async Task<JsonObject> Next() => (JsonObject)JsonNode.Parse((await reader.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(10)))!)!;
        await Next(); // greeting
        await toServer.Writer.WriteAsync(Encoding.ASCII.GetBytes("{\"execute\":\"qmp_capabilities\"}{\"execute\":\"fail\",\"id\":1}{\"execute\":\"ok\",\"id\":2}"));
        Assert.True((await Next()).ContainsKey("return"));
        var error = await Next();
        Assert.Equal(1, error["id"]!.GetValue<int>());
        Assert.Equal("GenericError", error["error"]!["class"]!.GetValue<string>());
        Assert.False(string.IsNullOrEmpty(error["error"]!["desc"]!.GetValue<string>()));
        var ok = await Next();
        Assert.Equal(2, ok["id"]!.GetValue<int>());
        Assert.True(ok["return"]!["fine"]!.GetValue<bool>());
        var (command, logged) = Assert.Single(backend.Failures);
        Assert.Equal("fail", command);
        Assert.Equal(Make(kind).GetType(), logged.GetType());
        await toServer.Writer.CompleteAsync();
        await run.WaitAsync(TimeSpan.FromSeconds(10));
    }
}

/// <summary>The client side: lines from a QMP server are bounded as a server bounds its input.</summary>
public class QmpLineReaderTests
{
    private static async Task<List<string?>> ReadAll(string input, int max)
    {
        var pipe = new Pipe();
        await pipe.Writer.WriteAsync(Encoding.UTF8.GetBytes(input));
        await pipe.Writer.CompleteAsync();
        var reader = new QmpLineReader(pipe.Reader, max);
        var lines = new List<string?>();
        while (await reader.ReadLineAsync() is { } line) lines.Add(line);
        return lines;
    }

    [Fact]
    public async Task LinesLoseTheirCrLfAndALastUnterminatedLineIsKept() =>
        Assert.Equal(["{\"a\":1}", "", "{\"b\":\"é\"}", "tail"], await ReadAll("{\"a\":1}\r\n\n{\"b\":\"é\"}\r\ntail", 64));

    [Fact]
    public async Task ALineUpToTheLimitPassesOneByteMoreDoesNot()
    {
        Assert.Equal([new string('x', 64)], await ReadAll(new string('x', 64) + "\n", 64));
        var e = await Assert.ThrowsAsync<QmpLineTooLongException>(() => ReadAll(new string('x', 65) + "\n", 64));
        Assert.Equal(64, e.Limit);
        Assert.Contains("longer than 64 bytes", e.Message);
    }

    [Fact]
    public async Task AnEndlessLineFailsOnceItPassesTheLimitWithoutWaitingForTheEnd()
    {
        var pipe = new Pipe();
        var reader = new QmpLineReader(pipe.Reader, 1000);
        var read = reader.ReadLineAsync().AsTask();
        // The writer never ends the line nor the stream: the reader must give up by itself.
        for (int i = 0; i < 20 && !read.IsCompleted; i++)
        {
            await pipe.Writer.WriteAsync(Encoding.ASCII.GetBytes(new string('y', 100)));
            await Task.Delay(5);
        }
        await Assert.ThrowsAsync<QmpLineTooLongException>(() => read.WaitAsync(TimeSpan.FromSeconds(10)));
    }

    [Fact]
    public async Task QmpClientFailsEveryWaitingCommandWithTheLimitErrorAndLaterOnesAtOnce()
    {
        // A broken server: greeting, capabilities, then one line that never ends (past the 16 MiB input limit).
        await ScriptedServer.RunAsync(async (input, stream) =>
        {
            await stream.SendLineAsync("{\"QMP\":{\"version\":{},\"capabilities\":[]}}");
            await input.ReadLineAsync();
            await stream.SendLineAsync("{\"return\":{},\"id\":1}");
            await input.ReadLineAsync();
            var chunk = Encoding.ASCII.GetBytes("{\"return\":\"" + new string('z', 1 << 20));
            try
            {
                for (int i = 0; i < 64; i++) await stream.WriteAsync(chunk);
            }
            catch (IOException)
            {
                // The client hung up: what it should do.
            }
        }, async path =>
        {
            await using var client = await QmpClient.ConnectUnixAsync(path);
            var e = await Assert.ThrowsAnyAsync<IOException>(() => client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(60)));
            Assert.Contains("longer than", e.Message);
            var again = await Assert.ThrowsAnyAsync<IOException>(() => client.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(10)));
            Assert.Contains("longer than", again.Message);
        });
    }
}

/// <summary>Argument checking with QEMU's words: numbers, socket addresses, the command line's keyval.</summary>
public class ArgumentCheckTests
{
    private static string Error(Action check) => Assert.Throws<QmpException>(check).Message;

    [Theory]
    [InlineData("\"x\"", "Parameter 'g' expects uint64")]
    [InlineData("1.5", "Parameter 'g' expects uint64")]
    [InlineData("18446744073709551616", "Parameter 'g' expects uint64")]
    [InlineData("-1", "Parameter 'g' expects uint32_t")]
    [InlineData("4294967296", "Parameter 'g' expects uint32_t")]
    public void Uint32LikeQemu(string json, string message) =>
        Assert.Equal(message, Error(() => ArgSchema.Validate(JsonNode.Parse($"{{\"g\":{json}}}")!.AsObject(), [new("g", ArgType.UInt32)])));

    [Theory]
    [InlineData("\"1\"")]
    [InlineData("1.0")]
    [InlineData("1e3")]
    [InlineData("9223372036854775808")]
    [InlineData("true")]
    public void Int64LikeQemu(string json) =>
        Assert.Equal("Invalid parameter type for 'speed', expected: integer",
            Error(() => ArgSchema.Validate(JsonNode.Parse($"{{\"speed\":{json}}}")!.AsObject(), [new("speed", ArgType.Int)])));

    [Fact]
    public void UnsignedValuesBuiltByTheCommandLineAreAccepted()
    {
        ArgSchema.Validate(new JsonObject { ["m"] = JsonValue.Create(5L) }, [new("m", ArgType.UInt32)]);
        ArgSchema.Validate(new JsonObject { ["m"] = JsonValue.Create(65535L) }, [new("m", ArgType.UInt16)]);
        Assert.Equal("Parameter 'm' expects uint16_t", Error(() => ArgSchema.Validate(new JsonObject { ["m"] = JsonValue.Create(65536L) }, [new("m", ArgType.UInt16)])));
    }

    [Theory]
    [InlineData("{\"type\":\"inet\"}", "Parameter 'addr.data' is missing")]
    [InlineData("{\"type\":\"inet\",\"data\":{}}", "Parameter 'addr.data.host' is missing")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":1,\"port\":\"1\"}}", "Invalid parameter type for 'addr.data.host', expected: string")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":\"h\",\"port\":\"1\",\"bogus\":1}}", "Parameter 'addr.data.bogus' is unexpected")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":\"h\",\"port\":\"1\",\"to\":\"x\"}}", "Parameter 'addr.data.to' expects uint64")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":\"127.0.0.1\",\"port\":\"x\"}}", "address resolution failed for 127.0.0.1:x: Servname not supported for ai_socktype")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":\"127.0.0.1\",\"port\":\"-1\"}}", "address resolution failed for 127.0.0.1:-1: Servname not supported for ai_socktype")]
    [InlineData("{\"type\":\"inet\",\"data\":{\"host\":\"127.0.0.1\",\"port\":\"70000\"}}", "address resolution failed for 127.0.0.1:70000: port number out of range (0-65535)")]
    [InlineData("{\"type\":\"unix\",\"data\":{\"path\":5}}", "Invalid parameter type for 'addr.data.path', expected: string")]
    [InlineData("{\"type\":\"unix\",\"data\":{\"path\":\"p\",\"abstract\":\"x\"}}", "Invalid parameter type for 'addr.data.abstract', expected: boolean")]
    [InlineData("{\"type\":\"unix\",\"data\":[]}", "Invalid parameter type for 'addr.data', expected: object")]
    [InlineData("{\"type\":\"unix\",\"data\":{\"path\":\"p\"},\"x\":1}", "Parameter 'addr.x' is unexpected")]
    [InlineData("{\"type\":\"bogus\",\"data\":{}}", "Parameter 'type' does not accept value 'bogus'")]
    [InlineData("{\"type\":5,\"data\":{}}", "Invalid parameter type for 'addr.type', expected: string")]
    [InlineData("{\"data\":{}}", "Parameter 'addr.type' is missing")]
    [InlineData("{\"type\":\"fd\",\"data\":{\"str\":\"x\"}}", "only QEMU supports file descriptor passing")]
    public void LegacySocketAddressesAreCheckedAsQemuChecksThem(string json, string message) =>
        Assert.Equal(message, Error(() => SocketAddressArg.ParseLegacy(JsonNode.Parse(json)!.AsObject(), "addr.")));

    [Fact]
    public void ASocketAddressThatIsFine()
    {
        Assert.Equal(new SocketAddressArg(null, "127.0.0.1", 10809), SocketAddressArg.Parse(JsonNode.Parse("{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"10809\",\"numeric\":true}")!.AsObject(), "server."));
        Assert.Equal(new SocketAddressArg("/run/x.nbd", null, 0), SocketAddressArg.Parse(JsonNode.Parse("{\"type\":\"unix\",\"path\":\"/run/x.nbd\"}")!.AsObject(), "server."));
        Assert.StartsWith("UNIX socket path", Error(() => SocketAddressArg.Parse(JsonNode.Parse($"{{\"type\":\"unix\",\"path\":\"/{new string('p', 200)}\"}}")!.AsObject(), "")));
    }

    [Theory]
    [InlineData("--chardev", "socket,id=m,host=127.0.0.1,port=x,server=on,wait=off", "Servname not supported")]
    [InlineData("--chardev", "socket,id=m,host=127.0.0.1,port=99999999999,server=on,wait=off", "port number out of range")]
    public void CommandLineAddressErrorsAreUsageErrors(string option, string value, string expected)
    {
        var e = Assert.Throws<DaemonUsageException>(() => DaemonCommandLine.Parse([option, value, "--monitor", "m"]));
        Assert.StartsWith($"{option} {value}: address resolution failed", e.Message);
        Assert.Contains(expected, e.Message);
    }

    [Fact]
    public void KeyvalIndexesTooBigForAnIntAreNotAList()
    {
        var v = DaemonCommandLine.ParseValue("type=nbd,bitmaps.99999999999=b", "type", "--export");
        Assert.IsType<JsonObject>(v["bitmaps"]);
        Assert.IsType<JsonArray>(DaemonCommandLine.ParseValue("type=nbd,bitmaps.1=b,bitmaps.0=a", "type", "--export")["bitmaps"]);
    }
}
