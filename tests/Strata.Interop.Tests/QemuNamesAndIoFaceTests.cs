using System.Text.RegularExpressions;
using Strata.Interop.Tests.Infra;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Image names as QEMU's tools take them (json:, file:, blkdebug:, nbd:, null-co://, --image-opts, --object), the
/// qemu-img command-line errors and the qemu-io face: strata reached through links named qemu-img / qemu-io answers
/// as the real tools do, byte for byte once qemu-io's timings are filtered as the iotests filter them.
/// </summary>
public class QemuNamesAndIoFaceTests : ScratchDirTest
{
    private string Link(string tool)
    {
        string dir = Directory.CreateDirectory(P("bin")).FullName;
        string link = Path.Combine(dir, tool);
        if (!File.Exists(link)) File.CreateSymbolicLink(link, Tools.StrataExecutable);
        return link;
    }

    /// <summary>_filter_qemu_io's rewrite of the statistics line.</summary>
    private static string FilterIo(string text) => Regex.Replace(text,
        @"[0-9]* ops; [0-9/:. sec]* \([0-9/.inf]* [EPTGMKiBbytes]*/sec and [0-9/.inf]* ops/sec\)", "X ops; XX:XX:XX.X (XXX YYY/sec and XXX ops/sec)");

    private static string Answer(ToolResult r, string dir) =>
        $"exit {r.Exit}\n--- stdout\n{FilterIo(r.Stdout).Replace(dir, "DIR")}--- stderr\n{r.Stderr.Replace(dir, "DIR")}";

    /// <summary>Runs one command line with the real tool and with strata as that tool, each on its own fresh copy of
    /// the same images (IMG: a 1 MiB qcow2 with 0x11 in its first 64 KiB; CONF: a blkdebug config file).</summary>
    private (string Qemu, string Strata) Both(string tool, string[] command)
    {
        var answers = new List<string>();
        foreach (var (exe, sub) in new[] { (tool, "q"), (Link(tool), "s") })
        {
            string dir = Directory.CreateDirectory(P(sub)).FullName;
            string img = Path.Combine(dir, "a.qcow2");
            File.Delete(img);
            Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
            Tools.Run("qemu-io", "-c", "write -P 0x11 0 64k", img);
            File.WriteAllText(Path.Combine(dir, "blkdebug.conf"), "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n");
            var r = Tools.Run(exe, [.. command.Select(a => a.Replace("IMG", img).Replace("CONF", Path.Combine(dir, "blkdebug.conf")))]);
            answers.Add(Answer(r, dir));
        }
        return (answers[0], answers[1]);
    }

    [Theory]
    [InlineData("info", "json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'IMG'}}")]
    [InlineData("info", "json:{\"file.filename\": \"IMG\"}")]
    [InlineData("info", "json:{\"driver\": \"file\", \"filename\": \"IMG\"}")]
    [InlineData("info", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG\", \"backing\": null}")]
    [InlineData("info", "file:IMG")]
    [InlineData("info", "null-co://")]
    [InlineData("info", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG.missing\"}")]
    [InlineData("info", "json:{\"driver\": \"qcow2\"}")]
    [InlineData("info", "json:{\"driver\": \"qcow2\", \"file\": \"IMG\"}")]
    [InlineData("info", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG\", \"foo\": 1}")]
    [InlineData("info", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG\", \"file.bogus\": 1}")]
    [InlineData("info", "json:{\"driver\": \"bogus\"}")]
    [InlineData("info", "json:{")]
    [InlineData("info", "json:[1]")]
    [InlineData("info", "foo:IMG")]
    [InlineData("info", "null-co://x")]
    [InlineData("info", "blkdebug:CONF.missing:IMG")]
    [InlineData("info", "blkdebug:")]
    [InlineData("info", "nbd+unix:///e?socket=IMG.sock")]
    [InlineData("info", "--image-opts", "driver=qcow2,file.filename=IMG")]
    [InlineData("info", "--image-opts", "file.filename=IMG")]
    [InlineData("info", "--image-opts", "driver=qcow2,file.filename=IMG.missing")]
    [InlineData("info", "--object", "secret,id=s0,data=x", "IMG")]
    [InlineData("info", "--object", "secret,id=s0", "IMG")]
    [InlineData("info", "--object", "foo", "IMG")]
    [InlineData("info", "--object", "secret,id=s0,data=x,file=y", "IMG")]
    [InlineData("info", "--object", "secret,id=s0,file=IMG.missing", "IMG")]
    [InlineData("check", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG\"}")]
    [InlineData("compare", "IMG", "json:{\"driver\": \"qcow2\", \"file.filename\": \"IMG\"}")]
    [InlineData("compare", "blkdebug::IMG", "IMG")]
    [InlineData("map", "--output=json", "file:IMG")]
    public void QemuImgTakesTheNamesQemuImgTakes(params string[] command)
    {
        var (qemu, strata) = Both("qemu-img", command);
        Assert.Equal(qemu, strata);
    }

