using Strata.Block;
using Strata.Block.Bitmaps;

namespace Strata.Protocol.Nbd;

/// <summary>
/// The nbd protocol driver: a block image whose bytes live in a remote NBD export (QEMU's driver=nbd), so a node
/// can sit on another daemon's disk — backup targets and migration need it. Block status comes from the remote
/// base:allocation context when the server offers it.
/// </summary>
public sealed class NbdImage : BlockImage
{
    private const string Allocation = "base:allocation";
    private readonly NbdClient _client;
    private readonly string _description;
    private readonly bool _readOnly;

    private NbdImage(NbdClient client, string description, bool readOnly)
    {
        _client = client;
        _description = description;
        _readOnly = readOnly || client.ReadOnly;
        Bitmaps = new BitmapSet(client.Size, BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (name, _) => $"Can't make bitmap '{name}' persistent in '{description}': Operation not supported",
        };
    }

    public static NbdImage Connect(string? unixPath, string? host, int port, string export, bool readOnly)
    {
        try
        {
            var client = unixPath is not null
                ? NbdClient.ConnectUnixAsync(unixPath, export, [Allocation]).GetAwaiter().GetResult()
                : NbdClient.ConnectTcpAsync(host!, port, export, [Allocation]).GetAwaiter().GetResult();
            string where = unixPath is not null ? $"nbd+unix:///{export}?socket={unixPath}" : $"nbd://{host}:{port}/{export}";
            return new NbdImage(client, where, readOnly);
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
        if (!_client.Contexts.ContainsKey(Allocation)) return new LayerExtent(offset, maxLength, LayerState.Data, -1);
        IReadOnlyList<(uint Length, uint Flags)> extents = [];
        Run(() => extents = _client.BlockStatus(Allocation, offset, (uint)Math.Min(maxLength, 1L << 30), reqOne: true));
        if (extents.Count == 0) return new LayerExtent(offset, maxLength, LayerState.Data, -1);
        var (len, flags) = extents[0];
        long length = Math.Clamp(len, 1, maxLength);
        // NBD_STATE_ZERO reads as zeros; everything else is data as far as the chain is concerned.
        return new LayerExtent(offset, length, (flags & 2) != 0 ? LayerState.Zero : LayerState.Data, -1);
    }

    public override void Resize(long newSize) => throw new BlockException("Cannot resize an NBD export from the client side");

    public override void Dispose()
    {
        base.Dispose();
        _client.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }
}
