using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using Strata.Cli;

namespace Strata.Interop.Tests.Infra;

/// <summary>Result of one tool run.</summary>
public sealed record ToolResult(string Tool, string[] Args, int Exit, string Stdout, string Stderr)
{
    public override string ToString() =>
        $"$ {Tool} {string.Join(' ', Args.Select(Quote))}\n--- exit {Exit}\n--- stdout ---\n{Stdout}--- stderr ---\n{Stderr}";

    private static string Quote(string a) => a.Length == 0 || a.Contains(' ') ? $"'{a}'" : a;

    /// <summary>Asserts exit code 0, showing the whole run on failure.</summary>
    public ToolResult Ok()
    {
        Assert.True(Exit == 0, "command failed:\n" + this);
        return this;
    }

    public JsonElement Json()
    {
        try
        {
            return JsonDocument.Parse(Stdout).RootElement.Clone();
        }
        catch (JsonException e)
        {
            Assert.Fail($"stdout is not JSON ({e.Message}):\n{this}");
            throw;
        }
    }
}

/// <summary>Runs the real QEMU tools as processes and strata in-process (or, with STRATA_NATIVE set, as that native
/// executable).</summary>
public static class Tools
{
    /// <summary>
    /// STRATA_NATIVE=/path/to/strata (a native AOT build): every strata the tests run — <see cref="StrataCmd"/>, the
    /// daemons, the links named after QEMU's tools — is that executable instead of this build, so that the suite
    /// checks the binary that ships. Unset: strata runs in-process and as <c>dotnet strata.dll</c>.
    /// </summary>
    public static readonly string? NativeStrata =
        Environment.GetEnvironmentVariable("STRATA_NATIVE") is { Length: > 0 } native ? Path.GetFullPath(native) : null;

    /// <summary>The strata executable a link named after a QEMU tool points to.</summary>
    public static string StrataExecutable => NativeStrata ?? Path.Combine(AppContext.BaseDirectory, "strata");

    /// <summary>How to start <c>strata ARGS</c> as a process: the native executable, or <c>dotnet strata.dll</c>.</summary>
    public static ProcessStartInfo StrataStartInfo(params string[] args)
    {
        var psi = NativeStrata is { } native ? new ProcessStartInfo(native) : new ProcessStartInfo("dotnet") { ArgumentList = { Path.Combine(AppContext.BaseDirectory, "strata.dll") } };
        foreach (var a in args) psi.ArgumentList.Add(a);
        return psi;
    }

    /// <summary>Runs <c>strata ARGS</c> as its own process (for what must not run in the test process).</summary>
    public static ToolResult StrataProcess(params string[] args) =>
        NativeStrata is { } native ? Run(native, args) : Run("dotnet", [Path.Combine(AppContext.BaseDirectory, "strata.dll"), .. args]);

    public const string QemuImgPath = "qemu-img";
    public const string QemuIoPath = "qemu-io";

