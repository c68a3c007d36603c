using System.CommandLine;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Text.Json;
using System.Text.Json.Serialization;
using Strata.Backup;
using Strata.Backup.Chunks;
using Strata.Formats.Chunks;
using Strata.Protocol.Nbd;

namespace Strata.Cli.Backup;

/// <summary>The options every command that opens a chunk repository takes.</summary>
internal sealed class ChunkRepoOptions
{
    private readonly bool _fromEnvironment;

    /// <summary><paramref name="prefix"/> names a second repository's options (copy's "--source-"); those do not
    /// read STRATA_PASSPHRASE.</summary>
    public ChunkRepoOptions(string prefix = "", string which = "chunk repositories")
    {
        _fromEnvironment = prefix.Length == 0;
        Endpoint = new($"--{prefix}endpoint") { Description = $"{which} on S3: the endpoint URL (default: AWS_ENDPOINT_URL, else AWS)" };
        PassphraseFile = new($"--{prefix}passphrase-file") { Description = $"encrypted {which}: a file whose first line is the passphrase" + (_fromEnvironment ? " (or set STRATA_PASSPHRASE)" : "") };
        KeyFile = new($"--{prefix}key-file") { Description = $"encrypted {which}: a file whose bytes are the key" };
    }

    public Option<string?> Endpoint { get; }
    public Option<string?> PassphraseFile { get; }
    public Option<string?> KeyFile { get; }

    public void AddTo(Command cmd)
    {
        cmd.Options.Add(Endpoint);
        cmd.Options.Add(PassphraseFile);
        cmd.Options.Add(KeyFile);
    }

    /// <summary>The key the options (or STRATA_PASSPHRASE) give, or null.</summary>
    public ChunkKeySource? Key(ParseResult r)
    {
        string? passphraseFile = r.GetValue(PassphraseFile), keyFile = r.GetValue(KeyFile);
        if (passphraseFile is not null && keyFile is not null)
            throw new BackupException($"give {PassphraseFile.Name} or {KeyFile.Name}, not both", exitCode: BackupExitCodes.Usage);
        if (keyFile is not null) return new ChunkKeySource(null, keyFile);
        if (passphraseFile is not null)
        {
            string text;
            try
            {
                text = File.ReadAllText(passphraseFile);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                throw new BackupException($"cannot read passphrase file '{passphraseFile}': {e.Message}", exitCode: BackupExitCodes.Usage);
            }
            string line = text.Split('\n')[0].TrimEnd('\r');
            if (line.Length == 0) throw new BackupException($"passphrase file '{passphraseFile}' is empty", exitCode: BackupExitCodes.Usage);
            return new ChunkKeySource(line, null);
        }
        return _fromEnvironment && Environment.GetEnvironmentVariable("STRATA_PASSPHRASE") is { Length: > 0 } env ? new ChunkKeySource(env, null) : null;
    }
}

/// <summary>
/// `strata backup` over a chunk repository (issue 17): the commands' bodies when REPO is <c>s3://…</c> or a folder
/// holding a chunk repository's <c>config</c>. The chain folder repository keeps its own bodies in BackupCommands.
/// </summary>
internal static class ChunkCommands
{
    /// <summary>True when REPO names a chunk repository rather than a chain folder.</summary>
    public static bool IsChunkRepository(string repo)
    {
        if (repo.StartsWith("s3://", StringComparison.OrdinalIgnoreCase)) return true;
        string config = Path.Combine(repo, ChunkRepository.ConfigKey);
        if (!File.Exists(config)) return false;
        try
        {
            return ChunkRepositoryConfig.Parse(File.ReadAllBytes(config)).Kind == ChunkRepositoryConfig.KindName;
        }
        catch (ChunkFormatException e) when (File.ReadAllText(config).Contains("\"strata-chunks\"", StringComparison.Ordinal))
        {
            throw new BackupException($"the config of '{repo}' is damaged: {e.Message}");
        }
        catch (ChunkFormatException)
        {
            return false;
        }
    }

