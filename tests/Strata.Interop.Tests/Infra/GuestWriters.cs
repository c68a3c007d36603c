using System.Collections;
using System.Diagnostics;
using System.Text;

namespace Strata.Interop.Tests.Infra;

/// <summary>
/// Guests that write to a daemon's NBD export as hard as they can: each writer runs qemu-io processes one after the
/// other, every one a new NBD connection (so handshakes happen while the daemon is busy), each queuing batches of
/// <see cref="WritesPerBatch"/> <c>aio_write</c> (random 4–64 KiB at random 4 KiB-aligned offsets; qemu-io submits
/// them all before it waits, so its NBD client keeps as many in flight as the protocol lets it) ended by
/// <c>aio_flush</c>.
/// The final contents are still known although requests complete in any order: writers own disjoint 1 MiB stripes
/// and the writes of one batch never overlap, so the last pattern written to each 4 KiB block is the one of the
/// last batch that wrote it (the model). A failed connection makes its blocks uncertain, and the failure is kept.
/// </summary>
public sealed class GuestWriters
{
    public const int BlockSize = 4096;
    public const int WritesPerBatch = 48;
    public const int BatchesPerConnection = 4;
    private const long Stripe = 1 << 20;
    private const int MaxBlocksPerWrite = 16;
    /// <summary>A qemu-io that has not finished four batches by then waits for a reply that never comes.</summary>
    private static readonly TimeSpan ConnectionTimeout = TimeSpan.FromSeconds(60);

    private readonly Func<string> _socket;
    private readonly string _export;
    private readonly long _size;
    private readonly int _writers;
    private readonly int _seed;
    /// <summary>Last pattern per 4 KiB block; 0 = not written by these writers (patterns are 1–255).</summary>
    private readonly byte[] _model;
    private readonly BitArray _uncertain;
    private readonly object _lock = new();
    private readonly List<string> _failures = [];
    private readonly Stopwatch _clock = Stopwatch.StartNew();
    private CancellationTokenSource? _stop;
    private Task[] _running = [];
    private long _writes, _bytes, _failedWrites, _connections, _failedConnections;

    /// <param name="socket">The NBD server's unix socket, asked again for every new connection (a migration moves it).</param>
    public GuestWriters(Func<string> socket, string export, long size, int writers, int seed)
    {
        if (size / Stripe < writers) throw new ArgumentException("the disk needs at least one 1 MiB stripe per writer");
        _socket = socket;
        _export = export;
        _size = size;
        _writers = writers;
        _seed = seed;
        _model = new byte[size / BlockSize];
        _uncertain = new BitArray(_model.Length);
    }

    /// <summary>What the test is doing now; every failure is labelled with it.</summary>
    public string Phase { get; set; } = "start";

    /// <summary>How long each writer waits after a connection before the next (zero: none, full speed).</summary>
    public TimeSpan Rest { get; set; }

    public long WritesCompleted => Interlocked.Read(ref _writes);
    public long BytesWritten => Interlocked.Read(ref _bytes);
    public long FailedWrites => Interlocked.Read(ref _failedWrites);
    public long Connections => Interlocked.Read(ref _connections);
    public long FailedConnections => Interlocked.Read(ref _failedConnections);

    public IReadOnlyList<string> Failures
    {
        get { lock (_lock) return [.. _failures]; }
    }

    public void Start()
    {
        _stop = new CancellationTokenSource();
        var stop = _stop.Token;
        _running = Enumerable.Range(0, _writers).Select(w => Task.Run(() => WriteUntilStoppedAsync(w, stop))).ToArray();
    }

    /// <summary>Lets each writer finish the connection it is in, then waits for all of them.</summary>
    public async Task StopAsync()
    {
        _stop?.Cancel();
        await Task.WhenAll(_running);
    }

    /// <summary>Waits until at least <paramref name="connections"/> more qemu-io processes have ended (well or not),
    /// so that a step starts while the writers are really writing.</summary>
    public async Task WaitForConnectionsAsync(int connections, TimeSpan timeout)
    {
        long target = Connections + connections;
        var sw = Stopwatch.StartNew();
        while (Connections < target && sw.Elapsed < timeout) await Task.Delay(20);
    }

