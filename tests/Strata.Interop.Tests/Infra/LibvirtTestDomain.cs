namespace Strata.Interop.Tests.Infra;

/// <summary>
/// A tiny TCG domain defined in the real libvirtd (qemu:///system) for the libvirt backup tests: no OS, only
/// running with its qcow2 disks attached. The "guest" writes through HMP qemu-io on each disk's virtio backend,
/// which goes through the device's block backend and so through a running backup's copy-before-write filter.
/// Destroyed and undefined (with its checkpoints' metadata) when disposed.
/// </summary>
public sealed class LibvirtTestDomain : IDisposable
{
    public const string Uri = "qemu:///system";
    public string Name { get; }
    public IReadOnlyList<string> Targets { get; }
    private readonly string _dir;

    private readonly Dictionary<string, string> _formats = [];

    public string Image(string target) => Path.Combine(_dir, $"{Name}-{target}.{_formats[target]}");

    /// <summary>A domain with <paramref name="disks"/> disks (vda, vdb…), qcow2 unless <paramref name="formats"/> says
    /// otherwise disk by disk.</summary>
    public LibvirtTestDomain(string dir, int disks = 2, string size = "64M", string[]? formats = null, bool paused = true)
    {
        _paused = paused;
        EnsureLibvirtd();
        _dir = dir;
        Name = "sit" + Convert.ToHexStringLower(System.Security.Cryptography.RandomNumberGenerator.GetBytes(4));
        Targets = Enumerable.Range(0, disks).Select(i => "vd" + (char)('a' + i)).ToList();
        var diskXml = new System.Text.StringBuilder();
        for (int i = 0; i < Targets.Count; i++)
        {
            string t = Targets[i], format = formats?[i] ?? "qcow2";
            _formats[t] = format;
            Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", format, Image(t), size).Exit);
            // Data before the first backup, and a hole after it.
            Tools.QemuIo(Image(t), ["write -P 0x11 0 2M", "write -P 0x12 8M 1M"], format);
            diskXml.Append($"<disk type='file' device='disk'><driver name='qemu' type='{format}'/><source file='{Image(t)}'/><target dev='{t}' bus='virtio'/></disk>");
        }
        string xml = $"""
            <domain type='qemu'>
              <name>{Name}</name>
              <memory unit='MiB'>64</memory>
              <vcpu>1</vcpu>
              <os><type arch='x86_64' machine='q35'>hvm</type></os>
              <devices>
                <emulator>/usr/bin/qemu-system-x86_64</emulator>
                {diskXml}
                <serial type='null'/><video><model type='none'/></video><memballoon model='none'/>
              </devices>
            </domain>
            """;
        string file = Path.Combine(dir, Name + ".xml");
        File.WriteAllText(file, xml);
        Virsh("define", file);
        Start();
    }

    /// <summary>Fails (not skips) when libvirtd does not answer: CI starts it with tests/scripts/libvirt-setup.sh.</summary>
    private static void EnsureLibvirtd()
    {
        ToolResult r;
        try
        {
            r = Tools.Run("virsh", "-c", Uri, "version");
        }
        catch (InvalidOperationException e)
        {
            Assert.Fail($"virsh is not installed ({e.Message}): run tests/scripts/libvirt-setup.sh");
            throw;
        }
        Assert.True(r.Exit == 0, "libvirtd does not answer: run tests/scripts/libvirt-setup.sh\n" + r);
    }

    public static ToolResult Virsh(params string[] args)
    {
        var r = Tools.Run("virsh", ["-c", Uri, .. args]);
        Assert.True(r.Exit == 0, "virsh failed:\n" + r);
        return r;
    }

    private readonly bool _paused;

    /// <summary>Started paused unless asked otherwise: the backup flow is the same, and a paused TCG domain costs no
    /// CPU (a running one idles in SeaBIOS, which finds nothing to boot and only reads).</summary>
    public void Start()
    {
        if (_paused) Virsh("start", Name, "--paused");
        else Virsh("start", Name);
    }

    public void Destroy() => Virsh("destroy", Name);

    public bool Running => Virsh("domstate", Name).Stdout.Trim() is "running" or "paused";

    private static string Backend(int index) => $"/machine/peripheral/virtio-disk{index}/virtio-backend";

    /// <summary>qemu-io commands on a disk of the running domain; HMP returns qemu-io's errors, and nothing on success.</summary>
    public void Write(string target, params string[] commands)
    {
        int index = Targets.ToList().IndexOf(target);
        foreach (var c in commands)
        {
            var r = Virsh("qemu-monitor-command", Name, "--hmp", $"qemu-io -d {Backend(index)} \"{c}\"");
            Assert.True(r.Stdout.Trim().Length == 0, $"qemu-io '{c}' on {target} failed:\n{r}");
        }
    }

    /// <summary>Each disk as it is now, as raw files DIR/NAME-TARGET.raw: flushed first (a paused domain keeps new
    /// metadata in QEMU's cache), then read with the image lock not taken (-U).</summary>
    public Dictionary<string, string> Copy(string dir, string name)
    {
        var copies = new Dictionary<string, string>();
        foreach (var t in Targets)
        {
            if (Running) Write(t, "flush");
            string to = Path.Combine(dir, $"{name}-{t}.raw");
            Tools.QemuImg("convert", "-U", "-f", _formats[t], "-O", "raw", Image(t), to).Ok();
            copies[t] = to;
        }
        return copies;
    }

    public IReadOnlyList<string> Checkpoints() =>
        Virsh("checkpoint-list", Name, "--name").Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);

    /// <summary>Whether libvirt has a job on the domain (a pull backup shows as "Unbounded").</summary>
    public bool HasJob() => !Virsh("domjobinfo", Name).Stdout.Contains("None", StringComparison.Ordinal);

    public void Dispose()
    {
        Tools.Run("virsh", "-c", Uri, "destroy", Name);
        Tools.Run("virsh", "-c", Uri, "undefine", Name, "--checkpoints-metadata");
    }
}
