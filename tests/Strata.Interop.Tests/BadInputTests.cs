using System.Text.RegularExpressions;
using Strata.Interop.Tests.Infra;
using static Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Requirement 6: bad input at the CLI level. Strata must exit non-zero with a stderr message naming the problem,
/// must not crash (no unhandled exception / stack trace), and must leave the files untouched.
/// </summary>
public class BadInputTests
{
    public enum Bad { Nonexistent, Truncated50, UnknownIncompatibleBit, UnalignedL1, BackingLoop }

    /// <summary>Each command with F = the bad image, O = an output path, B = a good qcow2 image.</summary>
    private static readonly string[][] ImageCommands =
    [
        ["img", "info", "F"],
        ["img", "info", "--output=json", "F"],
        ["img", "info", "--backing-chain", "F"],
        ["img", "check", "F"],
        ["img", "check", "--output=json", "F"],
        ["img", "check", "-r", "leaks", "F"],
        ["img", "check", "-r", "all", "F"],
        ["img", "map", "F"],
        ["img", "map", "--output=json", "F"],
        ["img", "compare", "F", "B"],
        ["img", "compare", "B", "F"],
        ["img", "convert", "-O", "raw", "F", "O"],
        ["img", "convert", "-O", "qcow2", "F", "O"],
        ["io", "-c", "read 0 64k", "F"],
        ["io", "-c", "write -P 0x1 0 64k", "F"],
        ["img", "resize", "F", "+1M"],
        ["img", "commit", "F"],
        ["img", "rebase", "-b", "", "F"],
        ["img", "rebase", "-b", "B", "-F", "qcow2", "F"],
        ["img", "rebase", "-u", "-b", "B", "-F", "qcow2", "F"],
    ];

    /// <summary>Commands that legitimately do not open the backing chain (qemu-img succeeds on a loop with them too).</summary>
    private static bool ValidOnLoop(string[] cmd) =>
        (cmd[1] == "info" && !cmd.Contains("--backing-chain")) || cmd.Contains("-u") || cmd[1] == "resize";

    public static TheoryData<Bad, int> ImageCases()
    {
        var d = new TheoryData<Bad, int>();
        foreach (var b in Enum.GetValues<Bad>())
            for (int i = 0; i < ImageCommands.Length; i++)
                if (b != Bad.BackingLoop || !ValidOnLoop(ImageCommands[i]))
                    d.Add(b, i);
        return d;
    }

    private static readonly Dictionary<Bad, string> Expected = new()
    {
        [Bad.Nonexistent] = "No such file or directory",
        [Bad.Truncated50] = @"(?i)header.*(too short|truncated)",
        [Bad.UnknownIncompatibleBit] = @"(?i)(unsupported|unknown).*feature|incompatible",
        [Bad.UnalignedL1] = @"(?i)L1 table offset",
        [Bad.BackingLoop] = @"(?i)(loop|infinite)",
    };

    [Theory]
    [MemberData(nameof(ImageCases))]
    public void BadImage_FailsCleanly_AndLeavesFilesUnchanged(Bad bad, int commandIndex)
    {
        using var t = new TempDir();
        QemuImg("create", "-q", "-f", "qcow2", t["good.qcow2"], "64M").Ok();
        string f = t["bad.qcow2"];
        switch (bad)
        {
            case Bad.Nonexistent:
                break;
            case Bad.Truncated50:
                Workloads.QemuQcow2(t["d.qcow2"], "64M", ["write -P 0xab 0 1M"]);
                File.WriteAllBytes(f, File.ReadAllBytes(t["d.qcow2"])[..50]);
                break;
            case Bad.UnknownIncompatibleBit:
                Workloads.QemuQcow2(f, "64M", ["write -P 0xab 0 1M"]);
                Qcow2Edit.WriteU64(f, 72, Qcow2Edit.ReadU64(f, 72) | (1UL << 20));
                break;
            case Bad.UnalignedL1:
                Workloads.QemuQcow2(f, "64M", ["write -P 0xab 0 1M"]);
                Qcow2Edit.WriteU64(f, 40, 0x12345);
                break;
            case Bad.BackingLoop:
                QemuImg("create", "-q", "-f", "qcow2", f, "64M").Ok();
                QemuIo(f, ["write -P 0xab 0 1M"], "qcow2");
                QemuImg("create", "-q", "-f", "qcow2", "-b", "bad.qcow2", "-F", "qcow2", t["other.qcow2"]).Ok();
                QemuImg("rebase", "-u", "-b", "other.qcow2", "-F", "qcow2", f).Ok();
                break;
        }
        var files = Directory.GetFiles(t.Path).ToDictionary(p => p, Sha256);
        var cmd = ImageCommands[commandIndex].Select(a => a switch { "F" => f, "O" => t["out.img"], "B" => t["good.qcow2"], _ => a }).ToArray();
        var r = StrataCmd(cmd);
        AssertFailsCleanly(r, Expected[bad]);
        foreach (var (p, h) in files)
            Assert.True(File.Exists(p) && Sha256(p) == h, $"{Path.GetFileName(p)} was modified by: {r}");
        if (bad == Bad.Nonexistent) Assert.False(File.Exists(f), "strata created the nonexistent input file: " + r);
    }

