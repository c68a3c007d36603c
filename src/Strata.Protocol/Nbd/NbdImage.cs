using Strata.Block;
using Strata.Block.Bitmaps;

namespace Strata.Protocol.Nbd;

/// <summary>
/// The nbd protocol driver: a block image whose bytes live in a remote NBD export (QEMU's driver=nbd), so a node
/// can sit on another daemon's disk — backup targets and migration need it. Block status comes from the remote
/// base:allocation context when the server offers it — or, as QEMU's x-dirty-bitmap debugging hook, from another
/// context (qemu:dirty-bitmap:NAME) read as if it were base:allocation: a set bit is a "hole".
/// </summary>
public sealed class NbdImage : BlockImage
{
    private const string Allocation = "base:allocation";
    private readonly NbdClient _client;
    private readonly string _description;
    private readonly bool _readOnly;
    private readonly string _statusContext;

    private NbdImage(NbdClient client, string description, bool readOnly, string statusContext)
    {
        _client = client;
        _statusContext = statusContext;
        _description = description;
        _readOnly = readOnly || client.ReadOnly;
        Bitmaps = new BitmapSet(client.Size, BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (name, _) => $"Can't make bitmap '{name}' persistent in '{description}': Operation not supported",
        };
    }

    public static NbdImage Connect(string? unixPath, string? host, int port, string export, bool readOnly, string? statusContext = null)
    {
        string context = statusContext ?? Allocation;
        try
        {
            var client = unixPath is not null
                ? NbdClient.ConnectUnixAsync(unixPath, export, [context]).GetAwaiter().GetResult()
                : NbdClient.ConnectTcpAsync(host!, port, export, [context]).GetAwaiter().GetResult();
            string where = unixPath is not null ? $"nbd+unix:///{export}?socket={unixPath}" : $"nbd://{host}:{port}/{export}";
            return new NbdImage(client, where, readOnly, context);
        }
        catch (Exception e) when (e is IOException or System.Net.Sockets.SocketException)
        {
            throw new BlockException($"Failed to connect to NBD server: {e.Message}");
        }
    }

    public override string FormatName => "nbd";
    public override long Size => _client.Size;
    public override bool ReadOnly => _readOnly;
    public override string FileName => _description;

    /// <summary>Runs a synchronous client request: the calling thread (a block I/O thread or a job's) sends it and is
    /// woken by the client's reply reader, never by waiting on a task (no thread-pool thread is held for it).</summary>
    private static void Run(Action request)
    {
        try
        {
            request();
        }
        catch (NbdException e)
        {
            throw Failed(e);
        }
    }

    /// <summary>NBD's errnos are Linux's numbers: the server's error stays what it was (EIO, ENOSPC, …).</summary>
    private static BlockIOException Failed(NbdException e) => new($"NBD request failed: {e.Message}", e.Errno == 0 ? 5 : (int)e.Errno);

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        try
        {
            _client.Read(offset, buffer);
        }
        catch (NbdException e)
        {
            throw Failed(e);
        }
    }

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
        try
        {
            _client.Write(offset, data);
        }
        catch (NbdException e)
        {
            throw Failed(e);
        }
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap) => Run(() => _client.WriteZeroes(offset, length, noHole: !mayUnmap));

    protected override void DriverDiscard(long offset, long length) => Run(() => _client.Trim(offset, length));

    protected override void DriverFlush() => Run(_client.Flush);

    public override LayerExtent GetLayerStatus(long offset, long maxLength)
    {
        maxLength = Math.Min(maxLength, Size - offset);
        if (maxLength <= 0) return new LayerExtent(offset, 0, LayerState.Data, -1);
        if (!_client.Contexts.ContainsKey(_statusContext)) return new LayerExtent(offset, maxLength, LayerState.Data, offset);
        IReadOnlyList<(uint Length, uint Flags)> extents = [];
        Run(() => extents = _client.BlockStatus(_statusContext, offset, (uint)Math.Min(maxLength, 1L << 30), reqOne: true));
        if (extents.Count == 0) return new LayerExtent(offset, maxLength, LayerState.Data, offset);
        var (len, flags) = extents[0];
        long length = Math.Clamp(len, 1, maxLength);
        // As QEMU's nbd driver: bytes map to the same offset of the export. NBD_STATE_ZERO reads as zeros; a hole
        // that does not read as zeros is only possible through a non-allocation context (x-dirty-bitmap), and
        // shows as not present there.
        if ((flags & 2) != 0) return new LayerExtent(offset, length, LayerState.Zero, offset);
        if ((flags & 1) != 0 && _statusContext != Allocation) return new LayerExtent(offset, length, LayerState.Unallocated, -1);
        return new LayerExtent(offset, length, LayerState.Data, offset);
    }

    /// <summary>Through x-dirty-bitmap, "not present" means a set bit, not zeros.</summary>
    public override bool ReadsZeroesWhereUnallocated => _statusContext == Allocation;

    public override void Resize(long newSize) => throw new BlockException("Cannot resize an NBD export from the client side");

    public override void Dispose()
    {
        base.Dispose();
        _client.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }
}
