namespace Strata.Protocol.Nbd;

/// <summary>Looks exports up by name for a session (the server's registry).</summary>
public interface INbdExportRegistry
{
    NbdExport? Find(string name);
    IReadOnlyList<NbdExport> All { get; }
    bool MultiConn { get; }
}
