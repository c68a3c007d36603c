using System.Diagnostics;

namespace Strata.Interop.Tests;

/// <summary>Runs the real QEMU tools. A missing tool is a test failure, never a skip.</summary>
internal static class Tools
{
    public readonly record struct Result(int Exit, string Stdout, string Stderr);

    public static Result Run(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        Process p;
        try
        {
            p = Process.Start(psi)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"'{tool}' is not installed (apt-get install qemu-utils): {e.Message}");
        }
        using (p)
        {
            var err = p.StandardError.ReadToEndAsync();
            string stdout = p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return new Result(p.ExitCode, stdout, err.Result);
        }
    }
}
