using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using Strata.Block;

namespace Strata.Cli.Img;

/// <summary>`img bench`: qemu-img bench's options and its three output lines — COUNT requests of BUFSIZE bytes,
/// DEPTH in flight, from OFFSET advancing by STEP (wrapping at the end of the image).</summary>
internal static partial class ImgCommands
{
    private static Command BenchCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var count = LastWins("-c", "number of requests (default 75000)");
        var depth = LastWins("-d", "requests in flight (default 64)");
        var offset = LastWins("-o", "offset of the first request");
        var bufferSize = LastWins("-s", "bytes per request (default 4k)");
        var stepSize = LastWins("-S", "offset step between requests (default: the buffer size)");
        var write = new Option<bool>("-w") { Description = "write instead of read" };
        var pattern = LastWins("--pattern", "byte written by -w (default 0)");
        var flushInterval = LastWins("--flush-interval", "flush after this many write requests");
        var noDrain = new Option<bool>("--no-drain") { Description = "do not wait for requests in flight before a flush" };
        var nativeAio = new Option<bool>("-n") { Description = "native AIO (accepted)" };
        var aio = LastWins("-i", "AIO mode (accepted)");
        var cache = LastWins("-t", "cache mode (accepted)");
        var quiet = QuietOption();
        var forceShare = ForceShareOption();
        var file = new Argument<string[]>("filename") { Arity = ArgumentArity.ZeroOrMore };
        var cmd = new Command("bench", "Run a simple image benchmark")
        {
            format, count, depth, offset, bufferSize, stepSize, write, pattern, flushInterval, noDrain, nativeAio, aio, cache, quiet,
            forceShare, file,
        };
        cmd.SetAction(r => Run(stderr, () =>
        {
            // qemu-img 7.2's parsing: counts are plain (or 0x) integers up to INT_MAX, sizes take suffixes.
            int requests = (int)BenchCount(r.GetValue(count), "request count", int.MaxValue, 75000);
            int inFlight = Math.Max(1, (int)BenchCount(r.GetValue(depth), "queue depth", int.MaxValue, 64));
            long start = BenchSize(r.GetValue(offset), "offset", long.MaxValue, 0);
            int size = (int)BenchSize(r.GetValue(bufferSize), "buffer size", int.MaxValue, 4096);
            int step = (int)BenchSize(r.GetValue(stepSize), "step_size", int.MaxValue, 0);
            byte fill = (byte)BenchCount(r.GetValue(pattern), "pattern byte", 0xff, 0);
            int flushEvery = (int)BenchCount(r.GetValue(flushInterval), "flush interval", int.MaxValue, 0);
            var files = r.GetValue(file) ?? [];
            if (files.FirstOrDefault(f => f.StartsWith('-') && f != "-") is { } unknown) throw new UsageException($"unrecognized option '{unknown}'");
            if (files.Length != 1) throw new UsageException("Expecting one image file name");
            bool isWrite = r.GetValue(write);
            if (!isWrite && flushEvery != 0) throw new BlockException("--flush-interval is only available in write tests");
            if (flushEvery != 0 && flushEvery < inFlight) throw new BlockException("Flush interval can't be smaller than depth");
            if (isWrite && r.GetValue(forceShare))
                throw new BlockException($"Could not open '{files[0]}': force-share=on can only be used with read-only images");

            using var image = OpenImage(files[0], r.GetValue(format), readOnly: !isWrite, locking: ReadLocking(r.GetValue(forceShare)));
            if (step == 0) step = size;
            stdout.WriteLine($"Sending {requests} {(isWrite ? "write" : "read")} requests, {size} bytes each, {inFlight} in parallel " +
                             $"(starting at offset {start}, step size {step})");
            if (flushEvery != 0) stdout.WriteLine($"Sending flush every {flushEvery} requests");
            var offsets = BenchOffsets(start, step, requests, image.Size);
            var clock = Stopwatch.StartNew();
            // Requests go out in batches between flushes (a flush waits for the batch before it, as qemu-img's drain
            // does); within a batch at most DEPTH run at once.
            int batch = flushEvery == 0 ? requests : flushEvery;
            for (int first = 0; first < requests; first += batch)
            {
                int end = Math.Min(requests, first + batch);
                Parallel.For(first, end, new ParallelOptions { MaxDegreeOfParallelism = Math.Min(inFlight, Environment.ProcessorCount * 4) },
                    () => GC.AllocateUninitializedArray<byte>(size),
                    (i, _, buffer) =>
                    {
                        long at = offsets[i];
                        if (at + size > image.Size) throw new BlockException("Failed request: Input/output error");
                        if (isWrite)
                        {
                            buffer.AsSpan().Fill(fill);
                            image.Write(at, buffer);
                        }
                        else image.Read(at, buffer);
                        return buffer;
                    },
                    _ => { });
                if (flushEvery != 0) image.Flush();
            }
            if (isWrite) image.Flush();
            stdout.WriteLine($"Run completed in {clock.Elapsed.TotalSeconds.ToString("0.000", CultureInfo.InvariantCulture)} seconds.");
            return 0;
        }));
        return cmd;
    }

    /// <summary>Where each request goes: from START by STEP, wrapping at the image end as qemu-img 7.2 does (so a
    /// request can run past the end, which then fails).</summary>
    internal static long[] BenchOffsets(long start, long step, int count, long imageSize)
    {
        var offsets = new long[count];
        long at = start;
        for (int i = 0; i < count; i++)
        {
            offsets[i] = at;
            at += step;
            if (imageSize > 0 && at >= imageSize) at %= imageSize;
        }
        return offsets;
    }

    private static long BenchCount(string? text, string what, long max, long fallback)
    {
        if (text is null) return fallback;
        bool ok = text.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? long.TryParse(text.AsSpan(2), NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out long value)
            : long.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out value);
        if (!ok || value > max) throw new BlockException($"Invalid {what} specified");
        return value;
    }

    private static long BenchSize(string? text, string what, long max, long fallback)
    {
        if (text is null) return fallback;
        if (!SizeText.TryParse(text, out long value))
            throw new BlockException($"Invalid {what} specified. You may use k, M, G, T, P or E suffixes for\n{Prog}: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.");
        if (value > max) throw new BlockException($"Invalid {what} specified");
        return value;
    }
}