    private async Task WriteUntilStoppedAsync(int writer, CancellationToken stop)
    {
        var rng = new Random(_seed * 1000 + writer);
        long stripes = _size / Stripe;
        long owned = (stripes - writer + _writers - 1) / _writers; // stripes s with s % writers == writer
        int blocksPerStripe = (int)(Stripe / BlockSize);
        while (!stop.IsCancellationRequested)
        {
            var batches = new List<List<(long Block, int Blocks, byte Pattern)>>();
            for (int b = 0; b < BatchesPerConnection; b++)
            {
                var batch = new List<(long Block, int Blocks, byte Pattern)>();
                var taken = new HashSet<long>();
                while (batch.Count < WritesPerBatch)
                {
                    long stripe = rng.NextInt64(owned) * _writers + writer;
                    int blocks = rng.Next(1, MaxBlocksPerWrite + 1);
                    long first = stripe * blocksPerStripe + rng.Next(0, blocksPerStripe - blocks + 1);
                    // Overlapping writes in flight together may land in any order: not in one batch.
                    bool overlaps = false;
                    for (long k = first; k < first + blocks && !overlaps; k++) overlaps = taken.Contains(k);
                    if (overlaps) continue;
                    for (long k = first; k < first + blocks; k++) taken.Add(k);
                    batch.Add((first, blocks, (byte)rng.Next(1, 256)));
                }
                batches.Add(batch);
            }
            var args = new List<string> { "-f", "raw" };
            foreach (var batch in batches)
            {
                foreach (var (block, blocks, pattern) in batch)
                    args.AddRange(["-c", $"aio_write -q -P 0x{pattern:x2} {block * BlockSize} {blocks * BlockSize}"]);
                args.AddRange(["-c", "aio_flush"]);
            }
            string socket = _socket();
            args.Add($"nbd+unix:///{_export}?socket={socket}");
            string phase = Phase;
            double startedAt = _clock.Elapsed.TotalSeconds;
            var (exit, stdout, stderr) = await RunAsync("qemu-io", args);
            Interlocked.Increment(ref _connections);
            int failedLines = stdout.Split('\n').Count(l => l.Contains("failed", StringComparison.Ordinal));
            bool ok = exit == 0 && failedLines == 0 && stderr.Length == 0;
            lock (_lock)
            {
                int total = batches.Sum(b => b.Count);
                bool connected = !stderr.Contains("can't open", StringComparison.Ordinal) && exit != -1;
                foreach (var batch in batches)
                    foreach (var (block, blocks, pattern) in batch)
                        for (long k = block; k < block + blocks; k++)
                        {
                            if (ok) _model[k] = pattern;
                            else _uncertain[(int)k] = true;
                        }
                if (ok)
                {
                    _writes += total;
                    _bytes += batches.Sum(b => b.Sum(w => (long)w.Blocks * BlockSize));
                }
                else
                {
                    if (connected)
                    {
                        _writes += Math.Max(0, total - failedLines);
                        _failedWrites += failedLines;
                    }
                    else _failedConnections++;
                    var said = (stdout + stderr).Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
                    var distinct = said.GroupBy(l => l).Select(g => g.Count() > 1 ? $"{g.Key} (x{g.Count()})" : g.Key).Take(4);
                    _failures.Add($"{DateTime.Now:HH:mm:ss.fff} ({startedAt:F1}–{_clock.Elapsed.TotalSeconds:F1} s) [{(Phase == phase ? phase : $"{phase} → {Phase}")}] writer {writer} ({socket}): exit {exit}: {string.Join(" | ", distinct)}");
                }
            }
            if (Rest > TimeSpan.Zero)
                try { await Task.Delay(Rest, stop); } catch (OperationCanceledException) { }
        }
    }

    /// <summary>Runs a process to its end (or <see cref="ConnectionTimeout"/>, then kills it and says so as exit -1).</summary>
    private static async Task<(int Exit, string Stdout, string Stderr)> RunAsync(string tool, IEnumerable<string> args, string? stdin = null)
    {
        var psi = new ProcessStartInfo(tool) { RedirectStandardOutput = true, RedirectStandardError = true, RedirectStandardInput = true, UseShellExecute = false };
        foreach (var a in args) psi.ArgumentList.Add(a);
        psi.Environment["LC_ALL"] = "C";
        Process p;
        try
        {
            p = Process.Start(psi)!;
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            throw new InvalidOperationException($"required tool '{tool}' is not installed or not runnable: {e.Message}", e);
        }
        using (p)
        {
            var so = p.StandardOutput.ReadToEndAsync();
            var se = p.StandardError.ReadToEndAsync();
            if (stdin is not null) await p.StandardInput.WriteAsync(stdin);
            p.StandardInput.Close();
            using var timeout = new CancellationTokenSource(ConnectionTimeout);
            try
            {
                await p.WaitForExitAsync(timeout.Token);
            }
            catch (OperationCanceledException)
            {
                p.Kill(true);
                await p.WaitForExitAsync();
                return (-1, await so, await se + $"\ntimed out after {ConnectionTimeout.TotalSeconds} s: requests never answered");
            }
            return (p.ExitCode, await so, await se);
        }
    }

    /// <summary>True when every block's last write is known (no connection failed).</summary>
    public bool ModelIsExact
    {
        get { lock (_lock) return !_uncertain.Cast<bool>().Any(b => b); }
    }

    /// <summary>Blocks written (4 KiB each).</summary>
    public long BlocksWritten
    {
        get { lock (_lock) return _model.LongCount(b => b != 0); }
    }

    /// <summary>Writes the model into an image holding what the disk held before the writers started (offline, with
    /// qemu-io): it then is what the disk must read as. Call after <see cref="StopAsync"/>.</summary>
    public async Task ApplyModelToAsync(string image, string format)
    {
        var commands = new StringBuilder();
        lock (_lock)
        {
            for (long k = 0; k < _model.Length;)
            {
                byte pattern = _model[k];
                long end = k + 1;
                while (end < _model.Length && _model[end] == pattern) end++;
                if (pattern != 0) commands.Append($"write -q -P 0x{pattern:x2} {k * BlockSize} {(end - k) * BlockSize}\n");
                k = end;
            }
        }
        commands.Append("quit\n");
        // qemu-io flushes after every write by default (writethrough); thousands of fsyncs are not needed here.
        var (exit, stdout, stderr) = await RunAsync("qemu-io", ["-t", "unsafe", "-f", format, image], commands.ToString());
        Assert.True(exit == 0 && !stdout.Contains("failed", StringComparison.Ordinal) && stderr.Length == 0,
            $"qemu-io could not write the model into {image}: exit {exit}\n{stdout[..Math.Min(2000, stdout.Length)]}\n{stderr}");
    }

    public string Summary() =>
        $"{WritesCompleted} writes completed ({BytesWritten >> 20} MiB) over {Connections} connections; " +
        $"{FailedWrites} writes failed, {FailedConnections} connections failed";
}
