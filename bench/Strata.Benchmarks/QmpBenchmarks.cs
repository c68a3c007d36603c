using System.Buffers;
using System.IO.Pipelines;
using System.Text;
using BenchmarkDotNet.Attributes;
using Strata.Block.Graph;
using Strata.Daemon;
using Strata.Protocol.Qmp;

namespace Strata.Benchmarks;

/// <summary>QMP framing alone, and whole commands through a session and the dispatcher over an in-memory pipe.</summary>
[MemoryDiagnoser]
public class QmpBenchmarks
{
    private const int Batch = 1000;
    private ReadOnlySequence<byte> _messages;
    private readonly QmpFramer _framer = new();
    private Pipe _in = null!, _out = null!;
    private Task _session = null!;
    private byte[] _queries = [];
    private BlockGraph _graph = null!;

    [GlobalSetup]
    public void Setup()
    {
        var one = "{\"execute\":\"block-dirty-bitmap-add\",\"arguments\":{\"node\":\"drive0\",\"name\":\"b\",\"granularity\":65536},\"id\":42}";
        _messages = new ReadOnlySequence<byte>(Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat(one, Batch))));
        _graph = new BlockGraph();
        _graph.Add(new BlockNodeSpec { Driver = "null-co", NodeName = "drive0", Size = 1L << 30 });
        var backend = new DaemonBackend(_graph);
        // No back-pressure: the benchmark writes a whole batch before it reads the replies.
        _in = new Pipe(new PipeOptions(pauseWriterThreshold: 0));
        _out = new Pipe(new PipeOptions(pauseWriterThreshold: 0));
        _session = new QmpSession(backend, _out.Writer).RunAsync(_in.Reader, CancellationToken.None);
        _in.Writer.WriteAsync(Encoding.ASCII.GetBytes("{\"execute\":\"qmp_capabilities\"}")).AsTask().Wait();
        ReadLines(2); // greeting + reply
        _queries = Encoding.ASCII.GetBytes(string.Concat(Enumerable.Repeat("{\"execute\":\"x-debug-block-dirty-bitmap-sha256\",\"arguments\":{\"node\":\"drive0\",\"name\":\"q\"}}", Batch)));
        _in.Writer.WriteAsync(Encoding.ASCII.GetBytes("{\"execute\":\"block-dirty-bitmap-add\",\"arguments\":{\"node\":\"drive0\",\"name\":\"q\"}}")).AsTask().Wait();
        ReadLines(1);
    }

    private void ReadLines(int count)
    {
        int seen = 0;
        while (seen < count)
        {
            var result = _out.Reader.ReadAsync().AsTask().Result;
            var buffer = result.Buffer;
            SequencePosition? pos;
            while (seen < count && (pos = buffer.PositionOf((byte)'\n')) is { } p)
            {
                buffer = buffer.Slice(buffer.GetPosition(1, p));
                seen++;
            }
            _out.Reader.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    [GlobalCleanup]
    public void Cleanup()
    {
        _in.Writer.Complete();
        _session.Wait();
        _graph.Dispose();
    }

    [Benchmark(Description = "frame one QMP command", OperationsPerInvoke = Batch)]
    public int Frame()
    {
        var buffer = _messages;
        int n = 0;
        while (_framer.TryReadFrame(buffer, out _, out var consumed, out _))
        {
            buffer = buffer.Slice(consumed);
            n++;
        }
        return n;
    }

    [Benchmark(Description = "command round trip through session + dispatcher (sha256 of an empty 1 GiB bitmap)", OperationsPerInvoke = Batch)]
    public void RoundTrip()
    {
        _in.Writer.WriteAsync(_queries).AsTask().Wait();
        ReadLines(Batch);
    }
}