    [Theory]
    [InlineData("info", "-x", "IMG")]
    [InlineData("info", "--bogus", "IMG")]
    [InlineData("info", "-f")]
    [InlineData("info")]
    [InlineData("info", "IMG", "IMG")]
    [InlineData("check")]
    [InlineData("compare", "IMG")]
    [InlineData("create", "-f", "qcow2", "IMG.new", "-o")]
    [InlineData("resize", "IMG")]
    [InlineData("frobnicate")]
    public void CommandLineErrorsAreQemuImgs(params string[] command)
    {
        var (qemu, strata) = Both("qemu-img", command);
        Assert.Equal(qemu, strata);
    }

    [Theory]
    [InlineData("-c", "read -P 0x11 0 64k", "-c", "read -P 0x11 0 128k", "-c", "read -q -P 0 64k 4k", "IMG")]
    [InlineData("-c", "write -P 0x22 4k 8k", "-c", "read -v 4k 20", "-c", "readv -P 0x22 4k 2k 6k", "-c", "writev -P 3 0 512 1k", "IMG")]
    [InlineData("-c", "aio_write -P 5 0 4k", "-c", "aio_flush", "-c", "aio_read -P 5 0 1k 3k", "-c", "flush", "IMG")]
    [InlineData("-c", "write -z -u 0 64k", "-c", "map", "-c", "alloc 0 64k", "-c", "alloc 64k", "-c", "length", "IMG")]
    [InlineData("-c", "discard 0 64k", "-c", "read -P 0 0 64k", "-c", "write -c -P 7 128k 64k", "-c", "read -P 7 128k 64k", "IMG")]
    [InlineData("-c", "write -u 0 512", "-c", "write -z -P 1 0 512", "-c", "read -P 300 0 1", "-c", "write 0 12x", "-c", "read 0 1 2", "IMG")]
    [InlineData("-c", "write 1M 512", "-c", "read 1023k 2k", "-c", "read -P 0x11 0 512", "IMG")]
    [InlineData("-r", "-c", "read 0 512", "-c", "write 0 512", "IMG")]
    [InlineData("-c", "close", "-c", "read 0 1", "-c", "open -o driver=qcow2 IMG", "-c", "read -P 0x11 0 1", "IMG")]
    [InlineData("-c", "read -P 0x11 0 4k", "--image-opts", "driver=qcow2,file.filename=IMG")]
    [InlineData("-c", "read -P 0x11 0 4k", "json:{\"file.filename\": \"IMG\"}")]
    [InlineData("-c", "read 0 4k", "blkdebug:CONF:IMG")]
    [InlineData("-c", "read 0 4k", "--image-opts", "driver=qcow2,file.filename=IMG.missing")]
    [InlineData("-c", "read 0 4k", "IMG.missing")]
    [InlineData("-x", "IMG")]
    [InlineData("--bogus", "IMG")]
    [InlineData("-c")]
    [InlineData("-t", "bogus", "IMG")]
    [InlineData("-U", "-c", "read 0 1", "IMG")]
    [InlineData("-c", "bogus", "IMG")]
    public void QemuIoFaceAnswersAsQemuIo(params string[] command)
    {
        var (qemu, strata) = Both("qemu-io", command);
        Assert.Equal(qemu, strata);
        // Both images end with the same guest data.
        Tools.QemuImg("compare", "-q", P("q/a.qcow2"), P("s/a.qcow2")).Ok();
    }

