using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>The suite compares against real QEMU 7.2 tools: their absence must fail, never skip.</summary>
public class ToolchainTests
{
    [Fact]
    public void QemuImgAndQemuIo_AreInstalled_Version72()
    {
        var img = QemuImg("--version").Ok();
        Assert.Contains("qemu-img version 7.2", img.Stdout);
        var io = Run(QemuIoPath, "--version").Ok();
        Assert.Contains("qemu-io version 7.2", io.Stdout);
    }
}
