using System.Buffers;
using System.IO.Pipelines;
using System.Text;
using System.Text.Json.Nodes;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Daemon;
using Strata.Protocol.Qmp;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

public class QmpFramerTests
{
    private static List<string> Frames(string input)
    {
        var framer = new QmpFramer(maxMessage: 1 << 20, maxDepth: 8);
        var buffer = new ReadOnlySequence<byte>(Encoding.UTF8.GetBytes(input));
        var frames = new List<string>();
        while (framer.TryReadFrame(buffer, out var frame, out var consumed, out var error))
        {
            Assert.Equal(FrameError.None, error);
            frames.Add(Encoding.UTF8.GetString(frame.ToArray()));
            buffer = buffer.Slice(consumed);
        }
        return frames;
    }

    [Fact]
    public void SplitsObjectsSentBackToBackWithoutNewlines() =>
        Assert.Equal(["{\"a\":1}", "{\"b\":[1,{\"c\":\"}\"}]}"], Frames("{\"a\":1}{\"b\":[1,{\"c\":\"}\"}]}"));

    [Fact]
    public void WaitsForTheRestOfASplitObject() => Assert.Empty(Frames("{\"execute\": \"quer"));

    [Fact]
    public void StringsMayHoldBracesQuotesAndEscapes() =>
        Assert.Equal(["{\"a\":\"{[\\\"]}\"}", "{'b':'}\\''}"], Frames("{\"a\":\"{[\\\"]}\"} {'b':'}\\''}"));

    [Fact]
    public void AControlCharacterResetsTheParser() => Assert.Equal(["{\"ok\":1}"], Frames("{\"broken\": [1, 2\u0001{\"ok\":1}"));

    [Fact]
    public void TopLevelScalarsAreFramedSoTheyGetAnErrorReply() => Assert.Equal(["5", "[1]"], Frames("5 [1]"));

    [Fact]
    public void DepthAndSizeLimitsStopTheFramer()
    {
        var framer = new QmpFramer(maxMessage: 64, maxDepth: 8);
        Assert.False(framer.TryReadFrame(new ReadOnlySequence<byte>(Encoding.ASCII.GetBytes(new string('[', 20))), out _, out _, out var deep));
        Assert.Equal(FrameError.TooDeep, deep);
        Assert.False(framer.TryReadFrame(new ReadOnlySequence<byte>(Encoding.ASCII.GetBytes("{\"a\":\"" + new string('x', 100))), out _, out _, out var big));
        Assert.Equal(FrameError.TooLarge, big);
    }
}

/// <summary>QMP sessions over in-memory pipes: protocol rules, and hostile input that must never hurt the daemon.</summary>
public class QmpSessionTests
{
    private sealed class Conversation : IAsyncDisposable
    {
        private readonly Pipe _toServer = new();
        private readonly Pipe _toClient = new();
        private readonly Task _run;
        private readonly StreamReader _reader;

        public Conversation(IQmpBackend backend)
        {
            var session = new QmpSession(backend, _toClient.Writer, new QmpFramer(maxMessage: 1 << 20, maxDepth: 64));
            _run = session.RunAsync(_toServer.Reader, CancellationToken.None);
            _reader = new StreamReader(_toClient.Reader.AsStream(), Encoding.ASCII);
        }

        public Task Completion => _run;

        public async Task SendAsync(byte[] bytes) => await _toServer.Writer.WriteAsync(bytes);

        public Task SendAsync(string text) => SendAsync(Encoding.UTF8.GetBytes(text));

        public async Task<JsonObject?> ReadAsync()
        {
            string? line = await _reader.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(10));
            return line is null ? null : (JsonObject)JsonNode.Parse(line)!;
        }

