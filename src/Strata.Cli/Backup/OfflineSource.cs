using Strata.Backup;
using Strata.Block;
using Strata.Daemon;

namespace Strata.Cli.Backup;

/// <summary>
/// Disks that no daemon serves, backed up offline: for one run, an in-process strata daemon opens each image under
/// the node name its online source uses, so the run follows exactly the online rules — the same repository, the
/// same bitmap rotation (persistent bitmaps, stored in the image when the daemon closes it) and the same failure
/// handling. The images are locked as qemu-img would lock them: a disk a running VM holds is refused.
/// </summary>
internal sealed class OfflineSource : IAsyncDisposable
{
    private readonly DaemonHost _host;
    private readonly string _dir;

    /// <summary>The QMP socket the backup run talks to.</summary>
    public string QmpSocket { get; }

    private const string InUseHint = "an image in use (a running VM, a daemon) is backed up online: use --socket";

    private OfflineSource(DaemonHost host, string dir, string qmp)
    {
        _host = host;
        _dir = dir;
        QmpSocket = qmp;
    }

    public static OfflineSource Open(IReadOnlyList<string> images, IReadOnlyList<string> disks)
    {
        if (images.Count != disks.Count)
            throw new BackupException("give one --disk per --image", "--disk names the node the image is known by online, so its chain continues", BackupExitCodes.Usage);
        foreach (var image in images)
            if (!File.Exists(image)) throw new BackupException($"no image '{image}'", exitCode: BackupExitCodes.Usage);
        // Opened first as qemu-img would open it: a disk that a running VM or daemon writes is refused now, with
        // its lock's words, rather than when the backup's transaction takes the lock.
        foreach (var image in images)
        {
            try
            {
                ImageOpener.Open(image, null, readOnly: true, openBacking: false).Dispose();
            }
            catch (BlockException e)
            {
                throw new BackupException($"cannot open '{image}' offline: {e.Message}", InUseHint, BackupExitCodes.Source);
            }
        }
        // A short folder of its own: unix socket paths must stay under 108 bytes.
        string dir = Directory.CreateTempSubdirectory("strata-offline-").FullName;
        string qmp = Path.Combine(dir, "qmp.sock");
        var args = new List<string>();
        for (int i = 0; i < images.Count; i++)
        {
            string file = Path.GetFullPath(images[i]).Replace(",", ",,");
            args.AddRange(["--blockdev", $"driver=file,node-name={disks[i]}-file,filename={file}"]);
            args.AddRange(["--blockdev", $"driver={ProbeFormat(images[i])},node-name={disks[i]},file={disks[i]}-file"]);
        }
        args.AddRange(["--chardev", $"socket,id=qmp0,path={qmp},server=on,wait=off", "--monitor", "chardev=qmp0"]);
        DaemonHost? host = null;
        try
        {
            host = new DaemonHost(DaemonCommandLine.Parse([.. args]));
            host.Start();
            return new OfflineSource(host, dir, qmp);
        }
        catch (DaemonUsageException e)
        {
            host?.DisposeAsync().AsTask().GetAwaiter().GetResult();
            Directory.Delete(dir, recursive: true);
            throw new BackupException($"cannot open the image offline: {e.Message}", InUseHint, BackupExitCodes.Source);
        }
    }

    private static ReadOnlySpan<byte> Qcow2Magic => [(byte)'Q', (byte)'F', (byte)'I', 0xfb];

    /// <summary>qcow2 or raw, by the image's first bytes (a raw disk has no persistent bitmaps: full only).</summary>
    private static string ProbeFormat(string image)
    {
        Span<byte> magic = stackalloc byte[4];
        using var f = File.OpenRead(image);
        return f.Read(magic) == 4 && magic.SequenceEqual(Qcow2Magic) ? "qcow2" : "raw";
    }

    /// <summary>Closes the images: their persistent bitmaps are stored.</summary>
    public async ValueTask DisposeAsync()
    {
        await _host.DisposeAsync();
        try { Directory.Delete(_dir, recursive: true); } catch (IOException) { }
    }
}