    /// <summary>The object store REPO names.</summary>
    public static IObjectStore OpenStore(string repo, string? endpoint)
    {
        try
        {
            return ObjectStores.Open(repo, endpoint);
        }
        catch (ObjectStoreException e)
        {
            throw new BackupException(e.Message, exitCode: BackupExitCodes.Usage);
        }
    }

    private static ChunkRepository Open(ParseResult r, string repo, ChunkRepoOptions o, TextWriter stderr, ChunkKeySource? fallbackKey = null)
    {
        var own = o.Key(r);
        var key = own ?? fallbackKey;
        var store = OpenStore(repo, r.GetValue(o.Endpoint));
        try
        {
            var opened = ChunkRepository.OpenAsync(store, key).GetAwaiter().GetResult();
            // Only for a key named on the command line: STRATA_PASSPHRASE set for other repositories is no news.
            bool named = r.GetValue(o.PassphraseFile) is not null || r.GetValue(o.KeyFile) is not null;
            if (!opened.Encrypted && named) stderr.WriteLine($"strata backup: note: '{repo}' is not encrypted; the passphrase or key file is not used");
            return opened;
        }
        catch
        {
            store.Dispose();
            throw;
        }
    }

    private static T Sync<T>(Task<T> task) => task.GetAwaiter().GetResult();

    // ------------------------------------------------------------------ init

    public static int Init(ParseResult r, string repo, int chunkSize, bool encrypt, ChunkRepoOptions o, TextWriter stdout)
    {
        if (!encrypt && (r.GetValue(o.PassphraseFile) ?? r.GetValue(o.KeyFile)) is not null)
            throw new BackupException("a passphrase or key file is given but --encrypt is not", "add --encrypt to encrypt the repository", BackupExitCodes.Usage);
        if (!repo.StartsWith("s3://", StringComparison.OrdinalIgnoreCase) && Directory.Exists(repo) && Directory.EnumerateFileSystemEntries(repo).Any()
            && !File.Exists(Path.Combine(repo, ChunkRepository.ConfigKey)))
            throw new BackupException($"'{repo}' exists and is not empty", "choose a new or empty folder", BackupExitCodes.Usage);
        var store = OpenStore(repo, r.GetValue(o.Endpoint));
        if (store is S3ObjectStore s3)
        {
            // A new bucket is made; and a server that does not enforce create-only puts (Swift, mocks) would let two
            // writers of one point or lease both win: refused.
            Sync(s3.EnsureBucketAsync());
            s3.ProbeCreateOnlyAsync().GetAwaiter().GetResult();
        }
        using var created = Sync(ChunkRepository.InitAsync(store, new ChunkRepositoryInit { ChunkSize = chunkSize, Encrypt = encrypt, Key = encrypt ? o.Key(r) : null }));
        stdout.WriteLine($"created chunk repository {created.Store.Location} (chunk size {BackupCommands.Bytes(created.ChunkSize)}, {(created.Encrypted ? "encrypted" : "not encrypted")})");
        return 0;
    }

    /// <summary>"4M", "65536", "64K": a chunk size for --chunk-size.</summary>
    // ------------------------------------------------------------------ run

    /// <summary>`backup run` into a chunk repository: always a pull (this tool writes the chunks).</summary>
    public static int Run(ParseResult r, string repo, ChunkRepoOptions o, BackupRunOptions options, TimeSpan? holdBeforeCommit, bool asJson,
        Func<Func<IBackupProgress, ChunkPoint>, ChunkPoint> withProgress, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var point = withProgress(p => new ChunkBackupRunner(repository, options, p) { HoldBeforeCommit = holdBeforeCommit }.RunAsync().GetAwaiter().GetResult());
        var summaries = point.Disks.Select(d => ChunkPointSummary.Of(point, d)).ToList();
        if (asJson) stdout.WriteLine(JsonSerializer.Serialize(summaries, ChunkReportJson.Default.ListChunkPointSummary));
        else
            foreach (var d in point.Disks)
                stdout.WriteLine($"{d.Disk}@{point.Id}: {d.Level}, {BackupCommands.Bytes(d.CopiedBytes)} read, {BackupCommands.Bytes(d.UploadedBytes)} uploaded in {d.UploadedChunks} new chunk(s)");
        return 0;
    }