    /// <summary>An injected read error is an error: compare must not call the images identical, convert must fail.</summary>
    [Fact]
    public void BlkdebugReadErrorsFailTheCommandInsteadOfGivingWrongData()
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("a.qcow2"), "1M").Ok();
        Tools.Run("qemu-io", "-c", "write -P 0x11 0 64k", P("a.qcow2"));
        File.WriteAllText(P("c.conf"), "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n");
        var cmp = Tools.StrataCmd("img", "compare", $"blkdebug:{P("c.conf")}:{P("a.qcow2")}", P("a.qcow2"));
        Assert.NotEqual(0, cmp.Exit);
        Assert.DoesNotContain("identical", cmp.Stdout);
        Assert.Contains("Input/output error", cmp.Stderr);
        var conv = Tools.StrataCmd("img", "convert", "-O", "raw", $"blkdebug:{P("c.conf")}:{P("a.qcow2")}", P("out.raw"));
        Assert.NotEqual(0, conv.Exit);
        Assert.Contains("Input/output error", conv.Stderr);
    }

    /// <summary>nbd+unix:// names reach an export: strata reads what qemu-nbd serves.</summary>
    [Fact]
    public void NbdNamesReadTheExport()
    {
        Tools.QemuImg("create", "-q", "-f", "qcow2", P("a.qcow2"), "1M").Ok();
        Tools.Run("qemu-io", "-c", "write -P 0x5c 0 64k", P("a.qcow2"));
        string sock = P("nbd.sock");
        // --persistent: three clients in turn; stopped through its pid file at the end.
        Tools.Run("qemu-nbd", "--fork", "--persistent", "--pid-file", P("nbd.pid"), "-k", sock, "-f", "qcow2", "-x", "exp", P("a.qcow2")).Ok();
        using var stop = new PidFileKiller(P("nbd.pid"));
        var r = Tools.StrataCmd("io", "-c", "read -P 0x5c 0 64k", "-c", "read -P 0 64k 64k", $"nbd+unix:///exp?socket={sock}").Ok();
        Assert.Contains("read 65536/65536 bytes at offset 65536", r.Stdout);
        Assert.DoesNotContain("verification failed", r.Stdout);
        // The raw format over nbd maps each byte to its own offset, as qemu-img shows it.
        string name = $"nbd+unix:///exp?socket={sock}";
        Assert.Equal(Tools.QemuImg("map", "-f", "raw", "--output=json", name).Stdout, Tools.StrataCmd("img", "map", "-f", "raw", "--output=json", name).Ok().Stdout);
    }
}

/// <summary>Kills the process a pid file names (a forked server started with that pid file on its command line) when
/// disposed. A process whose command line does not name the pid file is left alone: the server may have died and its
/// pid been reused.</summary>
internal sealed class PidFileKiller(string pidFile) : IDisposable
{
    public void Dispose()
    {
        try
        {
            int pid = int.Parse(File.ReadAllText(pidFile).Trim());
            if (!File.ReadAllText($"/proc/{pid}/cmdline").Split('\0').Contains(pidFile)) return;
            using var p = System.Diagnostics.Process.GetProcessById(pid);
            p.Kill();
            p.WaitForExit(5000);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException or FormatException or InvalidOperationException)
        {
        }
    }
}
