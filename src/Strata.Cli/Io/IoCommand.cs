using System.CommandLine;
using System.Globalization;
using Strata.Block;
using Strata.Cli.Img;

namespace Strata.Cli.Io;

/// <summary>
/// <c>strata io</c>: run I/O commands against an image, in the manner of qemu-io
/// (<c>-c 'write -P 0x5a 0 1M'</c>, <c>read -P</c>, <c>write -z [-u]</c>, <c>discard</c>, <c>flush</c>).
/// </summary>
internal static class IoCommand
{
    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var format = new Option<string?>("-f") { Description = "image format (probed when omitted)" };
        var commands = new Option<string[]>("-c") { Description = "command to run (repeatable)" };
        var readOnly = new Option<bool>("-r") { Description = "open read-only" };
        var forceShare = new Option<bool>("-U", "--force-share") { Description = "open even if another process uses the image (read-only)" };
        var file = new Argument<string>("filename");
        var cmd = new Command("io", "Run read/write commands on an image (qemu-io style)") { format, commands, readOnly, forceShare, file };
        cmd.SetAction(r =>
        {
            try
            {
                string path = r.GetValue(file)!;
                BlockImage image;
                try
                {
                    image = ImageOpener.Open(path, r.GetValue(format), r.GetValue(readOnly),
                        locking: r.GetValue(forceShare) ? ImageLocking.ForceShare : ImageLocking.Normal);
                }
                catch (BlockException e)
                {
                    // qemu-io's words: the device, then the driver's reason without qemu-img's "Could not open" frame.
                    string prefix = $"Could not open '{path}': ";
                    string reason = e.Message.StartsWith(prefix, StringComparison.Ordinal) ? e.Message[prefix.Length..] : e.Message;
                    stderr.WriteLine($"{ToolFace.Io}: can't open device {path}: {reason}");
                    return 1;
                }
                using var _ = image;
                bool failed = false;
                foreach (var line in r.GetValue(commands) ?? [])
                {
                    try
                    {
                        int rc = Execute(image, line, stdout, stderr);
                        if (rc != 0) return rc;
                    }
                    catch (BlockIOException e)
                    {
                        // As qemu-io: a failed request is reported with its errno and the next command still runs.
                        stdout.WriteLine($"{line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[0]} failed: {e.Message}");
                        failed = true;
                    }
                }
                image.Flush();
                return failed ? 1 : 0;
            }
            catch (BlockException e)
            {
                stderr.WriteLine($"{ToolFace.Io}: {e.Message}");
                return 1;
            }
        });
        return cmd;
    }

    private static long Size(string s) =>
        SizeText.TryParse(s, out long v) ? v : throw new BlockException($"invalid size or offset '{s}'");

    private static byte Pattern(string s) =>
        s.StartsWith("0x", StringComparison.OrdinalIgnoreCase) ? byte.Parse(s[2..], NumberStyles.HexNumber, CultureInfo.InvariantCulture) : byte.Parse(s, CultureInfo.InvariantCulture);

    internal static int Execute(BlockImage image, string line, TextWriter stdout, TextWriter stderr)
    {
        var words = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        if (words.Length == 0) return 0;
        byte pattern = 0xcd;
        bool zero = false, unmap = false, compressed = false, quiet = false;
        var rest = new List<string>();
        for (int i = 1; i < words.Length; i++)
        {
            switch (words[i])
            {
                case "-P": pattern = Pattern(words[++i]); break;
                case "-z": zero = true; break;
                case "-u": unmap = true; break;
                case "-c": compressed = true; break;
                case "-q": quiet = true; break;
                default: rest.Add(words[i]); break;
            }
        }
        switch (words[0])
        {
            case "write":
            {
                long off = Size(rest[0]), len = Size(rest[1]);
                if (zero) image.WriteZeroes(off, len, unmap);
                else if (compressed) image.WriteCompressed(off, Filled(len, pattern));
                else WriteChunks(image, off, len, pattern);
                if (!quiet) stdout.WriteLine($"wrote {len}/{len} bytes at offset {off}");
                return 0;
            }
            case "read":
            {
                long off = Size(rest[0]), len = Size(rest[1]);
                var buf = new byte[Math.Min(len, 1 << 20)];
                for (long pos = 0; pos < len; pos += buf.Length)
                {
                    var span = buf.AsSpan(0, (int)Math.Min(buf.Length, len - pos));
                    image.Read(off + pos, span);
                    if (words.Contains("-P"))
                    {
                        int bad = span.IndexOfAnyExcept(pattern);
                        if (bad >= 0)
                        {
                            stderr.WriteLine($"Pattern verification failed at offset {off + pos + bad}, {len} bytes");
                            return 1;
                        }
                    }
                }
                if (!quiet) stdout.WriteLine($"read {len}/{len} bytes at offset {off}");
                return 0;
            }
            case "discard":
            {
                long off = Size(rest[0]), len = Size(rest[1]);
                image.Discard(off, len);
                if (!quiet) stdout.WriteLine($"discard {len}/{len} bytes at offset {off}");
                return 0;
            }
            case "flush":
                image.Flush();
                return 0;
            case "x-stress":
                return StressWriter.Run(image, int.Parse(rest[0], CultureInfo.InvariantCulture), int.Parse(rest[1], CultureInfo.InvariantCulture), stdout);
            default:
                stderr.WriteLine($"command '{words[0]}' not found");
                return 1;
        }
    }

    private static byte[] Filled(long len, byte pattern)
    {
        var b = new byte[len];
        Array.Fill(b, pattern);
        return b;
    }

    private static void WriteChunks(BlockImage image, long off, long len, byte pattern)
    {
        var buf = new byte[Math.Min(len, 4 << 20)];
        Array.Fill(buf, pattern);
        for (long pos = 0; pos < len; pos += buf.Length)
            image.Write(off + pos, buf.AsSpan(0, (int)Math.Min(buf.Length, len - pos)));
    }
}
