using System.Diagnostics;
using System.Text;

namespace Strata.Interop.Tests;

/// <summary>
/// qemu-storage-daemon ("qsd") or strata daemon ("strata") with the given options plus a QMP socket, run in a
/// folder of its own (a relative file name a command creates lands there, not beside the tests), its stderr kept.
/// </summary>
public sealed class BareDaemon : IDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _stderr = new();

    public string QmpPath { get; }

    public BareDaemon(string kind, string dir, IEnumerable<string> options)
    {
        QmpPath = Path.Combine(dir, kind + ".qmp");
        _process = Process.Start(StartInfo(kind, dir, [.. options, "--chardev", $"socket,id=qmp0,path={QmpPath},server=on,wait=off", "--monitor", "chardev=qmp0"]))!;
        _process.ErrorDataReceived += (_, e) => { lock (_stderr) if (e.Data is not null) _stderr.AppendLine(e.Data); };
        _process.BeginErrorReadLine();
        var sw = Stopwatch.StartNew();
        while (!File.Exists(QmpPath))
        {
            if (_process.HasExited) throw new InvalidOperationException($"{kind} exited: {Stderr}");
            if (sw.ElapsedMilliseconds > 15000) throw new TimeoutException($"{kind} did not start");
            Thread.Sleep(10);
        }
        Listening.WaitFor(QmpPath);
    }

    public string Stderr
    {
        get { lock (_stderr) return _stderr.ToString(); }
    }

    public bool HasExited => _process.HasExited;

    public static ProcessStartInfo StartInfo(string kind, string dir, IEnumerable<string> args)
    {
        var psi = kind == "qsd"
            ? new ProcessStartInfo("qemu-storage-daemon")
            : Infra.Tools.StrataStartInfo("daemon");
        psi.RedirectStandardError = psi.RedirectStandardOutput = true;
        psi.UseShellExecute = false;
        psi.WorkingDirectory = dir;
        foreach (var a in args) psi.ArgumentList.Add(a);
        return psi;
    }

    /// <summary>Runs the daemon with options that must make it fail at startup: its exit code and stderr.</summary>
    public static (int Exit, string Stderr) RunToFailure(string kind, string dir, IEnumerable<string> args, int timeoutMs = 20000)
    {
        using var p = Process.Start(StartInfo(kind, dir, args))!;
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeoutMs))
        {
            p.Kill();
            p.WaitForExit();
            return (-1, "did not exit: " + stderr.Result);
        }
        return (p.ExitCode, stderr.Result);
    }

    public void Dispose()
    {
        if (!_process.HasExited) _process.Kill();
        _process.WaitForExit();
        _process.Dispose();
    }
}
