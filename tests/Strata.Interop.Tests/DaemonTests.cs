using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Cli;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// strata daemon against qemu-storage-daemon: the same QMP transcripts, compared by reply shape (keys and JSON
/// types, recursively) and error class; command-line behaviour; persistent bitmaps crossing between them.
/// </summary>
public class DaemonTests : ScratchDirTest
{
    private static string[] Blockdevs(string image) =>
        ["--blockdev", $"driver=file,node-name=f0,filename={image}", "--blockdev", "driver=qcow2,node-name=drive0,file=f0"];

    private QsdProcess StartQsd(string image, bool connect = false) => new(image, "drive0", connect: connect, fileNodeName: "f0");

    /// <summary>Commands and arguments run against both daemons in order.</summary>
    private static readonly (string Command, string Args)[] Transcript =
    [
        ("query-version", "{}"),
        ("query-block", "{}"),
        ("query-jobs", "{}"),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"b","granularity":4096,"disabled":true}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"p","persistent":true}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":""}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"g","granularity":1000}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"g","granularity":4294967296}"""),
        ("block-dirty-bitmap-add", """{"node":"nosuch","name":"x"}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0"}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":5}"""),
        ("block-dirty-bitmap-add", """{"node":"drive0","name":"x","bogus":1}"""),
        ("block-dirty-bitmap-merge", """{"node":"drive0","target":"a","bitmaps":["b",{"node":"drive0","name":"p"}]}"""),
        ("block-dirty-bitmap-merge", """{"node":"drive0","target":"a","bitmaps":["zz"]}"""),
        ("block-dirty-bitmap-disable", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-disable", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-enable", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-clear", """{"node":"drive0","name":"a"}"""),
        ("block-dirty-bitmap-clear", """{"node":"drive0","name":"zz"}"""),
        ("x-debug-block-dirty-bitmap-sha256", """{"node":"drive0","name":"b"}"""),
        ("x-debug-block-dirty-bitmap-sha256", """{"node":"nosuch","name":"b"}"""),
        ("query-named-block-nodes", "{}"),
        ("query-named-block-nodes", """{"flat":true}"""),
        ("block-dirty-bitmap-remove", """{"node":"drive0","name":"b"}"""),
        ("block-dirty-bitmap-remove", """{"node":"drive0","name":"b"}"""),
        ("blockdev-add", """{"driver":"null-co","node-name":"n0","size":1048576}"""),
        ("blockdev-add", """{"driver":"qcow2","node-name":"x","file":"nope"}"""),
        ("blockdev-add", """{"driver":"qcow2","node-name":"drive0","file":"f0"}"""),
        ("blockdev-add", """{"driver":"file","node-name":"m","filename":"/nonexistent/file"}"""),
        ("blockdev-add", """{"driver":"file","node-name":"m"}"""),
        ("blockdev-add", """{"driver":"bogus","node-name":"m"}"""),
        ("blockdev-del", """{"node-name":"f0"}"""),
        ("blockdev-del", """{"node-name":"nosuch"}"""),
        ("blockdev-del", """{"node-name":"n0"}"""),
        ("no-such-command", "{}"),
    ];

    [Fact]
    public async Task TheSameTranscriptGivesTheSameShapesAndErrorClasses()
    {
        string q = P("q.qcow2"), s = P("s.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", q, "64M").Exit);
        File.Copy(q, s);
        var qemu = new List<string>();
        using (var qsd = StartQsd(q))
        {
            await using var client = await QmpClient.ConnectUnixAsync(qsd.QmpPath);
            foreach (var (cmd, args) in Transcript) qemu.Add(await Outcome(client, cmd, args));
        }
        // Exactly QEMU's shapes with crash-safe tracking off; with it on (the default) Strata adds only its own
        // "crash-safe" member and the image's stored-bitmaps list (a persistent bitmap is on disk from its
        // checkpoint on, where QEMU writes it only at close).
        foreach (bool crashSafe in new[] { false, true })
        {
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", s, "64M").Exit);
            var strata = new List<string>();
            using (var daemon = new StrataDaemonProcess(Dir, crashSafe ? "c" : "s", [.. Blockdevs(s), $"--crash-safe-bitmaps={(crashSafe ? "on" : "off")}"]))
            {
                await using var client = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
                foreach (var (cmd, args) in Transcript) strata.Add(await Outcome(client, cmd, args));
                await client.ExecuteAsync("quit");
                Assert.Equal(0, daemon.WaitForExit());
            }
            for (int i = 0; i < Transcript.Length; i++)
            {
                string shape = crashSafe ? strata[i].Replace("crash-safe:bool,", "").Replace("bitmaps:[{flags:[str],granularity:num,name:str}],", "") : strata[i];
                Assert.True(qemu[i] == shape, $"crash-safe={crashSafe}: {Transcript[i].Command} {Transcript[i].Args}\n qemu:   {qemu[i]}\n strata: {strata[i]}");
            }
        }
    }

    /// <summary>"ok:" + the reply's shape, or "error:" + the error class.</summary>
    private static async Task<string> Outcome(QmpClient client, string command, string args)
    {
        try
        {
            var result = await client.ExecuteAsync(command, JsonNode.Parse(args));
            return "ok:" + Shape(result);
        }
        catch (QmpException e)
        {
            return "error:" + e.ErrorClass;
        }
    }

    /// <summary>Keys and JSON types, recursively; lists by the shape of their first element. Values that differ
    /// between any two runs (sizes, versions) do not matter, types do.</summary>
    private static string Shape(JsonNode? node) => node switch
    {
        null => "null",
        JsonObject o => "{" + string.Join(",", o.OrderBy(kv => kv.Key, StringComparer.Ordinal).Select(kv => kv.Key + ":" + Shape(kv.Value))) + "}",
        JsonArray a => "[" + (a.Count == 0 ? "" : Shape(a[0])) + "]",
        JsonValue v => v.GetValueKind() switch
        {
            JsonValueKind.String => "str",
            JsonValueKind.Number => "num",
            JsonValueKind.True or JsonValueKind.False => "bool",
            _ => "?",
        },
        _ => "?",
    };

    [Fact]
    public async Task APersistentBitmapAddedOverQmpIsInTheImageAfterQuit()
    {
        string s = P("p.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", s, "64M").Exit);
        string pid = P("d.pid");
        using var daemon = new StrataDaemonProcess(Dir, "p", Blockdevs(s), pid);
        Assert.Equal(daemon.Process.Id.ToString(), File.ReadAllText(pid).Trim());
        await using (var client = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
        {
            await client.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "pb", persistent = true, granularity = 131072 });
            await client.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "off", persistent = true, disabled = true });
            await client.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "transient" });
            await client.ExecuteAsync("quit");
        }
        Assert.Equal(0, daemon.WaitForExit());
        Assert.False(File.Exists(pid), "pidfile removed on exit");
        var info = JsonNode.Parse(Tools.Run("qemu-img", "info", "--output=json", s).Stdout)!;
        var bitmaps = info["format-specific"]!["data"]!["bitmaps"]!.AsArray()
            .Select(b => $"{b!["name"]}:{b["granularity"]}:{string.Join(',', b["flags"]!.AsArray().Select(f => f!.GetValue<string>()))}").Order().ToArray();
        Assert.Equal(["off:65536:", "pb:131072:auto"], bitmaps);
        Assert.Equal(0, Tools.Run("qemu-img", "check", s).Exit);
    }

    [Fact]
    public async Task BitmapsLeftByQemuOpenInStrataWithTheSameHash()
    {
        string img = P("b.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", img, "b0").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 1 0 3M", "-c", "write -P 2 40M 64k", img).Exit);
        string expected;
        using (var qsd = StartQsd(img, connect: true))
        {
            expected = qsd.Sha256("drive0", "b0");
            qsd.Quit();
        }
        using var daemon = new StrataDaemonProcess(Dir, "h", Blockdevs(img));
        await using var client = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
        var hash = await client.ExecuteAsync("x-debug-block-dirty-bitmap-sha256", new { node = "drive0", name = "b0" });
        Assert.Equal(expected, hash!["sha256"]!.GetValue<string>());
        var nodes = (await client.ExecuteAsync("query-named-block-nodes"))!.AsArray();
        var b0 = nodes.First(n => n!["node-name"]!.GetValue<string>() == "drive0")!["dirty-bitmaps"]![0]!;
        Assert.Equal(49 * 65536, b0["count"]!.GetValue<long>());
        Assert.True(b0["recording"]!.GetValue<bool>());
        Assert.True(b0["persistent"]!.GetValue<bool>());
    }

    [Fact]
    public async Task SigtermClosesCleanlyAndStoresBitmaps()
    {
        string s = P("t.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", s, "64M").Exit);
        using var daemon = new StrataDaemonProcess(Dir, "t", Blockdevs(s));
        await using (var client = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
            await client.ExecuteAsync("block-dirty-bitmap-add", new { node = "drive0", name = "keep", persistent = true });
        Process.Start("kill", ["-TERM", daemon.Process.Id.ToString()])!.WaitForExit();
        Assert.Equal(0, daemon.WaitForExit());
        Assert.Contains("keep", Tools.Run("qemu-img", "info", s).Stdout);
        Assert.Equal(0, Tools.Run("qemu-img", "check", s).Exit);
    }

    [Fact]
    public async Task DaemonizeReturnsOnceTheDaemonServes()
    {
        string qmp = P("dz.qmp"), pid = P("dz.pid");
        var psi = Tools.StrataStartInfo("daemon");
        psi.UseShellExecute = false;
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        foreach (var a in new[] { "--daemonize", "--blockdev", "driver=null-co,node-name=n0",
                     "--chardev", $"socket,id=m,path={qmp},server=on,wait=off", "--monitor", "chardev=m", "--pidfile", pid })
            psi.ArgumentList.Add(a);
        using (var parent = Process.Start(psi)!)
        {
            Assert.True(parent.WaitForExit(20000));
            Assert.Equal(0, parent.ExitCode);
        }
        // The parent returned only after the child was up: the socket answers at once.
        int child = int.Parse(File.ReadAllText(pid).Trim());
        await using (var client = await QmpClient.ConnectUnixAsync(qmp))
        {
            var nodes = (await client.ExecuteAsync("query-named-block-nodes"))!.AsArray();
            Assert.Equal("n0", nodes[0]!["node-name"]!.GetValue<string>());
            await client.ExecuteAsync("quit");
        }
        // Gone (or a zombie waiting for whoever adopted it): /proc says so.
        bool Gone() => !File.Exists($"/proc/{child}/stat") || File.ReadAllText($"/proc/{child}/stat").Split(' ')[2] is "Z" or "X";
        for (int i = 0; i < 200 && !(Gone() && !File.Exists(pid)); i++) await Task.Delay(50);
        Assert.False(File.Exists(pid));
        Assert.True(Gone(), "daemon process still running after quit");
    }

    [Fact]
    public async Task QmpAlsoServesTcpWithSeveralClientsAtOnce()
    {
        int port = 20000 + Random.Shared.Next(20000);
        var psi = Tools.StrataStartInfo("daemon");
        psi.UseShellExecute = false;
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        foreach (var a in new[] { "--blockdev", "driver=null-co,node-name=n0",
                     "--chardev", $"socket,id=t,host=127.0.0.1,port={port},server=on,wait=off", "--monitor", "chardev=t" })
            psi.ArgumentList.Add(a);
        using var daemon = Process.Start(psi)!;
        try
        {
            QmpClient? first = null;
            for (int i = 0; i < 200 && first is null; i++)
            {
                try { first = await QmpClient.ConnectTcpAsync("127.0.0.1", port); }
                catch (System.Net.Sockets.SocketException) { await Task.Delay(25); }
            }
            Assert.NotNull(first);
            await using var a = first;
            await using var b = await QmpClient.ConnectTcpAsync("127.0.0.1", port);
            await a.ExecuteAsync("block-dirty-bitmap-add", new { node = "n0", name = "x" });
            var seen = (await b.ExecuteAsync("query-named-block-nodes"))!.AsArray()[0]!["dirty-bitmaps"]![0]!["name"]!.GetValue<string>();
            Assert.Equal("x", seen); // one daemon, two sessions
            await b.ExecuteAsync("quit");
            Assert.True(daemon.WaitForExit(15000));
            Assert.Equal(0, daemon.ExitCode);
        }
        finally
        {
            if (!daemon.HasExited) daemon.Kill();
        }
    }

    public static TheoryData<string[], string> BadCommandLines => new()
    {
        { ["--foo"], "unrecognized option '--foo'" },
        { ["--blockdev", "driver=qcow2,node-name=x,file=nope"], "--blockdev driver=qcow2,node-name=x,file=nope: Cannot find device='nope' nor node-name='nope'" },
        { ["--blockdev", "driver=file"], "--blockdev driver=file: Parameter 'filename' is missing" },
        { ["--blockdev", "driver=file,node-name=f,filename=/nonexist"], "--blockdev driver=file,node-name=f,filename=/nonexist: Could not open '/nonexist': No such file or directory" },
        { ["--chardev", "socket,id=q,path=/tmp/x.sock,server=on,wait=off", "--monitor", "chardev=nope"], "--monitor chardev=nope: chardev \"nope\" not found" },
        { ["--nbd-server"], "option '--nbd-server' requires an argument" },
        { ["--blockdev", "{\"driver\":\"file\",\"node-name\":\"f\",\"filename\":\"/dev/null\",\"x\":1}"], "--blockdev {\"driver\":\"file\",\"node-name\":\"f\",\"filename\":\"/dev/null\",\"x\":1}: Parameter 'x' is unexpected" },
        { ["--blockdev", "driver=null-co,node-name=n,size=1.5"], "--blockdev driver=null-co,node-name=n,size=1.5: Parameter 'size' expects integer" },
        { ["--blockdev", "driver=null-co,node-name=n,read-only=maybe"], "--blockdev driver=null-co,node-name=n,read-only=maybe: Parameter 'read-only' expects 'on' or 'off'" },
    };

    [Theory]
    [MemberData(nameof(BadCommandLines))]
    public void BadCommandLinesFailAsQemuStorageDaemonDoes(string[] args, string message)
    {
        var qsd = Tools.Run("qemu-storage-daemon", args);
        Assert.Equal(1, qsd.Exit);
        Assert.Equal($"qemu-storage-daemon: {message}", qsd.Stderr.Trim());
        var err = new StringWriter();
        Assert.Equal(1, StrataCli.Run(["daemon", .. args], new StringWriter(), err));
        Assert.Equal($"strata daemon: {message}", err.ToString().Trim());
    }
}
