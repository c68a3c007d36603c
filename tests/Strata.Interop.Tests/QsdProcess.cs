using System.Diagnostics;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;

namespace Strata.Interop.Tests;

/// <summary>A qemu-storage-daemon with one qcow2 node and a QMP socket, for tests that let QEMU judge.</summary>
internal sealed class QsdProcess : IDisposable
{
    private readonly Process _process;
    private readonly Socket _socket;
    private readonly StreamReader _reader;
    private readonly NetworkStream _stream;
    public string Dir { get; }

    public string QmpPath { get; }

    /// <param name="connect">False leaves the QMP socket free for another client (qsd serves one at a time).</param>
    public QsdProcess(string image, string nodeName = "disk0", bool readOnly = false, string? nbdSocket = null, bool connect = true, string? fileNodeName = null)
    {
        fileNodeName ??= nodeName + "-file";
        Dir = Directory.CreateTempSubdirectory("strata-qsd-").FullName;
        string qmp = QmpPath = Path.Combine(Dir, "qmp.sock");
        var args = new List<string>
        {
            "--blockdev", $"driver=file,filename={image.Replace(",", ",,")},node-name={fileNodeName},read-only={(readOnly ? "on" : "off")}",
            "--blockdev", $"driver=qcow2,file={fileNodeName},node-name={nodeName},read-only={(readOnly ? "on" : "off")}",
            "--chardev", $"socket,id=qmp0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=qmp0",
        };
        if (nbdSocket is not null)
        {
            args.Add("--nbd-server");
            args.Add($"addr.type=unix,addr.path={nbdSocket}");
            args.Add("--export");
            args.Add($"type=nbd,id=exp0,node-name={nodeName},name={nodeName},writable=on");
        }
        // Seen once in CI: qemu-storage-daemon 7.2 sent its greeting to a client that connected as the socket appeared,
        // then never read the connection (one thread left blocking in accept on the listener). Reads time out, and a
        // daemon that does not answer qmp_capabilities is started again.
        for (int attempt = 1; ; attempt++)
        {
            File.Delete(qmp);
            if (nbdSocket is not null) File.Delete(nbdSocket);
            var psi = new ProcessStartInfo("qemu-storage-daemon") { RedirectStandardError = true, RedirectStandardOutput = true, UseShellExecute = false };
            foreach (var a in args) psi.ArgumentList.Add(a);
            try
            {
                _process = Process.Start(psi)!;
            }
            catch (System.ComponentModel.Win32Exception e)
            {
                throw new InvalidOperationException("qemu-storage-daemon is not installed (apt-get install qemu-system-common): " + e.Message);
            }
            Listening.WaitForProcess(_process, "qemu-storage-daemon", 10000, nbdSocket is null ? [qmp] : [qmp, nbdSocket]);
            _socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified) { ReceiveTimeout = 30_000 };
            if (!connect)
            {
                _stream = null!;
                _reader = null!;
                return;
            }
            try
            {
                _socket.Connect(new UnixDomainSocketEndPoint(qmp));
                _stream = new NetworkStream(_socket);
                _reader = new StreamReader(_stream, Encoding.UTF8);
                _reader.ReadLine(); // greeting
                Execute("qmp_capabilities");
                return;
            }
            catch (IOException) when (attempt < 3)
            {
                _socket.Dispose();
                _process.Kill();
                _process.WaitForExit();
                _process.Dispose();
            }
        }
    }

    /// <summary>Runs a command; returns "return" or throws with the error description.</summary>
    public JsonNode? Execute(string command, object? arguments = null)
    {
        var msg = new JsonObject { ["execute"] = command };
        if (arguments is not null) msg["arguments"] = JsonSerializer.SerializeToNode(arguments);
        var bytes = Encoding.UTF8.GetBytes(msg.ToJsonString() + "\n");
        _stream.Write(bytes);
        while (true)
        {
            string line = _reader.ReadLine() ?? throw new IOException("QMP connection closed");
            var node = JsonNode.Parse(line)!;
            if (node["event"] is not null) continue;
            if (node["error"] is { } err) throw new InvalidOperationException($"{command}: {err["class"]}: {err["desc"]}");
            return node["return"];
        }
    }

    public string Sha256(string node, string name) =>
        Execute("x-debug-block-dirty-bitmap-sha256", new Dictionary<string, string> { ["node"] = node, ["name"] = name })!["sha256"]!.GetValue<string>();

    /// <summary>The dirty-bitmaps entries of a node in query-named-block-nodes.</summary>
    public JsonArray Bitmaps(string node)
    {
        var nodes = Execute("query-named-block-nodes")!.AsArray();
        var n = nodes.First(x => x!["node-name"]!.GetValue<string>() == node)!;
        return n["dirty-bitmaps"]?.AsArray() ?? new JsonArray();
    }

    public void Quit()
    {
        try { Execute("quit"); } catch (IOException) { }
        _process.WaitForExit(10000);
    }

    public void Kill()
    {
        _process.Kill();
        _process.WaitForExit();
    }

    public void Dispose()
    {
        if (!_process.HasExited) Kill();
        _socket.Dispose();
        _process.Dispose();
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { }
    }
}