    public static int ParseChunkSize(string text)
    {
        if (!Img.SizeText.TryParse(text, out long bytes) || !ChunkRepositoryConfig.IsValidChunkSize(bytes))
            throw new BackupException($"invalid chunk size '{text}'", "use a power of two from 4K to 64M", BackupExitCodes.Usage);
        return (int)bytes;
    }

    // ------------------------------------------------------------------ list

    public static int List(ParseResult r, string repo, ChunkRepoOptions o, bool asJson, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var points = Sync(repository.PointsAsync());
        var rows = points.SelectMany(p => p.Disks.Select(d => ChunkPointSummary.Of(p, d))).ToList();
        if (asJson)
        {
            stdout.WriteLine(JsonSerializer.Serialize(rows, ChunkReportJson.Default.ListChunkPointSummary));
            return 0;
        }
        if (rows.Count == 0)
        {
            stdout.WriteLine("no backups yet");
            return 0;
        }
        var table = rows.Select(p => new[]
        {
            p.Disk, p.Id, p.Time.UtcDateTime.ToString("yyyy-MM-dd HH:mm:ss", CultureInfo.InvariantCulture), p.Level, p.Parent ?? "-", p.Mode,
            BackupCommands.Bytes(p.VirtualSize), BackupCommands.Bytes(p.CopiedBytes), BackupCommands.Bytes(p.UploadedBytes), $"{p.DataChunks}/{p.Chunks}",
        }).ToList();
        string[] head = ["DISK", "ID", "TIME (UTC)", "LEVEL", "PARENT", "MODE", "SIZE", "COPIED", "UPLOADED", "CHUNKS"];
        var widths = head.Select((h, i) => Math.Max(h.Length, table.Max(row => row[i].Length))).ToArray();
        stdout.WriteLine(string.Join("  ", head.Select((h, i) => h.PadRight(widths[i]))).TrimEnd());
        foreach (var row in table) stdout.WriteLine(string.Join("  ", row.Select((c, i) => c.PadRight(widths[i]))).TrimEnd());
        return 0;
    }

    /// <summary>A point by id, or the newest holding the disk at or before a time (ISO 8601), or "latest".</summary>
    private static ChunkPoint Find(ChunkRepository repo, string disk, string at)
    {
        var all = Sync(repo.PointsAsync());
        return PointSelection.Find(all.Where(p => p.Disk(disk) is not null).ToList(), disk, at, p => p.Id, p => p.Time,
            () => all.SelectMany(p => p.Disks.Select(d => d.Disk)).Distinct().Order(StringComparer.Ordinal).ToList());
    }

    // ------------------------------------------------------------------ restore

    public static int Restore(ParseResult r, string repo, ChunkRepoOptions o, string disk, string at, string to, string format, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var point = Find(repository, disk, at);
        var printer = Console.IsOutputRedirected || stdout != Console.Out ? null : new Img.ProgressPrinter(stdout);
        ChunkRestorer.Restore(repository, point, disk, to, format, printer is null ? null : printer.Report);
        printer?.Finish();
        stdout.WriteLine($"restored {disk}@{point.Id} ({point.Time:O}) to {to}");
        return 0;
    }

    // ------------------------------------------------------------------ verify

