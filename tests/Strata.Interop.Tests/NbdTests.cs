using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Buffers.Binary;
using System.Diagnostics;
using System.Net.Sockets;
using System.Text.Json.Nodes;
using Strata.Formats.Nbd;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// strata daemon's NBD exports judged by clients no one here wrote (qemu-io, qemu-img, nbdinfo, nbdcopy), side by
/// side with qemu-storage-daemon; our NbdClient against qemu-nbd and qemu-storage-daemon; hostile clients.
/// </summary>
public class NbdTests : ScratchDirTest
{
    private static string Uri(string socket, string export) => $"nbd+unix:///{export}?socket={socket}";

    /// <summary>A writable export of a qcow2 node opened with discard=unmap, so guest discards reach the image.</summary>
    private StrataDaemonProcess StartStrata(string image, string name, string exportArgs = "writable=on,bitmaps.0=b0") =>
        new(Dir, name, [
            "--blockdev", $"driver=file,node-name=f0,filename={image}", "--blockdev", "driver=qcow2,node-name=drive0,file=f0,discard=unmap",
            "--nbd-server", $"addr.type=unix,addr.path={P(name + ".nbd")}",
            "--export", $"type=nbd,id=exp0,node-name=drive0,name=exp0,{exportArgs}",
        ]);

    private static readonly string[] Writes =
    [
        "write -P 0x5a 0 1M", "write -z 1M 64k", "write -P 0x33 3M 4k", "discard 4M 1M", "write -P 0x44 9M 200k",
        "write -z -u 20M 2M", "write -P 0x21 63M 1M",
    ];

    private static string[] IoArgs(string uri) => ["-f", "raw", .. Writes.SelectMany(w => new[] { "-c", w }), uri];

