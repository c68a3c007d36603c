using System.CommandLine;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using Spectre.Console;
using Strata.Backup;
using Strata.Block;
using Strata.Protocol.Nbd;

namespace Strata.Cli.Backup;

/// <summary>`strata backup`: repositories of backup chains taken from strata daemon, qemu-storage-daemon or QEMU.</summary>
internal static class BackupCommands
{
    private const string ExitCodes = """
        Exit codes: 0 success; 1 the backup, restore or prune failed, or verify found a problem;
        2 bad arguments, or no such repository, disk or point; 3 the repository is locked by another run (or garbage collection);
        4 the source (QMP, NBD or libvirt) could not be reached or refused a command.
        """;

    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var cmd = new Command("backup", "Keep chains of full and incremental backups of disks served over QMP or of libvirt domains, restore and verify them;\n" +
            "or keep them in a chunk repository (init --chunks): deduplicated, compressed, optionally encrypted chunks in a folder or on S3.\n" + ExitCodes);
        cmd.Subcommands.Add(Init(stdout, stderr));
        cmd.Subcommands.Add(Run(stdout, stderr));
        cmd.Subcommands.Add(List(stdout, stderr));
        cmd.Subcommands.Add(Restore(stdout, stderr));
        cmd.Subcommands.Add(Verify(stdout, stderr));
        cmd.Subcommands.Add(Prune(stdout, stderr));
        cmd.Subcommands.Add(Serve(stdout, stderr));
        cmd.Subcommands.Add(ChunkCommands.Gc(stdout, stderr));
        cmd.Subcommands.Add(ChunkCommands.Copy(stdout, stderr));
        return cmd;
    }

    private static Argument<string> RepoArgument() => new("REPO") { Description = "the repository: a chain folder, or a chunk repository (s3://BUCKET/PREFIX or a folder made by init --chunks)" };

    /// <summary>Runs a command body, turning failures into a message, a hint and the documented exit code.</summary>
    internal static int Guard(TextWriter stderr, Func<int> body)
    {
        try
        {
            return body();
        }
        catch (BackupException e)
        {
            stderr.WriteLine($"strata backup: {e.Message}");
            if (e.Hint is not null) stderr.WriteLine($"hint: {e.Hint}");
            return e.ExitCode;
        }
        catch (Strata.Protocol.Qmp.QmpException e)
        {
            stderr.WriteLine($"strata backup: the source refused a command: {e.Message} ({e.ErrorClass})");
            return BackupExitCodes.Source;
        }
        catch (Exception e) when (e is BlockException or IOException or UnauthorizedAccessException or Strata.Backup.Chunks.ObjectStoreException)
        {
            stderr.WriteLine($"strata backup: {e.Message}");
            return BackupExitCodes.Failed;
        }
    }

    private static Command Init(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var chunks = new Option<bool>("--chunks") { Description = "create a chunk repository (deduplicated, compressed, optionally encrypted chunks; implied by s3://)" };
        var chunkSize = new Option<string>("--chunk-size") { Description = "with --chunks: the chunk size, a power of two from 4K to 64M", DefaultValueFactory = _ => "4M" };
        var encrypt = new Option<bool>("--encrypt") { Description = "with --chunks: encrypt chunks and indexes (AES-256-GCM) under a key derived from the passphrase or key file" };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("init", "Create an empty repository: a chain folder, or with --chunks a chunk repository") { repo, chunks, chunkSize, encrypt };
        chunkOptions.AddTo(cmd);
        cmd.SetAction(r => Guard(stderr, () =>
        {
            string path = r.GetValue(repo)!;
            if (r.GetValue(chunks) || path.StartsWith("s3://", StringComparison.OrdinalIgnoreCase))
                return ChunkCommands.Init(r, path, ChunkCommands.ParseChunkSize(r.GetValue(chunkSize)!), r.GetValue(encrypt), chunkOptions, stdout);
            if (r.GetValue(encrypt) || r.GetResult(chunkSize) is { Implicit: false })
                throw new BackupException("--chunk-size and --encrypt are for chunk repositories", "add --chunks", BackupExitCodes.Usage);
            var created = Repository.Init(r.GetValue(repo)!);
            stdout.WriteLine($"created repository {created.Root}");
            return 0;
        }));
        return cmd;
    }

    private static Command Run(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var socket = new Option<string?>("--socket") { Description = "QMP socket of the source: a unix socket path or HOST:PORT" };
        var images = new Option<string[]>("--image")
        {
            Description = "offline: an image no daemon serves, backed up from its persistent bitmaps (one per --disk, in order; refused while a VM holds it)",
        };
        var domain = new Option<string?>("--domain") { Description = "a libvirt domain: back up its disks through libvirt's backup API (running) or from its images (shut off)" };
        var connect = new Option<string>("--connect") { Description = "with --domain: the libvirt URI", DefaultValueFactory = _ => "qemu:///system" };
        var disks = new Option<string[]>("--disk") { Description = "node name of a disk to back up, or with --domain its target (vda…; default: every disk); repeat for several: one point in time" };
        var level = new Option<string>("--level") { Description = "full, inc, or auto (full when there is no usable chain or bitmap)", DefaultValueFactory = _ => "auto" };
        level.AcceptOnlyFromAmong("full", "inc", "auto");
        var mode = new Option<string?>("--mode") { Description = "push (the source writes the backup) or pull (fleecing + NBD, reading only dirty extents); default push, and always pull into a chunk repository" };
        mode.AcceptOnlyFromAmong("push", "pull");
        var nbd = new Option<string?>("--nbd") { Description = "pull mode: address (socket path or HOST:PORT) of an NBD server the source already runs; default: start one for the run" };
        var json = new Option<bool>("--json") { Description = "print the new points as JSON" };
        var inject = new Option<int?>("--x-inject-target-errno") { Description = "testing: fail every write to the push targets with this errno (blkdebug)", Hidden = true };
        var hold = new Option<int?>("--x-hold-after-begin") { Description = "testing: with --domain, hold libvirt's backup job this many seconds before reading", Hidden = true };
        var holdCommit = new Option<int?>("--x-hold-before-commit") { Description = "testing: into a chunk repository, wait this many seconds with every chunk stored before publishing the point", Hidden = true };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("run", "Back up disks: all at one point in time, full or incremental") { repo, socket, images, domain, connect, disks, level, mode, nbd, json, inject, hold, holdCommit };
        chunkOptions.AddTo(cmd);
        cmd.Validators.Add(r =>
        {
            if (r.GetValue(domain) is null && (r.GetValue(disks) ?? []).Length == 0) r.AddError("Option '--disk' or '--domain' is required.");
        });
        cmd.SetAction(r => Guard(stderr, () =>
        {
            bool asJson = r.GetValue(json);
            bool chunks = ChunkCommands.IsChunkRepository(r.GetValue(repo)!);
            if (chunks && r.GetValue(domain) is not null)
                throw new BackupException("libvirt domains are backed up into chain folders only, not yet into a chunk repository", exitCode: BackupExitCodes.Usage);
            if (chunks && r.GetValue(mode) == "push")
                throw new BackupException("a chunk repository is written by this tool: runs into it pull (fleecing + NBD)", "leave out --mode push", BackupExitCodes.Usage);
            if (!chunks && r.GetValue(holdCommit) is not null)
                throw new BackupException("--x-hold-before-commit is for chunk repositories", exitCode: BackupExitCodes.Usage);
            var repository = chunks ? null : Repository.Open(r.GetValue(repo)!);
            if (r.GetValue(domain) is { } domainName)
            {
                if (r.GetValue(socket) is not null || (r.GetValue(images) ?? []).Length > 0 || r.GetValue(nbd) is not null)
                    throw new BackupException("--domain reaches the disks through libvirt: not with --socket, --image or --nbd", exitCode: BackupExitCodes.Usage);
                var libvirtOptions = new Strata.Backup.Libvirt.LibvirtRunOptions
                {
                    Domain = domainName,
                    Connect = r.GetValue(connect)!,
                    Disks = r.GetValue(disks) ?? [],
                    Level = r.GetValue(level)!,
                    HoldAfterBegin = r.GetValue(hold) is { } seconds ? TimeSpan.FromSeconds(seconds) : null,
                };
                var points = WithProgress(stdout, asJson, p => new Strata.Backup.Libvirt.LibvirtBackupRunner(repository!, libvirtOptions, p, OpenOffline).RunAsync().GetAwaiter().GetResult());
                PrintPoints(stdout, asJson, points);
                return 0;
            }
            string[] offline = r.GetValue(images) ?? [];
            if ((r.GetValue(socket) is null) == (offline.Length == 0))
                throw new BackupException("give either --socket (a running source) or --image (a disk no daemon serves)", exitCode: BackupExitCodes.Usage);
            if (offline.Length > 0 && r.GetValue(nbd) is not null)
                throw new BackupException("--nbd names a running source's NBD server: not for --image", exitCode: BackupExitCodes.Usage);
            using var offlineSource = offline.Length == 0 ? null : new SyncDisposer(OfflineSource.Open(offline, r.GetValue(disks)!));
            var options = new BackupRunOptions
            {
                Socket = offlineSource?.Source.QmpSocket ?? r.GetValue(socket)!,
                Disks = r.GetValue(disks)!,
                Level = r.GetValue(level)!,
                Mode = r.GetValue(mode) ?? (chunks ? "pull" : "push"),
                Nbd = r.GetValue(nbd),
                InjectTargetErrno = r.GetValue(inject),
            };
            if (chunks)
                return ChunkCommands.Run(r, r.GetValue(repo)!, chunkOptions, options, r.GetValue(holdCommit) is { } seconds ? TimeSpan.FromSeconds(seconds) : null,
                    asJson, body => WithProgress(stdout, asJson, body), stdout, stderr);
            var manifests = WithProgress(stdout, asJson, p => new BackupRunner(repository!, options, p).RunAsync().GetAwaiter().GetResult());
            PrintPoints(stdout, asJson, manifests);
            return 0;
        }));
        return cmd;
    }

    private static void PrintPoints(TextWriter stdout, bool asJson, IReadOnlyList<BackupManifest> manifests)
    {
        if (asJson) stdout.WriteLine(JsonSerializer.Serialize(manifests.Select(PointSummary.Of).ToList(), BackupReportJson.Default.ListPointSummary));
        else
            foreach (var m in manifests)
                stdout.WriteLine($"{m.Disk}@{m.Id}: {m.Level}, {Bytes(m.CopiedBytes)} copied, file {Bytes(m.FileSize)}");
    }

    /// <summary>A shut-off domain's images, opened as an offline source for its run.</summary>
    private static Task<(string QmpSocket, IAsyncDisposable Source)> OpenOffline(IReadOnlyList<string> images, IReadOnlyList<string> nodes)
    {
        var source = OfflineSource.Open(images, nodes);
        return Task.FromResult<(string, IAsyncDisposable)>((source.QmpSocket, source));
    }

    private static Command List(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var json = new Option<bool>("--json") { Description = "print JSON" };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("list", "List the backup points of every disk") { repo, json };
        chunkOptions.AddTo(cmd);
        cmd.SetAction(r => Guard(stderr, () =>
        {
            if (ChunkCommands.IsChunkRepository(r.GetValue(repo)!)) return ChunkCommands.List(r, r.GetValue(repo)!, chunkOptions, r.GetValue(json), stdout, stderr);
            var repository = Repository.Open(r.GetValue(repo)!);
            var points = repository.AllPoints();
            if (r.GetValue(json))
            {
                stdout.WriteLine(JsonSerializer.Serialize(points.Select(PointSummary.Of).ToList(), BackupReportJson.Default.ListPointSummary));
                return 0;
            }
            if (points.Count == 0)
            {
                stdout.WriteLine("no backups yet");
                return 0;
            }
            var rows = points.Select(p => new[] { p.Disk, p.Id, p.Time.UtcDateTime.ToString("yyyy-MM-dd HH:mm:ss", CultureInfo.InvariantCulture), p.Level, p.Parent ?? "-", p.Mode, Bytes(p.CopiedBytes), Bytes(p.FileSize) }).ToList();
            string[] head = ["DISK", "ID", "TIME (UTC)", "LEVEL", "PARENT", "MODE", "COPIED", "FILE"];
            var widths = head.Select((h, i) => Math.Max(h.Length, rows.Max(row => row[i].Length))).ToArray();
            stdout.WriteLine(string.Join("  ", head.Select((h, i) => h.PadRight(widths[i]))).TrimEnd());
            foreach (var row in rows) stdout.WriteLine(string.Join("  ", row.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
            return 0;
        }));
        return cmd;
    }

    private static Option<string> AtOption(bool required) => new("--at") { Description = "a point id, a time (ISO 8601: the newest point at or before it), or latest", Required = required, DefaultValueFactory = required ? null! : _ => "latest" };

    private static Command Restore(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var at = AtOption(required: false);
        var disk = new Option<string?>("--disk") { Description = "the disk (node name) to restore" };
        var domain = new Option<string?>("--domain") { Description = "restore every disk of this libvirt domain, and a domain XML pointing at them, into the folder --to" };
        var define = new Option<bool>("--define") { Description = "with --domain: define the restored domain in libvirt" };
        var name = new Option<string?>("--name") { Description = "with --domain: the restored domain's name (default: the original's)" };
        var connect = new Option<string>("--connect") { Description = "with --define: the libvirt URI", DefaultValueFactory = _ => "qemu:///system" };
        var to = new Option<string>("--to") { Description = "the new file to write (with --domain: the folder)", Required = true };
        var format = new Option<string>("-O") { Description = "output format: qcow2 or raw", DefaultValueFactory = _ => "raw" };
        format.AcceptOnlyFromAmong("qcow2", "raw");
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("restore", "Write one point of a disk into a new file, or of every disk of a libvirt domain into a folder") { repo, at, disk, domain, define, name, connect, to, format };
        chunkOptions.AddTo(cmd);
        cmd.Validators.Add(r =>
        {
            if ((r.GetValue(disk) is null) == (r.GetValue(domain) is null)) r.AddError("Give exactly one of the options '--disk' and '--domain'.");
            else if (r.GetValue(domain) is null && (r.GetValue(define) || r.GetValue(name) is not null)) r.AddError("Options '--define' and '--name' need '--domain'.");
        });
        cmd.SetAction(r => Guard(stderr, () =>
        {
            if (ChunkCommands.IsChunkRepository(r.GetValue(repo)!))
            {
                if (r.GetValue(domain) is not null) throw new BackupException("--domain restores are for chain folder repositories", "restore each disk with --disk", BackupExitCodes.Usage);
                return ChunkCommands.Restore(r, r.GetValue(repo)!, chunkOptions, r.GetValue(disk)!, r.GetValue(at)!, r.GetValue(to)!, r.GetValue(format)!, stdout, stderr);
            }
            var repository = Repository.Open(r.GetValue(repo)!);
            if (r.GetValue(domain) is { } domainName)
            {
                var (disks, xmlFile) = Strata.Backup.Libvirt.LibvirtRestorer.Restore(repository, domainName, r.GetValue(at)!, r.GetValue(to)!, r.GetValue(format)!, r.GetValue(name));
                foreach (var d in disks) stdout.WriteLine($"restored {d.Point.Disk}@{d.Point.Id} ({d.Point.Time:O}) to {d.File}");
                stdout.WriteLine($"domain XML: {xmlFile}");
                if (r.GetValue(define))
                {
                    try
                    {
                        using var conn = Strata.Backup.Libvirt.LibvirtConnection.Open(r.GetValue(connect)!);
                        using var defined = conn.Define(File.ReadAllText(xmlFile));
                        stdout.WriteLine($"defined domain {defined.Name}");
                    }
                    catch (Strata.Backup.Libvirt.LibvirtException e)
                    {
                        throw new BackupException(e.Message, "the disks and the XML are restored; define it by hand with: virsh define " + xmlFile, BackupExitCodes.Source);
                    }
                }
                return 0;
            }
            var point = repository.Find(r.GetValue(disk)!, r.GetValue(at)!);
            var printer = Console.IsOutputRedirected || stdout != Console.Out ? null : new Img.ProgressPrinter(stdout);
            Restorer.Restore(repository, point, r.GetValue(to)!, r.GetValue(format)!, printer is null ? null : printer.Report);
            printer?.Finish();
            stdout.WriteLine($"restored {point.Disk}@{point.Id} ({point.Time:O}) to {r.GetValue(to)}");
            return 0;
        }));
        return cmd;
    }

    private static Command Verify(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var at = new Option<string?>("--at") { Description = "verify only the chain up to this point (id, time or latest)" };
        var disk = new Option<string?>("--disk") { Description = "verify only this disk" };
        var json = new Option<bool>("--json") { Description = "print the problems as JSON" };
        var sample = new Option<double?>("--sample") { Description = "chunk repositories: read back only this fraction (0–1] of the distinct chunks, chosen at random (every index and the presence of every chunk are still checked)" };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("verify", "Re-read every backup against its manifest and check every chain link; exit 1 on any problem") { repo, at, disk, json, sample };
        chunkOptions.AddTo(cmd);
        cmd.SetAction(r => Guard(stderr, () =>
        {
            if (ChunkCommands.IsChunkRepository(r.GetValue(repo)!))
            {
                if (r.GetValue(at) is not null || r.GetValue(disk) is not null)
                    throw new BackupException("--at and --disk are for chain folder repositories; a chunk repository is verified whole", exitCode: BackupExitCodes.Usage);
                return ChunkCommands.Verify(r, r.GetValue(repo)!, chunkOptions, r.GetValue(sample), r.GetValue(json), stdout, stderr);
            }
            if (r.GetValue(sample) is not null) throw new BackupException("--sample is for chunk repositories", exitCode: BackupExitCodes.Usage);
            var repository = Repository.Open(r.GetValue(repo)!);
            if (r.GetValue(at) is not null && r.GetValue(disk) is null && repository.Disks().Count != 1)
                throw new BackupException("--at needs --disk when the repository holds several disks", exitCode: BackupExitCodes.Usage);
            using var held = repository.Lock();
            int checkedPoints = 0;
            bool asJson = r.GetValue(json);
            var problems = Verifier.Verify(repository, r.GetValue(disk) ?? (r.GetValue(at) is null ? null : repository.Disks()[0]), r.GetValue(at), point =>
            {
                checkedPoints++;
                if (!asJson) stdout.WriteLine($"checking {point}");
            });
            if (asJson) stdout.WriteLine(JsonSerializer.Serialize(new VerifyReport(checkedPoints, problems), BackupReportJson.Default.VerifyReport));
            else
            {
                foreach (var p in problems) stdout.WriteLine($"PROBLEM {p.Disk}{(p.Id is null ? "" : "@" + p.Id)}: {p.What}");
                stdout.WriteLine(problems.Count == 0 ? $"verified {checkedPoints} point(s): all good" : $"{problems.Count} problem(s) in {checkedPoints} point(s)");
            }
            return problems.Count == 0 ? 0 : BackupExitCodes.Failed;
        }));
        return cmd;
    }

    private static Command Prune(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        Option<int> Keep(string name, string what) => new(name) { Description = what, DefaultValueFactory = _ => 0 };
        var last = Keep("--keep-last", "keep the newest N points");
        var daily = Keep("--keep-daily", "keep the newest point of each of the last N days with backups");
        var weekly = Keep("--keep-weekly", "keep the newest point of each of the last N weeks with backups");
        var monthly = Keep("--keep-monthly", "keep the newest point of each of the last N months with backups");
        var dry = new Option<bool>("--dry-run") { Description = "only say what would be removed" };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("prune", "Remove old points, merging each into its successor so that no chain breaks (in a chunk repository: their indexes; gc frees the chunks); the newest point always stays") { repo, last, daily, weekly, monthly, dry };
        chunkOptions.AddTo(cmd);
        cmd.SetAction(r => Guard(stderr, () =>
        {
            var policy = new RetentionPolicy(r.GetValue(last), r.GetValue(daily), r.GetValue(weekly), r.GetValue(monthly));
            if (new[] { policy.KeepLast, policy.KeepDaily, policy.KeepWeekly, policy.KeepMonthly }.Any(n => n < 0))
                throw new BackupException("--keep-* counts cannot be negative", exitCode: BackupExitCodes.Usage);
            if (ChunkCommands.IsChunkRepository(r.GetValue(repo)!)) return ChunkCommands.Prune(r, r.GetValue(repo)!, chunkOptions, policy, r.GetValue(dry), stdout, stderr);
            var repository = Repository.Open(r.GetValue(repo)!);
            using var held = repository.Lock();
            var removed = Pruner.Prune(repository, policy, stdout.WriteLine, r.GetValue(dry));
            stdout.WriteLine(r.GetValue(dry) ? $"would remove {removed.Count} point(s)" : $"removed {removed.Count} point(s)");
            return 0;
        }));
        return cmd;
    }

    private static Command Serve(TextWriter stdout, TextWriter stderr)
    {
        var repo = RepoArgument();
        var at = AtOption(required: false);
        var disk = new Option<string>("--disk") { Description = "the disk (node name)", Required = true };
        var socket = new Option<string?>("--socket") { Description = "serve on this unix socket" };
        var port = new Option<int?>("--port") { Description = "serve on this TCP port" };
        var host = new Option<string>("--host") { Description = "TCP address to bind", DefaultValueFactory = _ => "127.0.0.1" };
        var name = new Option<string?>("--name") { Description = "export name (default: DISK)" };
        var chunkOptions = new ChunkRepoOptions();
        var cmd = new Command("serve", "Export one point read-only over NBD for instant access, until interrupted") { repo, at, disk, socket, port, host, name };
        chunkOptions.AddTo(cmd);
        cmd.SetAction(r => Guard(stderr, () =>
        {
            if ((r.GetValue(socket) is null) == (r.GetValue(port) is null))
                throw new BackupException("give exactly one of --socket PATH and --port N", exitCode: BackupExitCodes.Usage);
            if (ChunkCommands.IsChunkRepository(r.GetValue(repo)!))
                return ChunkCommands.Serve(r, r.GetValue(repo)!, chunkOptions, r.GetValue(disk)!, r.GetValue(at)!, r.GetValue(socket), r.GetValue(host)!, r.GetValue(port), r.GetValue(name), stdout, stderr);
            var repository = Repository.Open(r.GetValue(repo)!);
            var point = repository.Find(r.GetValue(disk)!, r.GetValue(at)!);
            repository.ChainOf(point);
            using var image = ImageOpener.Open(repository.FilePath(point), "qcow2", readOnly: true);
            return ServeUntilStopped(image, $"{point.Disk}@{point.Id}", point.Time, r.GetValue(name) ?? point.Disk, r.GetValue(socket), r.GetValue(host)!, r.GetValue(port), stdout);
        }));
        return cmd;
    }

    /// <summary>Exports <paramref name="image"/> (DISK@ID) read-only over NBD (a unix socket, or TCP) until SIGTERM or SIGINT,
    /// saying where on one line first (scripts wait for it).</summary>
    internal static int ServeUntilStopped(BlockImage image, string point, DateTimeOffset time, string exportName, string? socket, string host, int? port, TextWriter stdout)
    {
        var server = socket is not null ? NbdServer.ListenUnix(socket) : NbdServer.ListenTcp(host, port!.Value);
        var stop = new TaskCompletionSource();
        using var term = PosixSignalRegistration.Create(PosixSignal.SIGTERM, c => { c.Cancel = true; stop.TrySetResult(); });
        using var intr = PosixSignalRegistration.Create(PosixSignal.SIGINT, c => { c.Cancel = true; stop.TrySetResult(); });
        try
        {
            server.AddExport(new NbdExport(exportName, exportName, point, image, writable: false, [], allocationDepth: false));
            server.Start();
            string uri = socket is not null ? $"nbd+unix:///{exportName}?socket={socket}" : $"nbd://{host}:{port}/{exportName}";
            stdout.WriteLine($"serving {point} ({time:O}) read-only at {uri}");
            stdout.Flush();
            stop.Task.Wait();
        }
        finally
        {
            server.DisposeAsync().AsTask().GetAwaiter().GetResult();
        }
        return 0;
    }

    // ------------------------------------------------------------------ progress

    private static T WithProgress<T>(TextWriter stdout, bool quiet, Func<IBackupProgress, T> body)
    {
        if (!quiet && stdout == Console.Out && !Console.IsOutputRedirected && AnsiConsole.Profile.Capabilities.Interactive)
        {
            T result = default!;
            AnsiConsole.Progress()
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new TransferSpeedColumn(), new RemainingTimeColumn())
                .Start(ctx => result = body(new BarProgress(ctx)));
            return result;
        }
        return body(new LineProgress(quiet ? TextWriter.Null : stdout));
    }

    /// <summary>Spectre.Console bars with rate and ETA, for a terminal.</summary>
    private sealed class BarProgress(ProgressContext ctx) : IBackupProgress
    {
        private readonly Dictionary<string, ProgressTask> _tasks = [];

        public void Message(string text) => AnsiConsole.MarkupLine(Markup.Escape(text));

        private ProgressTask Task(string disk)
        {
            lock (_tasks)
            {
                if (!_tasks.TryGetValue(disk, out var t)) _tasks[disk] = t = ctx.AddTask(disk, maxValue: 1);
                return t;
            }
        }

        public void Start(string disk, long total) => Task(disk).MaxValue = Math.Max(1, total);
        public void Advance(string disk, long done) => Task(disk).Value = done;
        public void Finish(string disk) { var t = Task(disk); t.Value = t.MaxValue; t.StopTask(); }
    }

    /// <summary>Plain lines, one per tenth, for logs and pipes.</summary>
    private sealed class LineProgress(TextWriter output) : IBackupProgress
    {
        private readonly Dictionary<string, (long Total, int Tenth, DateTime Start)> _state = [];

        public void Message(string text) { lock (_state) output.WriteLine(text); }

        public void Start(string disk, long total)
        {
            lock (_state)
                _state[disk] = _state.TryGetValue(disk, out var s) ? s with { Total = total } : (total, 0, DateTime.UtcNow);
        }

        public void Advance(string disk, long done)
        {
            lock (_state)
            {
                if (!_state.TryGetValue(disk, out var s) || s.Total <= 0) return;
                int tenth = (int)Math.Min(10, done * 10 / s.Total);
                if (tenth <= s.Tenth) return;
                _state[disk] = s with { Tenth = tenth };
                double secs = Math.Max(0.001, (DateTime.UtcNow - s.Start).TotalSeconds);
                double rate = done / secs;
                string eta = rate > 0 && done < s.Total ? $", ETA {TimeSpan.FromSeconds((s.Total - done) / rate):mm\\:ss}" : "";
                output.WriteLine($"{disk}: {tenth * 10}% of {Bytes(s.Total)} at {Bytes((long)rate)}/s{eta}");
            }
        }

        public void Finish(string disk)
        {
            lock (_state)
                if (_state.TryGetValue(disk, out var s))
                    output.WriteLine($"{disk}: done, {Bytes(s.Total)} in {(DateTime.UtcNow - s.Start).TotalSeconds.ToString("F1", CultureInfo.InvariantCulture)} s");
        }
    }

    internal static string Bytes(long n) => n switch
    {
        >= 1L << 30 => (n / (double)(1L << 30)).ToString("F2", CultureInfo.InvariantCulture) + " GiB",
        >= 1L << 20 => (n / (double)(1L << 20)).ToString("F1", CultureInfo.InvariantCulture) + " MiB",
        >= 1L << 10 => (n / 1024.0).ToString("F0", CultureInfo.InvariantCulture) + " KiB",
        _ => n + " B",
    };

    /// <summary>Closes an offline source when the command body ends, however it ends.</summary>
    private sealed class SyncDisposer(OfflineSource source) : IDisposable
    {
        public OfflineSource Source { get; } = source;

        public void Dispose() => Source.DisposeAsync().AsTask().GetAwaiter().GetResult();
    }
}
