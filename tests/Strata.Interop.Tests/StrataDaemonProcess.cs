using System.Diagnostics;

namespace Strata.Interop.Tests;

/// <summary>`strata daemon` started as its own process with qemu-storage-daemon's command line.</summary>
internal sealed class StrataDaemonProcess : IDisposable
{
    private readonly Process _process;
    public string QmpPath { get; }

    public StrataDaemonProcess(string dir, string name, IEnumerable<string> blockdevArgs, string? pidFile = null, bool waitForMonitor = true)
    {
        QmpPath = Path.Combine(dir, name + ".qmp");
        var psi = Infra.Tools.StrataStartInfo("daemon");
        psi.RedirectStandardError = psi.RedirectStandardOutput = true;
        psi.UseShellExecute = false;
        foreach (var a in blockdevArgs) psi.ArgumentList.Add(a);
        psi.ArgumentList.Add("--chardev");
        psi.ArgumentList.Add($"socket,id=qmp0,path={QmpPath},server=on,wait=off");
        psi.ArgumentList.Add("--monitor");
        psi.ArgumentList.Add("chardev=qmp0");
        if (pidFile is not null)
        {
            psi.ArgumentList.Add("--pidfile");
            psi.ArgumentList.Add(pidFile);
        }
        _process = Process.Start(psi)!;
        if (!waitForMonitor) return;
        Listening.WaitForProcess(_process, "strata daemon", 15000, QmpPath);
    }

    public Process Process => _process;

    public int WaitForExit(int ms = 15000)
    {
        Assert.True(_process.WaitForExit(ms), "daemon did not exit");
        return _process.ExitCode;
    }

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill();
        _process.Dispose();
    }
}
