using Strata.Backup;

namespace Strata.Tests.Backup;

public class SocketPathsTests
{
    [Fact]
    public void AShortPathIsKept() => Assert.Equal("/tmp/r/.nbd-1.sock", SocketPaths.ForRun("/tmp/r/.nbd-1.sock", "pull"));

    [Fact]
    public void APathTooLongForSunPathMovesToTheTemporaryFolder()
    {
        string deep = "/tmp/" + new string('d', 120) + "/.nbd-1.sock";
        string chosen = SocketPaths.ForRun(deep, "pull");
        Assert.StartsWith(Path.GetTempPath(), chosen);
        Assert.True(chosen.Length <= 100);
    }
}
