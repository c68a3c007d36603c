using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>The README's first command: the demo runs its whole story and every step behaves as it says.</summary>
public class DemoTests : ScratchDirTest
{
    [Fact]
    public void TheDemoRunsTheWholeBackupStoryAndQemuImgAgrees()
    {
        var r = Tools.StrataCmd("demo", "--dir", P("demo"));
        Assert.True(r.Exit == 0, r.ToString());
        Assert.Contains("demo: all steps behaved as expected", r.Stdout);
        Assert.DoesNotContain("!!", r.Stdout);
        Assert.DoesNotContain("qemu-img is not installed", r.Stdout);
        Assert.Contains("ok: point 2 (inc) restores to the disk as it was at that backup", r.Stdout);
        Assert.Contains("verified 2 point(s): all good", r.Stdout);
    }
}