    public static int Verify(ParseResult r, string repo, ChunkRepoOptions o, double? sample, bool asJson, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var report = Sync(ChunkVerifier.VerifyAsync(repository, sample ?? 1.0, asJson ? null : stdout.WriteLine));
        if (asJson) stdout.WriteLine(JsonSerializer.Serialize(report, ChunkReportJson.Default.ChunkVerifyReport));
        else
        {
            foreach (var p in report.Problems)
                stdout.WriteLine($"PROBLEM {(p.Disk is null ? "point " + p.Point : p.Disk + "@" + p.Point)}{(p.Chunk is null ? "" : " chunk " + p.Chunk)}: {p.What}");
            string scope = sample is null ? $"{report.ChunksRead} chunk(s)" : $"{report.ChunksRead} of {report.DistinctChunks} chunk(s) (sample)";
            stdout.WriteLine(report.Problems.Count == 0 ? $"verified {report.Points} point(s), {scope}: all good" : $"{report.Problems.Count} problem(s) in {report.Points} point(s), {scope} read");
        }
        return report.Problems.Count == 0 ? 0 : BackupExitCodes.Failed;
    }

    // ------------------------------------------------------------------ prune

    public static int Prune(ParseResult r, string repo, ChunkRepoOptions o, RetentionPolicy policy, bool dryRun, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var removed = Sync(ChunkPruner.PruneAsync(repository, policy, stdout.WriteLine, dryRun));
        stdout.WriteLine(dryRun ? $"would remove {removed.Count} point(s)" : $"removed {removed.Count} point(s); `strata backup gc` frees their chunks");
        return 0;
    }

    // ------------------------------------------------------------------ serve

    public static int Serve(ParseResult r, string repo, ChunkRepoOptions o, string disk, string at, string? socket, string host, int? port, string? name, TextWriter stdout, TextWriter stderr)
    {
        using var repository = Open(r, repo, o, stderr);
        var point = Find(repository, disk, at);
        using var image = repository.OpenDisk(point, disk, cacheChunks: 32);
        return BackupCommands.ServeUntilStopped(image, $"{disk}@{point.Id}", point.Time, name ?? disk, socket, host, port, stdout);
    }

    // ------------------------------------------------------------------ gc

    public static Command Gc(TextWriter stdout, TextWriter stderr)
    {
        var repo = new Argument<string>("REPO") { Description = "the chunk repository (s3://BUCKET/PREFIX or a folder)" };
        var grace = new Option<string>("--grace") { Description = "keep unreferenced chunks stored less than this long ago (30s, 10m, 1h, 2d; 0 for none)", DefaultValueFactory = _ => "1h" };
        var wait = new Option<string>("--wait") { Description = "how long to wait for running backups to finish before giving up (exit 3)", DefaultValueFactory = _ => "10m" };
        var json = new Option<bool>("--json") { Description = "print the report as JSON" };
        var options = new ChunkRepoOptions();
        var cmd = new Command("gc", "Delete the chunks of a chunk repository that no point references (after prune), holding off backups meanwhile") { repo, grace, wait, json };
        options.AddTo(cmd);
        cmd.SetAction(r => BackupCommands.Guard(stderr, () =>
        {
            var graceTime = ParseDuration(r.GetValue(grace)!, "--grace");
            var waitTime = ParseDuration(r.GetValue(wait)!, "--wait");
            using var repository = Open(r, RequireChunkRepository(r.GetValue(repo)!), options, stderr);
            var report = Sync(ChunkGarbageCollector.CollectAsync(repository, graceTime, waitTime, r.GetValue(json) ? null : stdout.WriteLine));
            if (r.GetValue(json)) stdout.WriteLine(JsonSerializer.Serialize(report, ChunkReportJson.Default.ChunkGcReport));
            else
                stdout.WriteLine($"deleted {report.DeletedChunks} unreferenced chunk(s), {BackupCommands.Bytes(report.FreedBytes)} freed; kept {report.ReferencedChunks} referenced" +
                                 (report.KeptWithinGrace > 0 ? $" and {report.KeptWithinGrace} newer than the grace period" : ""));
            return 0;
        }));
        return cmd;
    }

    private static string RequireChunkRepository(string repo) =>
        IsChunkRepository(repo) ? repo : throw new BackupException($"'{repo}' is not a chunk repository", "gc is for chunk repositories; a chain folder frees space in prune", BackupExitCodes.Usage);

