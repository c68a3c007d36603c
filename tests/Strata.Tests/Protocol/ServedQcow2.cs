using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>A 4 MiB qcow2 whose first 64 KiB hold 0x42, exported as "e" by an NBD server (no connection limit) on the
/// unix socket <see cref="Socket"/>: what the server tests that throw hostile clients at it stand on.</summary>
internal sealed class ServedQcow2 : IAsyncDisposable
{
    public const byte Fill = 0x42;

    private readonly TempDir _dir = new();
    public BlockImage Image { get; }
    public NbdServer Server { get; }
    public string Socket => _dir["s.nbd"];

    /// <param name="configure">Called before the server starts listening.</param>
    public ServedQcow2(string description, bool writable, bool allocationDepth, Action<NbdServer>? configure = null)
    {
        string path = _dir["f.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 4 << 20 }).Dispose();
        Image = ImageOpener.Open(path, readOnly: false);
        Image.Write(0, Enumerable.Repeat(Fill, 65536).ToArray());
        Server = NbdServer.ListenUnix(Socket, maxConnections: 0);
        configure?.Invoke(Server);
        Server.AddExport(new NbdExport("e", "e", description, Image, writable, [], allocationDepth));
        Server.Start();
    }

    public async ValueTask DisposeAsync()
    {
        await Server.DisposeAsync();
        Image.Dispose();
        _dir.Dispose();
    }
}