        public async ValueTask DisposeAsync()
        {
            await _toServer.Writer.CompleteAsync();
            await _run.WaitAsync(TimeSpan.FromSeconds(10));
        }
    }

    private static DaemonBackend NewBackend(TempDir dir, out string image)
    {
        image = dir["d.qcow2"];
        Qcow2Image.Create(image, new Qcow2CreateOptions { Size = 8 << 20 }).Dispose();
        var graph = new BlockGraph();
        graph.Add(new BlockNodeSpec { Driver = "file", NodeName = "f0", Filename = image });
        graph.Add(new BlockNodeSpec { Driver = "qcow2", NodeName = "drive0", FileNodeName = "f0" });
        return new DaemonBackend(graph);
    }

    [Fact]
    public async Task GreetingNegotiationAndIdsFollowQmp()
    {
        using var dir = new TempDir();
        var backend = NewBackend(dir, out _);
        await using var c = new Conversation(backend);
        var greeting = await c.ReadAsync();
        Assert.Equal(7, greeting!["QMP"]!["version"]!["qemu"]!["major"]!.GetValue<int>());
        await c.SendAsync("{\"execute\":\"query-version\"}");
        Assert.Equal("CommandNotFound", (await c.ReadAsync())!["error"]!["class"]!.GetValue<string>());
        await c.SendAsync("{\"execute\":\"qmp_capabilities\",\"id\":{\"x\":[1,\"two\"]}}");
        var ok = await c.ReadAsync();
        Assert.Equal("{\"return\":{},\"id\":{\"x\":[1,\"two\"]}}", ok!.ToJsonString());
        await c.SendAsync("{'execute':'query-version','id':'single-quoted'}");
        Assert.Equal("single-quoted", (await c.ReadAsync())!["id"]!.GetValue<string>());
        await c.SendAsync("{\"execute\":\"qmp_capabilities\"}");
        Assert.Equal("CommandNotFound", (await c.ReadAsync())!["error"]!["class"]!.GetValue<string>());
        backend.Graph.Dispose();
    }

    [Fact]
    public async Task HostileInputGetsErrorsOrAClosedSessionAndNothingElse()
    {
        using var dir = new TempDir();
        var backend = NewBackend(dir, out string image);
        byte[] before = File.ReadAllBytes(image);
        var rng = new Random(12345);
        string[] seeds =
        [
            "{\"execute\":\"block-dirty-bitmap-add\",\"arguments\":{\"node\":\"drive0\",\"name\":\"b\",\"granularity\":99999999999999999999}}",
            "{\"execute\":\"block-dirty-bitmap-merge\",\"arguments\":{\"node\":\"drive0\",\"target\":\"b\",\"bitmaps\":[]}}",
            "{\"execute\":\"block-dirty-bitmap-merge\",\"arguments\":{\"node\":\"drive0\",\"target\":\"b\",\"bitmaps\":[{\"node\":5}]}}",
            "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"qcow2\",\"node-name\":\"q\",\"file\":{\"driver\":\"qcow2\",\"file\":{\"driver\":\"file\"}}}}",
            "{\"execute\":\"blockdev-del\",\"arguments\":{\"node-name\":[]}}",
            "{\"execute\":\"query-named-block-nodes\",\"arguments\":{\"flat\":\"yes\"}}",
            "{\"execute\":null}", "{\"arguments\":{}}", "{}", "[]", "\"str\"", "nul", "{\"execute\":\"quer\xff\"}",
            "{\"execute\":\"x-debug-block-dirty-bitmap-sha256\",\"arguments\":{\"node\":\"drive0\",\"name\":\"\\u0000\"}}",
        ];
        int replies = 0;
        for (int round = 0; round < 300; round++)
        {
            await using var c = new Conversation(backend);
            await c.ReadAsync(); // greeting
            await c.SendAsync("{\"execute\":\"qmp_capabilities\"}");
            await c.ReadAsync();
            byte[] input = Encoding.UTF8.GetBytes(seeds[rng.Next(seeds.Length)]);
            switch (rng.Next(5))
            {
                case 0: input = input[..rng.Next(input.Length)]; break;             // half a message
                case 1: input[rng.Next(input.Length)] = (byte)rng.Next(256); break;  // a flipped byte
                case 2: input = Encoding.ASCII.GetBytes(new string('[', 100) + "1"); break; // too deep
                case 3: input = Encoding.ASCII.GetBytes("{\"execute\":\"query-version\",\"id\":\"" + new string('x', 2 << 20) + "\"}"); break; // too large
            }
            await c.SendAsync(input);
            // A control character resets a parser left waiting by a broken message, as QMP clients do.
            await c.SendAsync("\u0001 {\"execute\":\"query-version\",\"id\":\"probe\"}");
            // Every reply is a JSON object with "return" or "error"; the probe is answered unless the session closed.
            while (await c.ReadAsync() is { } reply)
            {
                replies++;
                Assert.True(reply.ContainsKey("return") || reply.ContainsKey("error"), reply.ToJsonString());
                if (reply["id"]?.ToString() == "probe") break;
            }
        }
        Assert.True(replies > 300);
        // The daemon still serves a fresh session, and the image was never touched.
        await using (var fresh = new Conversation(backend))
        {
            await fresh.ReadAsync();
            await fresh.SendAsync("{\"execute\":\"qmp_capabilities\"}{\"execute\":\"query-named-block-nodes\"}");
            await fresh.ReadAsync();
            Assert.Equal(2, (await fresh.ReadAsync())!["return"]!.AsArray().Count);
        }
        backend.Graph.Dispose();
        var after = File.ReadAllBytes(image);
        Assert.Equal(before.Length, after.Length);
    }
}

