using Strata.Block;
using Strata.Protocol.Nbd;

namespace Strata.Cli.Img;

/// <summary>The NBD client behind nbd:// names and driver=nbd options, with qemu-img's words when the server is
/// not there ("Failed to connect to 'WHERE': reason").</summary>
internal static class NbdConnect
{
    public static BlockImage Connect(string? unixPath, string? host, int port, string export, bool readOnly, string? statusContext)
    {
        string where = unixPath ?? $"{host}:{port}";
        if (unixPath is not null && !File.Exists(unixPath)) throw new BlockException($"Failed to connect to '{where}': No such file or directory");
        try
        {
            return NbdImage.Connect(unixPath, host, port, export, readOnly, statusContext);
        }
        catch (BlockException e) when (e.Message.Contains("refused", StringComparison.OrdinalIgnoreCase))
        {
            throw new BlockException($"Failed to connect to '{where}': Connection refused");
        }
        catch (BlockException e) when (e.Message.Contains("Name or service not known", StringComparison.Ordinal))
        {
            throw new BlockException($"address resolution failed for {where}: Name or service not known");
        }
    }
}