    /// <summary>Runs a process; a missing tool fails the test (Process.Start throws).</summary>
    public static ToolResult Run(string tool, params string[] args)
    {
        var psi = new ProcessStartInfo(tool)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = true,
            UseShellExecute = false,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["LC_ALL"] = "C";
        Process p;
        try
        {
            p = Process.Start(psi) ?? throw new InvalidOperationException($"could not start {tool}");
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"required tool '{tool}' is not installed or not runnable: {e.Message}", e);
        }
        using (p)
        {
            p.StandardInput.Close();
            var so = p.StandardOutput.ReadToEndAsync();
            var se = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(60_000))
            {
                p.Kill(true);
                throw new TimeoutException($"{tool} {string.Join(' ', args)} timed out");
            }
            return new ToolResult(tool, args, p.ExitCode, so.Result, se.Result);
        }
    }

    public static ToolResult QemuImg(params string[] args) => Run(QemuImgPath, args);

    /// <summary>qemu-io with one -c per command.</summary>
    public static ToolResult QemuIo(string file, IEnumerable<string> commands, string? format = null)
    {
        var args = new List<string>();
        if (format is not null) { args.Add("-f"); args.Add(format); }
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(file);
        var r = Run(QemuIoPath, [.. args]);
        // qemu-io exits 0 even when a command fails; it reports on stderr/stdout.
        Assert.True(r.Exit == 0 && !r.Stdout.Contains("failed", StringComparison.OrdinalIgnoreCase) && r.Stderr.Length == 0, "qemu-io failed:\n" + r);
        return r;
    }

    /// <summary>Runs strata in-process (or the native executable, see <see cref="NativeStrata"/>). Exceptions escaping
    /// Run are reported as a failed run with the exception on stderr.</summary>
    public static ToolResult StrataCmd(params string[] args)
    {
        if (NativeStrata is { } native) return Run(native, args) with { Tool = "strata" };
        var o = new StringWriter();
        var e = new StringWriter();
        int rc;
        try
        {
            rc = StrataCli.Run(args, o, e);
        }
        catch (Exception ex)
        {
            e.WriteLine("Unhandled exception escaped StrataCli.Run: " + ex);
            rc = -999;
        }
        return new ToolResult("strata", args, rc, o.ToString(), e.ToString());
    }

    /// <summary>strata io with one -c per command.</summary>
    public static ToolResult StrataIo(string file, IEnumerable<string> commands, string? format = null)
    {
        var args = new List<string> { "io" };
        if (format is not null) { args.Add("-f"); args.Add(format); }
        foreach (var c in commands) { args.Add("-c"); args.Add(c); }
        args.Add(file);
        return StrataCmd([.. args]).Ok();
    }

    public static string Sha256(string path) => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(path)));

    /// <summary>True when stderr looks like a crash rather than a message.</summary>
    public static bool LooksLikeCrash(string stderr) =>
        stderr.Contains("Unhandled exception", StringComparison.OrdinalIgnoreCase)
        || stderr.Contains("Exception:", StringComparison.Ordinal)
        || System.Text.RegularExpressions.Regex.IsMatch(stderr, @"^\s+at \S+.*\(.*\)", System.Text.RegularExpressions.RegexOptions.Multiline);

    /// <summary>qemu-img check, asserting it is clean (exit 0, "No errors").</summary>
    /// <summary>Runs `check ARGS` with qemu-img on one copy of <paramref name="built"/> and with strata on another, and
    /// asserts the same exit code, output and error text (each copy's path read as IMG); returns both copies' paths
    /// for the caller's comparisons of what was repaired.</summary>
    public static (string QemuCopy, string StrataCopy, ToolResult Strata) AssertSameCheckOnCopies(TempDir t, string built, params string[] args)
    {
        string q = t["q.qcow2"], s = t["s.qcow2"];
        File.Copy(built, q, overwrite: true);
        File.Copy(built, s, overwrite: true);
        var qr = QemuImg(["check", .. args, q]);
        var sr = StrataCmd(["img", "check", .. args, s]);
        Assert.False(LooksLikeCrash(sr.Stderr), sr.ToString());
        Assert.True(qr.Exit == sr.Exit, $"exit code qemu-img {qr.Exit}, strata {sr.Exit}\n{qr}\n{sr}");
        Assert.Equal(qr.Stdout.Replace(q, "IMG"), sr.Stdout.Replace(s, "IMG"));
        Assert.Equal(InfoInteropTests.NormalizeErrorPrefix(qr.Stderr.Replace(q, "IMG")),
                     InfoInteropTests.NormalizeErrorPrefix(sr.Stderr.Replace(s, "IMG")));
        return (q, s, sr);
    }

    public static void AssertQemuCheckClean(string path)
    {
        var r = QemuImg("check", path);
        Assert.True(r.Exit == 0 && r.Stdout.Contains("No errors were found on the image."), "qemu-img check is not clean:\n" + r);
    }

    /// <summary>qemu-img compare, asserting "Images are identical." and exit 0.</summary>
    public static void AssertQemuIdentical(string a, string b, params string[] extra)
    {
        var r = QemuImg(["compare", .. extra, a, b]);
        Assert.True(r.Exit == 0 && r.Stdout.Contains("Images are identical."), "qemu-img compare says the images differ:\n" + r);
    }
}

/// <summary>A private temp folder per test, deleted on dispose.</summary>
public sealed class TempDir : IDisposable
{
    public string Path { get; }

    public TempDir()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "strata-interop-" + Guid.NewGuid().ToString("N")[..12]);
        Directory.CreateDirectory(Path);
    }

    public string this[string name] => System.IO.Path.Combine(Path, name);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}
