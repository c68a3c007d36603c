using System.IO.Pipelines;
using System.Net;
using Strata.Block;

namespace Strata.Protocol.Nbd;

/// <summary>The NBD server of a daemon: one listening socket, the export registry, one session per connection.</summary>
public sealed class NbdServer : INbdExportRegistry, IAsyncDisposable
{
    private readonly ConnectionListener _listener;
    private readonly int _maxConnections;
    private readonly object _lock = new();
    private readonly Dictionary<string, NbdExport> _byName = new(StringComparer.Ordinal);

    // Large pipe buffers: NBD moves megabytes per request.
    private static readonly StreamPipeReaderOptions ReaderOptions = new(bufferSize: 1 << 20, minimumReadSize: 64 << 10);
    private static readonly StreamPipeWriterOptions WriterOptions = new(minimumBufferSize: 1 << 20);

    /// <summary>Socket send buffer: room for several read replies, so that a reply's send is taken at once by the
    /// thread that read the data (the default, 208 KiB, is less than one 256 KiB read: each such reply's tail
    /// went out as an asynchronous send — a wake-up of another thread).</summary>
    private const int SendBufferBytes = 4 << 20;

    /// <summary>Connections served on a thread of their own at a time; more are served on the thread pool. QEMU has no
    /// connection limit by default, so without a bound clients could take a thread each.</summary>
    internal const int ConnectionThreads = 256;

    /// <summary>
    /// How long a client may take from connecting to the end of its option haggling (NBD_OPT_GO or EXPORT_NAME)
    /// before it is disconnected: 10 s, as in qemu-storage-daemon since the fix for CVE-2024-7409 (Debian's 7.2.22
    /// has it, without the later knob to change it). A client that connects and never negotiates would otherwise hold
    /// its connection, and one of max-connections, for as long as it likes. Zero or less: no limit (tests).
    /// </summary>
    public TimeSpan HandshakeLimit { get; set; } = TimeSpan.FromSeconds(10);

    private NbdServer(int maxConnections, BlockIoThreads? ioThreads, Func<Func<PipeReader, PipeWriter, IGatheredWriter, CancellationToken, Task>, ConnectionListener> listen)
    {
        _maxConnections = maxConnections;
        _listener = listen((reader, writer, gathered, ct) => new NbdServerSession(this, reader, writer, ioThreads, gathered) { HandshakeLimit = HandshakeLimit }.RunAsync(ct));
    }

    /// <param name="ioThreads">Where requests' image calls run (default: <see cref="BlockIoThreads.Shared"/>).</param>
    public static NbdServer ListenUnix(string path, int maxConnections = 100, BlockIoThreads? ioThreads = null) =>
        new(maxConnections, ioThreads, s => ConnectionListener.Unix(path, 512, maxConnections, s, ReaderOptions, WriterOptions, SendBufferBytes, ConnectionThreads));

    public static NbdServer ListenTcp(string host, int port, int maxConnections = 100, BlockIoThreads? ioThreads = null) =>
        new(maxConnections, ioThreads, s => ConnectionListener.Tcp(host, port, 512, maxConnections, s, ReaderOptions, WriterOptions, SendBufferBytes, ConnectionThreads));

    public EndPoint LocalEndPoint => _listener.LocalEndPoint;

    /// <summary>max-connections 1 turns multi-conn off, as in QEMU.</summary>
    public bool MultiConn => _maxConnections != 1;

    public NbdExport? Find(string name)
    {
        lock (_lock) return _byName.GetValueOrDefault(name);
    }

    public IReadOnlyList<NbdExport> All
    {
        get { lock (_lock) return _byName.Values.ToList(); }
    }

    public void AddExport(NbdExport export)
    {
        lock (_lock)
        {
            if (_byName.ContainsKey(export.Name)) throw new InvalidOperationException($"Block export name '{export.Name}' is already in use");
            _byName[export.Name] = export;
        }
    }

    public void RemoveExport(NbdExport export)
    {
        lock (_lock) _byName.Remove(export.Name);
    }

    public void Start() => _listener.Start();

    public async ValueTask DisposeAsync()
    {
        _listener.Disconnect();
        await _listener.DisposeAsync();
    }
}