    /// <summary>"0", "90s", "10m", "1h", "2d", or a .NET time span (hh:mm:ss).</summary>
    public static TimeSpan ParseDuration(string text, string what)
    {
        if (text.Length > 0 && char.IsAsciiDigit(text[0]))
        {
            char unit = char.IsAsciiLetter(text[^1]) ? text[^1] : 's';
            string number = char.IsAsciiLetter(text[^1]) ? text[..^1] : text;
            if (double.TryParse(number, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double n))
            {
                TimeSpan? t = unit switch { 's' => TimeSpan.FromSeconds(n), 'm' => TimeSpan.FromMinutes(n), 'h' => TimeSpan.FromHours(n), 'd' => TimeSpan.FromDays(n), _ => null };
                if (t is { } value) return value;
            }
            if (TimeSpan.TryParse(text, CultureInfo.InvariantCulture, out var span) && span >= TimeSpan.Zero) return span;
        }
        throw new BackupException($"invalid duration '{text}' for {what}", "use e.g. 0, 30s, 10m, 1h or 2d", BackupExitCodes.Usage);
    }

    // ------------------------------------------------------------------ copy

    public static Command Copy(TextWriter stdout, TextWriter stderr)
    {
        var src = new Argument<string>("SRC") { Description = "the repository to copy from: a chunk repository or a chain folder" };
        var dst = new Argument<string>("DST") { Description = "the chunk repository to copy into (created by `strata backup init --chunks` first)" };
        var options = new ChunkRepoOptions(which: "DST");
        var sourceOptions = new ChunkRepoOptions("source-", "SRC");
        var cmd = new Command("copy", "Copy every point that DST lacks from SRC (chunk repository or chain folder) into the chunk repository DST; safe to run again") { src, dst };
        options.AddTo(cmd);
        sourceOptions.AddTo(cmd);
        cmd.SetAction(r => BackupCommands.Guard(stderr, () =>
        {
            string source = r.GetValue(src)!, destination = r.GetValue(dst)!;
            using var target = Open(r, RequireChunkRepository(destination), options, stderr);
            ChunkCopyReport report;
            if (IsChunkRepository(source))
            {
                // An encrypted SRC without its own key options is tried with DST's.
                using var from = Open(r, source, sourceOptions, stderr, fallbackKey: options.Key(r));
                report = Sync(ChunkCopier.CopyAsync(from, target, stdout.WriteLine));
            }
            else
            {
                report = Sync(ChunkCopier.CopyFromChainAsync(Repository.Open(source), target, stdout.WriteLine));
            }
            stdout.WriteLine($"copied {report.PointsCopied} point(s) ({report.PointsPresent} already present): {report.ChunksUploaded} chunk(s), {BackupCommands.Bytes(report.BytesUploaded)} uploaded");
            return 0;
        }));
        return cmd;
    }
}

/// <summary>One disk of one point as <c>backup list --json</c> prints it for a chunk repository.</summary>
internal sealed record ChunkPointSummary(
    string Id, string Disk, DateTimeOffset Time, string Level, string? Parent, string Mode, string Source, string Node, string Bitmap,
    long VirtualSize, long CopiedBytes, long UploadedBytes, long UploadedChunks, long Chunks, long DataChunks, string? Note)
{
    public static ChunkPointSummary Of(ChunkPoint p, ChunkDisk d) =>
        new(p.Id, d.Disk, p.Time, d.Level, d.Parent, d.Mode, d.Source, d.Node, d.Bitmap, d.VirtualSize, d.CopiedBytes, d.UploadedBytes, d.UploadedChunks,
            d.Chunks.Count, d.Chunks.Count(c => !c.IsZero), d.Note);
}

/// <summary>The <c>--json</c> outputs of the chunk repository's commands (kebab-case, indented, nulls left out).</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(List<ChunkPointSummary>))]
[JsonSerializable(typeof(ChunkVerifyReport))]
[JsonSerializable(typeof(ChunkGcReport))]
internal sealed partial class ChunkReportJson : JsonSerializerContext;
