using Tools = Strata.Interop.Tests.Infra.Tools;
using System.Diagnostics;
using Strata.Protocol.Nbd;

namespace Strata.Interop.Tests;

/// <summary>
/// A storage daemon serving qcow2 disks for the backup manager: qemu-storage-daemon or `strata daemon`, started
/// with the same command line (one file + qcow2 node per disk, a QMP socket, an NBD server with a writable
/// export per disk for the "guest"). It can be killed and started again on the same images.
/// </summary>
public sealed class BackupSourceProcess : IDisposable
{
    private Process? _process;
    private readonly System.Text.StringBuilder _log = new();
    private readonly string _dir;
    private readonly string[] _disks;
    public string Kind { get; }
    public string QmpPath => Path.Combine(_dir, Kind + ".qmp");
    public string NbdPath => Path.Combine(_dir, Kind + ".nbd");
    public string Image(string disk) => Path.Combine(_dir, disk + ".qcow2");
    /// <summary>A raw disk's data file (with <c>rawDisks</c>): the disk itself, byte for byte.</summary>
    public string DataFile(string disk) => Path.Combine(_dir, disk + ".raw");

    private readonly string[] _daemonOptions;

    /// <param name="rawDisks">Each disk is a raw file with a qcow2 of metadata (data_file, data_file_raw=on), which the
    /// daemons open from the name in its header.</param>
    /// <param name="daemonOptions">More options for the daemon's command line (strata only: e.g. crash-safe tracking off).</param>
    public BackupSourceProcess(string kind, string dir, string[] disks, string size = "32M", bool createImages = true, bool rawDisks = false,
        string[]? daemonOptions = null)
    {
        Kind = kind;
        _daemonOptions = daemonOptions ?? [];
        _dir = dir;
        _disks = disks;
        if (createImages)
            foreach (var d in disks)
            {
                Assert.Equal(0, (rawDisks
                    ? Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", "-o", $"data_file={DataFile(d)},data_file_raw=on", Image(d), size)
                    : Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", Image(d), size)).Exit);
                // Some data before the first backup, and a hole.
                Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 0x11 0 4M", "-c", "write -P 0x12 12M 3M", Image(d)).Exit);
            }
        Start();
    }

    public void Start()
    {
        File.Delete(QmpPath);
        File.Delete(NbdPath);
        var args = new List<string>();
        foreach (var d in _disks)
            args.AddRange(["--blockdev", $"driver=file,node-name={d}-file,filename={Image(d)}", "--blockdev", $"driver=qcow2,node-name={d},file={d}-file"]);
        args.AddRange(["--chardev", $"socket,id=qmp0,path={QmpPath},server=on,wait=off", "--monitor", "chardev=qmp0", "--nbd-server", $"addr.type=unix,addr.path={NbdPath}"]);
        foreach (var d in _disks) args.AddRange(["--export", $"type=nbd,id=guest-{d},node-name={d},name={d},writable=on"]);
        args.AddRange(_daemonOptions);
        var psi = Kind == "qsd"
            ? new ProcessStartInfo("qemu-storage-daemon")
            : Tools.StrataStartInfo("daemon");
        psi.RedirectStandardError = psi.RedirectStandardOutput = true;
        psi.UseShellExecute = false;
        foreach (var a in args) psi.ArgumentList.Add(a);
        _process = Process.Start(psi)!;
        Listening.WaitForProcess(_process, Kind, 15000, QmpPath, NbdPath);
        // Drained from now on: a daemon that says much would otherwise block on a full pipe.
        var started = _process;
        started.OutputDataReceived += (_, e) => { if (e.Data is not null) lock (_log) _log.AppendLine(e.Data); };
        started.ErrorDataReceived += (_, e) => { if (e.Data is not null) lock (_log) _log.AppendLine(e.Data); };
        started.BeginOutputReadLine();
        started.BeginErrorReadLine();
    }

    /// <summary>What the daemon printed (stdout and stderr) since it started listening, for failure messages.</summary>
    public string Log
    {
        get { lock (_log) return _log.ToString(); }
    }

    /// <summary>Waits for the daemon to exit by itself (after QMP quit); false on timeout.</summary>
    public bool WaitForExit(int ms) => _process!.WaitForExit(ms);

    public int Pid => _process!.Id;

    /// <summary>SIGKILL: nothing is flushed or closed.</summary>
    public void Kill()
    {
        _process!.Kill();
        _process.WaitForExit();
    }

    /// <summary>Connects to a disk's export. On a loaded machine a connection right after another one closed was
    /// seen refused for a moment (ECONNREFUSED from a full listen backlog), so this tries again briefly.</summary>
    public async Task<NbdClient> ConnectAsync(string disk)
    {
        for (int attempt = 0; ; attempt++)
        {
            try
            {
                return await NbdClient.ConnectUnixAsync(NbdPath, disk);
            }
            catch (System.Net.Sockets.SocketException e) when (e.SocketErrorCode == System.Net.Sockets.SocketError.ConnectionRefused && attempt < 40)
            {
                await Task.Delay(25);
            }
        }
    }

    /// <summary>The guest writes: random 64 KiB blocks (seeded), and zeroes one range that held data.</summary>
    public async Task GuestWritesAsync(string disk, int seed, int blocks = 24)
    {
        await using var nbd = await ConnectAsync(disk);
        var rng = new Random(seed);
        var data = new byte[65536];
        for (int i = 0; i < blocks; i++)
        {
            rng.NextBytes(data);
            await nbd.WriteAsync(rng.Next(0, (int)(nbd.Size / 65536)) * 65536L, data);
        }
        await nbd.WriteZeroesAsync(rng.Next(0, 64) * 65536L, 65536);
        await nbd.FlushAsync();
    }

    /// <summary>A raw copy of the disk as the guest sees it now.</summary>
    public async Task CopyAsync(string disk, string to)
    {
        await using var nbd = await ConnectAsync(disk);
        await File.WriteAllBytesAsync(to, await nbd.ReadAllAsync());
    }

    public void Dispose()
    {
        if (_process is { HasExited: false }) _process.Kill();
        _process?.Dispose();
    }
}