    private static void AssertFailsCleanly(ToolResult r, string expectedPattern)
    {
        Assert.True(r.Exit != 0, "expected a non-zero exit:\n" + r);
        Assert.False(LooksLikeCrash(r.Stderr), "strata crashed instead of reporting an error:\n" + r);
        // qemu-io reports a failed command on stdout ("write failed: …"), as the real one does.
        string report = r.Args[0] == "io" ? r.Stderr + r.Stdout : r.Stderr;
        Assert.True(report.Trim().Length > 0, "no error message:\n" + r);
        Assert.True(Regex.IsMatch(report, expectedPattern), $"the message does not name the problem (expected /{expectedPattern}/):\n{r}");
    }

    /// <summary>Command lines with bad sizes or an unknown format (G = a good qcow2 image, N = a path that must stay absent).</summary>
    public static TheoryData<string, string[]> BadArgumentCases => new()
    {
        { "Invalid image size", new[] { "img", "create", "-f", "qcow2", "N", "100E" } },
        { "Invalid image size", new[] { "img", "create", "-f", "raw", "N", "100E" } },
        { "(?i)size", new[] { "img", "create", "-f", "qcow2", "-o", "size=100E", "N" } },
        { "(?i)size", new[] { "img", "create", "-f", "qcow2", "N", "1000P" } },
        { "Invalid image size", new[] { "img", "create", "-f", "qcow2", "N", "abc" } },
        { "(?i)size", new[] { "img", "resize", "G", "100E" } },
        { "(?i)size", new[] { "img", "resize", "G", "+100E" } },
        { "(?i)size", new[] { "img", "resize", "G", "8E" } },
        // qemu-io's own words for these (it checks the range against the image's end itself).
        { "Parsing error: argument too large -- 100E", new[] { "io", "-c", "write -P 0x1 100E 64k", "G" } },
        { "write failed: Input/output error", new[] { "io", "-c", "write -P 0x1 63M 2M", "G" } },
        { "read failed: Input/output error", new[] { "io", "-c", "read 64M 64k", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "create", "-f", "foo", "N", "64M" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "info", "-f", "foo", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "check", "-f", "foo", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "map", "-f", "foo", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "compare", "-f", "foo", "G", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "compare", "-F", "foo", "G", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "convert", "-f", "foo", "-O", "raw", "G", "N" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "convert", "-O", "foo", "G", "N" } },
        { "Unknown (driver|file format) 'foo'", new[] { "io", "-f", "foo", "-c", "read 0 64k", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "resize", "-f", "foo", "G", "+1M" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "commit", "-f", "foo", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "rebase", "-f", "foo", "-b", "", "G" } },
        { "Invalid format name: 'foo'", new[] { "img", "rebase", "-b", "G", "-F", "foo", "G" } },
        { "Unknown (driver|file format) 'foo'", new[] { "img", "create", "-f", "qcow2", "-b", "G", "-F", "foo", "N" } },
    };

    [Theory]
    [MemberData(nameof(BadArgumentCases))]
    public void BadArguments_FailCleanly_AndLeaveFilesUnchanged(string expectedPattern, string[] template)
    {
        using var t = new TempDir();
        string g = t["good.qcow2"], n = t["new.img"];
        Workloads.QemuQcow2(g, "64M", ["write -P 0xab 0 1M"]);
        string hash = Sha256(g);
        var cmd = template.Select(a => a switch { "G" => g, "N" => n, _ => a }).ToArray();
        var r = StrataCmd(cmd);
        AssertFailsCleanly(r, expectedPattern);
        Assert.True(Sha256(g) == hash, "good.qcow2 was modified by: " + r);
        Assert.False(File.Exists(n), "a failed command left a new file behind: " + r);
        AssertQemuCheckClean(g);
    }

    /// <summary>Strata's own commands exit 2 on bad arguments, with one line per problem and where to look.</summary>
    [Theory]
    [InlineData("backup run /nonexistent", "Option '--disk' or '--domain' is required.", "Try 'strata backup run --help'")]
    [InlineData("backup list", "Required argument missing for command: 'list'.", "Try 'strata backup list --help'")]
    [InlineData("backup frobnicate", "Unrecognized command or argument 'frobnicate'.", "Try 'strata backup --help'")]
    [InlineData("migrate --to", "Required argument missing for option: '--to'.", "Try 'strata migrate --help'")]
    public void StrataCommandsExitTwoOnBadArguments(string command, string problem, string hint)
    {
        var r = StrataCmd(command.Split(' '));
        Assert.True(r.Exit == 2, "expected exit 2:\n" + r);
        Assert.Contains("strata: " + problem, r.Stderr);
        Assert.Contains(hint, r.Stderr);
        Assert.Equal("", r.Stdout);
    }
}
