using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using Strata.Backup.Chunks;

namespace Strata.Interop.Tests.Infra;

/// <summary>
/// A one-node Ceph with radosgw (tests/scripts/ceph-start.sh) shared by the test classes of the <see cref="CephCollection"/>:
/// started once before the first of them, stopped (rgw → osd → mon) and its folder removed after the last. It runs on
/// ports free at start, so runs from several worktrees on one machine do not collide. While it runs, the test process
/// has AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION and AWS_EC2_METADATA_DISABLED set to
/// it, so strata run in-process or as a child process (which inherits them) reaches it with no further options.
/// When Ceph cannot start (not installed, a daemon does not come up), every test of the collection fails with the
/// script's output: .ci/run installs Ceph.
/// </summary>
public sealed class CephCluster : IDisposable
{
    public const string Region = "us-east-1";
    public const string AccessKey = "strata-test";
    public const string SecretKey = "strata-test-secret";
    private static readonly TimeSpan StartTimeout = TimeSpan.FromMinutes(5);

    private readonly Dictionary<string, string?> _savedEnvironment = [];

    public CephCluster()
    {
        Dir = Path.Combine(Path.GetTempPath(), "strata-ceph-" + Guid.NewGuid().ToString("N")[..8]);
        string script = Script("ceph-start.sh");
        // A port taken between choosing it and the daemon binding it fails the start: choose again, once.
        ToolResult? start = null;
        for (int attempt = 0; attempt < 2 && start is not { Exit: 0 }; attempt++)
        {
            int monPort = FreePort(), monV1Port = FreePort(), rgwPort = FreePort();
            Endpoint = $"http://127.0.0.1:{rgwPort}";
            start = RunScript(script, new()
            {
                ["STRATA_CEPH_MON_PORT"] = monPort.ToString(),
                ["STRATA_CEPH_MON_V1_PORT"] = monV1Port.ToString(),
                ["STRATA_CEPH_RGW_PORT"] = rgwPort.ToString(),
                ["STRATA_CEPH_ACCESS_KEY"] = AccessKey,
                ["STRATA_CEPH_SECRET_KEY"] = SecretKey,
            }, StartTimeout);
        }
        if (start is not { Exit: 0 })
        {
            RunScript(Script("ceph-stop.sh"), [], TimeSpan.FromMinutes(2));
            throw new InvalidOperationException($"the test Ceph did not start (install it with .ci/run):\n{start}");
        }
        StartOutput = start.Stdout.Trim();
        foreach (var (name, value) in Environment)
        {
            _savedEnvironment[name] = System.Environment.GetEnvironmentVariable(name);
            System.Environment.SetEnvironmentVariable(name, value);
        }
        // The first write of a new cluster creates radosgw's data pools (1–2 s): pay it here, not in a test.
        using var warm = OpenStore(NewBucket("warmup"));
        warm.PutAsync("warmup", "warm"u8.ToArray()).GetAwaiter().GetResult();
    }

    /// <summary>The cluster's folder: ceph.conf, data, run/*.pid, log/*.log.</summary>
    public string Dir { get; }

    /// <summary>S3 endpoint, http://127.0.0.1:PORT.</summary>
    public string Endpoint { get; private set; } = "";

    /// <summary>The start script's last line ("S3 ready on … after N s").</summary>
    public string StartOutput { get; } = "";

    /// <summary>What a client needs to reach the cluster as the test user (set in this process while it runs; add it
    /// to a child process started with a cleared environment).</summary>
    public IReadOnlyDictionary<string, string> Environment => new Dictionary<string, string>
    {
        ["AWS_ENDPOINT_URL"] = Endpoint,
        ["AWS_ACCESS_KEY_ID"] = AccessKey,
        ["AWS_SECRET_ACCESS_KEY"] = SecretKey,
        ["AWS_REGION"] = Region,
        ["AWS_EC2_METADATA_DISABLED"] = "true",
    };

    public S3Connection Connection => new(Endpoint, Region, AccessKey, SecretKey);

    /// <summary>Creates a bucket no other test uses and returns its name (NAME-HINT-random, lower-case).</summary>
    public string NewBucket(string hint)
    {
        string safe = new string(hint.ToLowerInvariant().Select(c => char.IsAsciiLetterOrDigit(c) ? c : '-').ToArray()).Trim('-');
        string name = $"t-{(safe.Length > 40 ? safe[..40] : safe)}-{Guid.NewGuid().ToString("N")[..10]}";
        using var store = OpenStore(name);
        Assert.True(store.EnsureBucketAsync().GetAwaiter().GetResult(), $"bucket {name} already existed");
        return name;
    }

    /// <summary>A store on BUCKET[/PREFIX] of this cluster (the caller disposes it).</summary>
    public S3ObjectStore OpenStore(string bucket, string prefix = "") => new(Connection, bucket, prefix);

    /// <summary>The repository argument for BUCKET[/PREFIX]: s3://BUCKET[/PREFIX].</summary>
    public static string RepoUrl(string bucket, string prefix = "") => new S3Address(bucket, prefix).ToString();

    /// <summary>Adds <see cref="Environment"/> to a process about to start.</summary>
    public void AddTo(ProcessStartInfo psi)
    {
        foreach (var (name, value) in Environment) psi.Environment[name] = value;
    }

    public void Dispose()
    {
        foreach (var (name, value) in _savedEnvironment) System.Environment.SetEnvironmentVariable(name, value);
        var stop = RunScript(Script("ceph-stop.sh"), [], TimeSpan.FromMinutes(2));
        Assert.True(stop.Exit == 0, "ceph-stop.sh failed:\n" + stop);
        try { Directory.Delete(Dir, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }

    private ToolResult RunScript(string script, Dictionary<string, string> env, TimeSpan timeout)
    {
        var psi = new ProcessStartInfo("bash") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add(script);
        psi.ArgumentList.Add(Dir);
        foreach (var (name, value) in env) psi.Environment[name] = value;
        using var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start bash");
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(timeout))
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit();
            return new ToolResult(script, [Dir], -1, stdout.Result, stderr.Result + $"\n(timed out after {timeout.TotalSeconds} s)");
        }
        return new ToolResult(script, [Dir], p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>tests/scripts/NAME of the source tree the tests were built from (found upwards from the test binaries).</summary>
    private static string Script(string name)
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "tests", "scripts", name);
            if (File.Exists(candidate)) return candidate;
        }
        throw new FileNotFoundException($"tests/scripts/{name} not found above {AppContext.BaseDirectory}");
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }
}

/// <summary>The test classes that share one <see cref="CephCluster"/>: <c>[Collection(CephCollection.Name)]</c> and a
/// constructor parameter <c>CephCluster ceph</c>. xUnit runs the classes of one collection one after another.</summary>
[CollectionDefinition(Name)]
public sealed class CephCollection : ICollectionFixture<CephCluster>
{
    public const string Name = "Ceph";
}
