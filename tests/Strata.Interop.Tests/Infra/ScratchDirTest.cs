namespace Strata.Interop.Tests;

/// <summary>Base for interop tests that need a scratch folder of images and sockets, removed after each test
/// (xUnit builds one instance per test).</summary>
public abstract class ScratchDirTest : IDisposable
{
    protected string Dir { get; } = Directory.CreateTempSubdirectory("strata-it-").FullName;

    /// <summary>A path inside the scratch folder.</summary>
    protected string P(string name) => Path.Combine(Dir, name);

    public void Dispose()
    {
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { }
        GC.SuppressFinalize(this);
    }
}