public class QmpEventTests
{
    [Fact]
    public async Task EventsReachEveryNegotiatedSessionAndNoOtherWithTimestamps()
    {
        using var dir = new TempDir();
        var backend = new DaemonBackend(new BlockGraph());
        var pipes = Enumerable.Range(0, 3).Select(_ => (In: new Pipe(), Out: new Pipe())).ToList();
        var runs = pipes.Select(p => new QmpSession(backend, p.Out.Writer).RunAsync(p.In.Reader, CancellationToken.None)).ToList();
        var readers = pipes.Select(p => new StreamReader(p.Out.Reader.AsStream(), Encoding.ASCII)).ToList();
        foreach (var r in readers) await r.ReadLineAsync(); // greetings
        for (int i = 0; i < 2; i++) // sessions 0 and 1 negotiate; session 2 stays in negotiation mode
        {
            await pipes[i].In.Writer.WriteAsync(Encoding.ASCII.GetBytes("{\"execute\":\"qmp_capabilities\"}"));
            await readers[i].ReadLineAsync();
        }
        backend.Emit("BLOCK_EXPORT_DELETED", new Strata.Formats.Json.QDict().Add("id", "exp0"));
        for (int i = 0; i < 2; i++)
        {
            var e = JsonNode.Parse((await readers[i].ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(5)))!)!;
            Assert.Equal("BLOCK_EXPORT_DELETED", e["event"]!.GetValue<string>());
            Assert.Equal("exp0", e["data"]!["id"]!.GetValue<string>());
            long seconds = e["timestamp"]!["seconds"]!.GetValue<long>();
            Assert.InRange(seconds, DateTimeOffset.UtcNow.ToUnixTimeSeconds() - 5, DateTimeOffset.UtcNow.ToUnixTimeSeconds() + 1);
            Assert.InRange(e["timestamp"]!["microseconds"]!.GetValue<long>(), 0, 999_999);
        }
        // The third session got nothing: its next line is the reply to its own command.
        await pipes[2].In.Writer.WriteAsync(Encoding.ASCII.GetBytes("{\"execute\":\"query-version\"}"));
        Assert.Contains("CommandNotFound", await readers[2].ReadLineAsync());
        foreach (var p in pipes) await p.In.Writer.CompleteAsync();
        await Task.WhenAll(runs).WaitAsync(TimeSpan.FromSeconds(5));
    }
}