    private string BaseImage(string name)
    {
        string img = P(name);
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x11 2M 1M", "-c", "write -P 0x12 4M 2M", img).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", "--disable", img, "b0").Exit);
        return img;
    }

    /// <summary>Our client waits for the server to close after NBD_CMD_DISC, so an export can be deleted in safe mode
    /// the moment the client is done: against strata daemon and qemu-storage-daemon alike, every time.</summary>
    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public Task AnExportIsFreeForASafeDeleteOnceOurClientHasDisconnected(string kind) =>
        DeleteRightAfterEachClient(kind, 30, async (socket, export) =>
        {
            await using var client = await NbdClient.ConnectUnixAsync(socket, export);
            await client.ReadAsync(0, new byte[4096]);
        });

    /// <summary>A client that sends NBD_CMD_DISC and closes without waiting (QEMU's, the bench's python one) and at
    /// once deletes the export finds it free too: its disconnect may still lie unread in the daemon's socket when
    /// the QMP command comes, and qemu-storage-daemon, which reads both in one loop, never says "still in use".</summary>
    [Theory]
    [InlineData("strata")]
    [InlineData("qsd")]
    public Task AnExportIsFreeForASafeDeleteOnceAClientThatDoesNotWaitHasLeft(string kind) =>
        DeleteRightAfterEachClient(kind, 20, (socket, export) =>
        {
            ConnectAndLeave(socket, export);
            return Task.CompletedTask;
        });

    /// <summary>Adds an export, lets <paramref name="client"/> use it, and deletes it in safe mode at once, over and over.</summary>
    private async Task DeleteRightAfterEachClient(string kind, int rounds, Func<string, string, Task> client)
    {
        using var src = new BackupSourceProcess(kind, Dir, ["d"]);
        await using var qmp = await QmpClient.ConnectUnixAsync(src.QmpPath);
        for (int i = 0; i < rounds; i++)
        {
            await qmp.ExecuteAsync("block-export-add", JsonNode.Parse($$"""{"type":"nbd","id":"e{{i}}","node-name":"d","name":"e{{i}}","writable":true}"""));
            await client(src.NbdPath, $"e{i}");
            await qmp.ExecuteAsync("block-export-del", new { id = $"e{i}" });
        }
    }

    /// <summary>The shortest honest client: fixed newstyle handshake, NBD_OPT_EXPORT_NAME, NBD_CMD_DISC, close. Blocking
    /// calls on purpose: through <see cref="RawSession"/>'s asynchronous stream the awaits gave the daemon time to
    /// read the disconnect, and the test passed without the fix it guards.</summary>
    private static void ConnectAndLeave(string socketPath, string export)
    {
        using var s = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        s.Connect(new UnixDomainSocketEndPoint(socketPath));
        Assert.Equal("NBDMAGIC"u8.ToArray(), ReceiveExactly(s, 18)[..8]); // NBDMAGIC, IHAVEOPT, handshake flags
        s.Send([0, 0, 0, 3]); // FIXED_NEWSTYLE | NO_ZEROES
        byte[] name = System.Text.Encoding.UTF8.GetBytes(export);
        var option = new byte[16 + name.Length];
        BinaryPrimitives.WriteUInt64BigEndian(option, NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(8), 1); // NBD_OPT_EXPORT_NAME
        BinaryPrimitives.WriteUInt32BigEndian(option.AsSpan(12), (uint)name.Length);
        name.CopyTo(option, 16);
        s.Send(option);
        ReceiveExactly(s, 10); // size, transmission flags
        var disc = new byte[NbdConst.RequestHeaderLength];
        new NbdRequest(0, NbdCommand.Disc, 0, 0, 0).Write(disc);
        s.Send(disc);
    }

    private static byte[] ReceiveExactly(Socket s, int count)
    {
        var buffer = new byte[count];
        for (int got = 0; got < count;)
        {
            int n = s.Receive(buffer, got, count - got, SocketFlags.None);
            Assert.True(n > 0, "the server closed the connection during the handshake");
            got += n;
        }
        return buffer;
    }

    /// <summary>A client that connects the moment the socket appears finds the command line's exports, even the
    /// last of many: like qemu-storage-daemon, nobody is served before every --export is in place.</summary>
    [Fact]
    public async Task AClientConnectingAsSoonAsTheSocketAppearsFindsEveryCommandLineExport()
    {
        const int exports = 5000;
        string sock = P("early.nbd");
        var args = new List<string> { "--blockdev", "driver=null-co,node-name=n,size=1048576", "--nbd-server", $"addr.type=unix,addr.path={sock}" };
        for (int i = 0; i < exports; i++) args.AddRange(["--export", $"type=nbd,id=e{i},node-name=n,name=e{i}"]);
        using var daemon = new StrataDaemonProcess(Dir, "early", args, waitForMonitor: false);
        var sw = Stopwatch.StartNew();
        while (!File.Exists(sock))
        {
            Assert.False(daemon.Process.HasExited, "the daemon exited");
            Assert.True(sw.ElapsedMilliseconds < 30000, "no NBD socket");
            Thread.SpinWait(1000);
        }
        Listening.WaitFor(sock);
        await using var client = await NbdClient.ConnectUnixAsync(sock, $"e{exports - 1}");
        Assert.Equal(1 << 20, client.Size);
    }

    [Fact]
    public async Task QemuIoWritesThroughTheExportReadBackEverywhere()
    {
        string img = BaseImage("s.qcow2");
        string reference = P("r.qcow2");
        File.Copy(img, reference);
        Assert.Equal(0, Tools.Run("qemu-io", ["-f", "qcow2", .. Writes.SelectMany(w => new[] { "-c", w }), reference]).Exit);
        using (var d = StartStrata(img, "w", "writable=on"))
        {
            string uri = Uri(P("w.nbd"), "exp0");
            var io = Tools.Run("qemu-io", IoArgs(uri));
            Assert.True(io.Exit == 0, io.Stdout + io.Stderr);
            var read = Tools.Run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0 1M 64k", "-c", "read -P 0x21 63M 1M", uri);
            Assert.True(read.Exit == 0 && !read.Stdout.Contains("fail", StringComparison.OrdinalIgnoreCase), read.Stdout + read.Stderr);
            Assert.Equal(0, Tools.Run("nbdcopy", uri, P("copy.raw")).Exit);
            var cmp = Tools.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", P("copy.raw"), reference);
            Assert.True(cmp.Exit == 0, cmp.Stdout);
            var live = Tools.Run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", uri, reference);
            Assert.True(live.Exit == 0, live.Stdout + live.Stderr);
            await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
            await qmp.ExecuteAsync("quit");
            Assert.Equal(0, d.WaitForExit());
        }
        Assert.Equal(0, Tools.Run("qemu-img", "compare", img, reference).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "check", img).Exit);
    }

    [Fact]
    public async Task NbdinfoSeesWhatItSeesOnQemuStorageDaemon()
    {
        string q = BaseImage("q.qcow2");
        string s = P("s.qcow2");
        File.Copy(q, s);
        var results = new List<string[]>();
        // qemu-storage-daemon: enable b0 over QMP, write through the export, then ask nbdinfo.
        using (var qsd = new QsdProcess(q, "drive0", nbdSocket: P("q.nbd"), connect: true, fileNodeName: "f0"))
        {
            qsd.Execute("block-dirty-bitmap-enable", new Dictionary<string, string> { ["node"] = "drive0", ["name"] = "b0" });
            results.Add(Observe(Uri(P("q.nbd"), "drive0"), "drive0"));
        }
        using (var d = new StrataDaemonProcess(Dir, "s", [
            "--blockdev", $"driver=file,node-name=f0,filename={s}", "--blockdev", "driver=qcow2,node-name=drive0,file=f0",
            "--nbd-server", $"addr.type=unix,addr.path={P("s.nbd")}", "--export", "type=nbd,id=exp0,node-name=drive0,writable=on"]))
        {
            await using (var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath))
                await qmp.ExecuteAsync("block-dirty-bitmap-enable", new { node = "drive0", name = "b0" });
            results.Add(Observe(Uri(P("s.nbd"), "drive0"), "drive0"));
        }
        string[] labels = ["write", "map base:allocation", "can", "list", "size"];
        for (int i = 0; i < results[0].Length; i++)
            Assert.True(results[0][i] == results[1][i], $"{labels[Math.Min(i, labels.Length - 1)]}:\nqemu:\n{results[0][i]}\nstrata:\n{results[1][i]}");
    }

    /// <summary>Writes through the export, then everything nbdinfo reports (socket paths removed).</summary>
    private string[] Observe(string uri, string export)
    {
        var io = Tools.Run("qemu-io", IoArgs(uri));
        Assert.True(io.Exit == 0, io.Stderr);
        string Clean(string text) => text.Replace(Dir, "DIR").Replace("q.nbd", "X.nbd").Replace("s.nbd", "X.nbd");
        var outputs = new List<string> { io.Exit.ToString() };
        outputs.Add(Tools.Run("nbdinfo", "--map", uri).Stdout);
        foreach (var can in new[] { "flush", "fua", "trim", "zero", "fast-zero", "df", "multi-conn", "cache", "structured-reply", "connect" })
            outputs.Add($"{can}:{Tools.Run("nbdinfo", "--can", can, uri).Exit}");
        outputs.Add(Tools.Run("nbdinfo", "--is", "read-only", uri).Exit.ToString());
        outputs.Add(Tools.Run("nbdinfo", "--size", uri).Stdout);
        return outputs.Select(Clean).ToArray();
    }

    [Fact]
    public async Task DirtyBitmapExtentsMatchQemuStorageDaemon()
    {
        // The same recipe on both daemons: enabled bitmap, writes, then a read-only export of the disabled bitmap.
        string q = BaseImage("q.qcow2");
        string s = P("s.qcow2");
        File.Copy(q, s);
        string qmap, smap;
        using (var qsd = new QsdProcess(q, "drive0", nbdSocket: P("q.nbd"), connect: true, fileNodeName: "f0"))
        {
            qsd.Execute("block-dirty-bitmap-enable", new Dictionary<string, string> { ["node"] = "drive0", ["name"] = "b0" });
            Assert.Equal(0, Tools.Run("qemu-io", IoArgs(Uri(P("q.nbd"), "drive0"))).Exit);
            qsd.Execute("block-dirty-bitmap-disable", new Dictionary<string, string> { ["node"] = "drive0", ["name"] = "b0" });
            qsd.Execute("block-export-add", new Dictionary<string, object> { ["type"] = "nbd", ["id"] = "ro", ["node-name"] = "drive0", ["name"] = "ro", ["bitmaps"] = new[] { "b0" } });
            qmap = Tools.Run("nbdinfo", "--map=qemu:dirty-bitmap:b0", Uri(P("q.nbd"), "ro")).Stdout;
        }
        using (var d = new StrataDaemonProcess(Dir, "s", [
            "--blockdev", $"driver=file,node-name=f0,filename={s}", "--blockdev", "driver=qcow2,node-name=drive0,file=f0",
            "--nbd-server", $"addr.type=unix,addr.path={P("s.nbd")}", "--export", "type=nbd,id=exp0,node-name=drive0,writable=on"]))
        {
            await using var qmp = await QmpClient.ConnectUnixAsync(d.QmpPath);
            await qmp.ExecuteAsync("block-dirty-bitmap-enable", new { node = "drive0", name = "b0" });
            Assert.Equal(0, Tools.Run("qemu-io", IoArgs(Uri(P("s.nbd"), "drive0"))).Exit);
            await qmp.ExecuteAsync("block-dirty-bitmap-disable", new { node = "drive0", name = "b0" });
            await qmp.ExecuteAsync("block-export-add", JsonNode.Parse("""{"type":"nbd","id":"ro","node-name":"drive0","name":"ro","bitmaps":["b0"]}"""));
            smap = Tools.Run("nbdinfo", "--map=qemu:dirty-bitmap:b0", Uri(P("s.nbd"), "ro")).Stdout;
            // An exported bitmap is busy.
            var e = await Assert.ThrowsAsync<QmpException>(() => qmp.ExecuteAsync("block-dirty-bitmap-clear", new { node = "drive0", name = "b0" }));
            Assert.Equal("GenericError", e.ErrorClass);
        }
        Assert.False(string.IsNullOrWhiteSpace(qmap));
        Assert.Equal(qmap, smap);
    }

    [Fact]
    public async Task OurClientReadsQemuNbdAndQemuStorageDaemonExports()
    {
        string img = BaseImage("c.qcow2");
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x77 10M 3M", img).Exit);
        var expected = new byte[64 << 20];
        Assert.Equal(0, Tools.Run("qemu-img", "convert", "-O", "raw", img, P("c.raw")).Exit);
        expected = File.ReadAllBytes(P("c.raw"));

        // qemu-nbd, read-only, with the (disabled) bitmap exported.
        string sock = P("qnbd.sock");
        var psi = new ProcessStartInfo("qemu-nbd") { UseShellExecute = false, RedirectStandardError = true };
        foreach (var a in new[] { "-r", "-f", "qcow2", "-k", sock, "-B", "b0", "-x", "c", img }) psi.ArgumentList.Add(a);
        using var qemuNbd = Process.Start(psi)!;
        try
        {
            var sw = Stopwatch.StartNew();
            while (!File.Exists(sock) && sw.ElapsedMilliseconds < 10000) Thread.Sleep(20);
            Listening.WaitFor(sock);
            await using var client = await NbdClient.ConnectUnixAsync(sock, "c", ["base:allocation", "qemu:dirty-bitmap:b0"]);
            Assert.Equal(64 << 20, client.Size);
            Assert.True(client.ReadOnly);
            var buf = new byte[client.Size];
            var reads = Enumerable.Range(0, 16).Select(i => client.ReadAsync(i * (4L << 20), buf.AsMemory(i * (4 << 20), 4 << 20))).ToArray();
            await Task.WhenAll(reads); // pipelined
            Assert.True(buf.AsSpan().SequenceEqual(expected));
            var alloc = await client.ExtentsWithFlagAsync("base:allocation", 1); // holes
            Assert.DoesNotContain(alloc, h => h.Offset < (3 << 20) && h.Offset + h.Length > (2 << 20));
            Assert.Empty(await client.ExtentsWithFlagAsync("qemu:dirty-bitmap:b0", 1));
        }
        finally
        {
            qemuNbd.Kill();
            qemuNbd.WaitForExit();
        }

        // qemu-storage-daemon with an enabled bitmap: dirty extents of our own writes through our client.
        using var qsd = new QsdProcess(img, "drive0", nbdSocket: P("qsd.nbd"), connect: true, fileNodeName: "f0");
        qsd.Execute("block-dirty-bitmap-enable", new Dictionary<string, string> { ["node"] = "drive0", ["name"] = "b0" });
        await using (var w = await NbdClient.ConnectUnixAsync(P("qsd.nbd"), "drive0"))
        {
            await w.WriteAsync(5 << 20, new byte[70000].Select(_ => (byte)9).ToArray());
            await w.WriteZeroesAsync(40 << 20, 1 << 20);
            await w.FlushAsync();
        }
        qsd.Execute("block-dirty-bitmap-disable", new Dictionary<string, string> { ["node"] = "drive0", ["name"] = "b0" });
        qsd.Execute("block-export-add", new Dictionary<string, object> { ["type"] = "nbd", ["id"] = "ro", ["node-name"] = "drive0", ["name"] = "ro", ["bitmaps"] = new[] { "b0" } });
        await using var r = await NbdClient.ConnectUnixAsync(P("qsd.nbd"), "ro", ["qemu:dirty-bitmap:b0"]);
        var dirty = await r.ExtentsWithFlagAsync("qemu:dirty-bitmap:b0", 1);
        Assert.Equal([(5L << 20, 131072L), (40L << 20, 1L << 20)], dirty);
        var back = new byte[70000];
        await r.ReadAsync(5 << 20, back);
        Assert.All(back, b => Assert.Equal(9, b));
    }

    [Fact]
    public async Task HostileClientsGetErrorsOrAreDroppedAndOthersKeepWorking()
    {
        string img = BaseImage("h.qcow2");
        using var d = StartStrata(img, "h", "writable=on");
        string sock = P("h.nbd");

        // Bad magic after the handshake, unknown options, oversize option data, a bogus client flag.
        await RawSession(sock, async s =>
        {
            await Handshake(s);
            await SendOption(s, 99, []);
            Assert.Equal((uint)NbdReply.ErrUnsup, (await ReadOptionReply(s)).Type);
            await SendOption(s, (uint)NbdOption.Go, [0, 0, 0, 50, 0, 0]); // name length past the data
            Assert.Equal((uint)NbdReply.ErrInvalid, (await ReadOptionReply(s)).Type);
            await SendOption(s, (uint)NbdOption.Go, [0, 0, 0, 4, (byte)'n', (byte)'o', (byte)'p', (byte)'e', 0, 0]);
            Assert.Equal((uint)NbdReply.ErrUnknown, (await ReadOptionReply(s)).Type);
            await SendOption(s, (uint)NbdOption.List, new byte[(1 << 20) + 1]);
            Assert.Equal((uint)NbdReply.ErrTooBig, (await ReadOptionReply(s)).Type);
        });
        await RawSession(sock, async s =>
        {
            await s.ReadExactlyAsync(new byte[18]);
            await s.WriteAsync(new byte[] { 0, 0, 0, 0x80 }); // unknown client flag: the server hangs up
            Assert.Equal(0, await s.ReadAsync(new byte[1]));
        });

        await using (var c = await NbdClient.ConnectUnixAsync(sock, "exp0", ["base:allocation"]))
        {
            // Past the end, unaligned, zero-length and unknown requests get errnos; the connection survives.
            var e = await Assert.ThrowsAsync<NbdException>(() => c.ReadAsync(c.Size - 10, new byte[20]));
            Assert.Equal(NbdErrno.EINVAL, e.Errno);
            await c.WriteAsync(12345, new byte[] { 1, 2, 3 }); // unaligned is fine (minimum block size 1)
            var small = new byte[3];
            await c.ReadAsync(12345, small);
            Assert.Equal(new byte[] { 1, 2, 3 }, small);
            var bs = await Assert.ThrowsAsync<NbdException>(() => c.BlockStatusAsync("base:allocation", c.Size, 1));
            Assert.Equal(NbdErrno.EINVAL, bs.Errno);
        }
        // A client that disconnects in the middle of a write payload, and one that never reads its replies.
        await RawSession(sock, async s =>
        {
            await Handshake(s, go: "exp0");
            var h = new byte[28];
            new NbdRequest(0, NbdCommand.Write, 1, 0, 1 << 20).Write(h);
            await s.WriteAsync(h);
            await s.WriteAsync(new byte[1000]);
        });
        await RawSession(sock, async s =>
        {
            await Handshake(s, go: "exp0");
            var h = new byte[28];
            for (int i = 0; i < 200; i++)
            {
                new NbdRequest(0, NbdCommand.Read, (ulong)i, 0, 1 << 20).Write(h);
                await s.WriteAsync(h);
            }
        });
        // Many connections at once.
        var many = new List<NbdClient>();
        for (int i = 0; i < 60; i++) many.Add(await NbdClient.ConnectUnixAsync(sock, "exp0"));
        await Task.WhenAll(many.Select((c, i) => c.WriteAsync(i * 4096L, Enumerable.Repeat((byte)(i + 1), 4096).ToArray())));
        foreach (var c in many) await c.DisposeAsync();

        // The daemon still serves, and every acknowledged write is there.
        await using var check = await NbdClient.ConnectUnixAsync(sock, "exp0");
        var page = new byte[4096];
        for (int i = 0; i < 60; i++)
        {
            await check.ReadAsync(i * 4096L, page);
            if (i * 4096L is >= 12288 and < 16384) continue; // overlaps the 3-byte write at 12345
            Assert.All(page, b => Assert.Equal(i + 1, b));
        }
    }

    [Fact]
    public async Task AnNbdNodeSitsOnAnotherDaemonsExport()
    {
        string img = BaseImage("remote.qcow2");
        using var a = StartStrata(img, "a", "writable=on");
        var graph = new Strata.Block.Graph.BlockGraph();
        var b = new Strata.Daemon.DaemonBackend(graph);
        await b.ExecuteAsync("blockdev-add", (JsonObject)JsonNode.Parse(
            $$"""{"driver":"nbd","node-name":"remote","server":{"type":"unix","path":"{{P("a.nbd")}}"},"export":"exp0"}""")!, default);
        await b.ExecuteAsync("block-dirty-bitmap-add", (JsonObject)JsonNode.Parse("""{"node":"remote","name":"local"}""")!, default);
        var node = graph.Find("remote")!;
        Assert.Equal(64 << 20, node.Image.Size);
        var buf = new byte[1 << 20];
        node.Image.Read(2 << 20, buf);
        Assert.All(buf, x => Assert.Equal(0x11, x));
        node.Image.Write(7 << 20, Enumerable.Repeat((byte)0x66, 65536).ToArray());
        node.Image.Flush();
        Assert.Equal(Strata.Block.LayerState.Zero, node.Image.GetLayerStatus(30 << 20, 1 << 20).State);
        Assert.Equal(65536, node.Image.Bitmaps.Get("local").CountBytes); // writes through the node mark its bitmaps
        var infos = (JsonArray)Strata.Protocol.Qmp.QmpValues.ToNode(await b.ExecuteAsync("query-named-block-nodes", new JsonObject(), default))!;
        Assert.Equal("nbd", infos[0]!["drv"]!.GetValue<string>());
        graph.Dispose();
        await using var qmp = await QmpClient.ConnectUnixAsync(a.QmpPath);
        await qmp.ExecuteAsync("quit");
        Assert.Equal(0, a.WaitForExit());
        var check = Tools.Run("qemu-io", "-c", "read -P 0x66 7M 64k", img);
        Assert.True(check.Exit == 0 && !check.Stdout.Contains("fail", StringComparison.OrdinalIgnoreCase), check.Stdout + check.Stderr);
    }

    private static async Task RawSession(string sock, Func<NetworkStream, Task> body)
    {
        using var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        await socket.ConnectAsync(new UnixDomainSocketEndPoint(sock));
        await using var s = new NetworkStream(socket);
        await body(s).WaitAsync(TimeSpan.FromSeconds(20));
    }

    private static async Task Handshake(NetworkStream s, string? go = null)
    {
        await s.ReadExactlyAsync(new byte[18]);
        await s.WriteAsync(new byte[] { 0, 0, 0, 3 });
        if (go is null) return;
        var name = System.Text.Encoding.UTF8.GetBytes(go);
        var data = new byte[6 + name.Length];
        BinaryPrimitives.WriteUInt32BigEndian(data, (uint)name.Length);
        name.CopyTo(data, 4);
        await SendOption(s, (uint)NbdOption.Go, data);
        while ((await ReadOptionReply(s)).Type != (uint)NbdReply.Ack) { }
    }

    private static async Task SendOption(NetworkStream s, uint option, byte[] data)
    {
        var h = new byte[16];
        BinaryPrimitives.WriteUInt64BigEndian(h, NbdConst.IHaveOpt);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(8), option);
        BinaryPrimitives.WriteUInt32BigEndian(h.AsSpan(12), (uint)data.Length);
        await s.WriteAsync(h);
        await s.WriteAsync(data);
    }

    private static async Task<(uint Type, byte[] Data)> ReadOptionReply(NetworkStream s)
    {
        var h = new byte[20];
        await s.ReadExactlyAsync(h);
        var data = new byte[BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(16))];
        await s.ReadExactlyAsync(data);
        return (BinaryPrimitives.ReadUInt32BigEndian(h.AsSpan(12)), data);
    }
}
