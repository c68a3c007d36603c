using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using Strata.Block;
using Strata.Cli.Img;

namespace Strata.Cli.Io;

/// <summary>
/// <c>strata io</c>: qemu-io's command line and commands (<c>-c 'write -P 0x5a 0 1M'</c>, <c>read -P</c>,
/// <c>write -z [-u]</c>, readv/writev, aio_*, map, alloc, discard, flush, open/close), printing what qemu-io prints,
/// statistics line included. The command line follows getopt as qemu-io's does, so it is parsed by hand.
/// Like qemu-io, every command runs even after one failed; the exit code is 1 when any failed.
/// </summary>
internal static class IoCommand
{
    private static string Prog => ToolFace.Io;

    /// <summary>The entry in strata's command tree, for its help; <see cref="StrataCli.Run"/> sends "io" command lines
    /// to <see cref="Run"/> before System.CommandLine sees them.</summary>
    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var rest = new Argument<string[]>("args") { Arity = ArgumentArity.ZeroOrMore, Description = "qemu-io's options, -c commands and the image" };
        var cmd = new Command("io", "Run read/write commands on an image (qemu-io compatible)") { rest };
        cmd.SetAction(r => Run(r.GetValue(rest) ?? [], stdout, stderr));
        return cmd;
    }

    /// <summary>What one qemu-io session holds: the open image and how to (re)open images.</summary>
    private sealed class Session(TextWriter stdout, TextWriter stderr) : IDisposable
    {
        public TextWriter Out { get; } = stdout;
        public TextWriter Err { get; } = stderr;
        public BlockImage? Image { get; set; }
        public string? Format { get; set; }
        public bool ReadOnly { get; set; }
        public bool ForceShare { get; set; }

        public void Close()
        {
            if (Image is null) return;
            try
            {
                Image.Flush();
            }
            finally
            {
                Image.Dispose();
                Image = null;
            }
        }

        public void Dispose() => Close();
    }

    private static readonly Dictionary<string, char> LongOptions = new(StringComparer.Ordinal)
    {
        ["help"] = 'h', ["version"] = 'V', ["cmd"] = 'c', ["format"] = 'f', ["read-only"] = 'r', ["snapshot"] = 's',
        ["nocache"] = 'n', ["copy-on-read"] = 'C', ["misalign"] = 'm', ["native-aio"] = 'k', ["aio"] = 'i', ["cache"] = 't',
        ["discard"] = 'd', ["trace"] = 'T', ["force-share"] = 'U', ["object"] = 'O', ["image-opts"] = 'I',
    };

    /// <summary>Options that take a value (getopt's "c:" and friends).</summary>
    private const string WithValue = "cfditTO";
    private const string Flags = "hVrsnCmkUI";

    public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
    {
        var commands = new List<string>();
        var files = new List<string>();
        var objects = new List<string>();
        string? format = null;
        bool readOnly = false, forceShare = false, imageOpts = false;
        // getopt_long: options may come anywhere; "--" ends them; short flags may be grouped (-rU).
        for (int i = 0; i < args.Length; i++)
        {
            string a = args[i];
            if (a == "--")
            {
                files.AddRange(args[(i + 1)..]);
                break;
            }
            var found = new List<(char Opt, string? Value)>();
            if (a.StartsWith("--", StringComparison.Ordinal))
            {
                string name = a[2..];
                string? value = null;
                int eq = name.IndexOf('=');
                if (eq >= 0) (name, value) = (name[..eq], name[(eq + 1)..]);
                if (!LongOptions.TryGetValue(name, out char opt)) return UsageError(stdout, stderr, $"unrecognized option '{a}'");
                if (WithValue.Contains(opt) && value is null)
                {
                    if (i + 1 >= args.Length) return UsageError(stdout, stderr, $"option '--{name}' requires an argument");
                    value = args[++i];
                }
                else if (!WithValue.Contains(opt) && value is not null)
                    return UsageError(stdout, stderr, $"option '--{name}' doesn't allow an argument");
                found.Add((opt, value));
            }
            else if (a.Length > 1 && a[0] == '-')
            {
                for (int j = 1; j < a.Length; j++)
                {
                    char opt = a[j];
                    if (WithValue.Contains(opt) && opt is not ('O' or 'I'))
                    {
                        string value;
                        if (j + 1 < a.Length) value = a[(j + 1)..];
                        else if (i + 1 < args.Length) value = args[++i];
                        else return UsageError(stdout, stderr, $"option requires an argument -- '{opt}'");
                        found.Add((opt, value));
                        break;
                    }
                    if (!Flags.Contains(opt) || opt is 'O' or 'I') return UsageError(stdout, stderr, $"invalid option -- '{opt}'");
                    found.Add((opt, null));
                }
            }
            else
            {
                files.Add(a);
                continue;
            }
            foreach (var (opt, value) in found)
            {
                switch (opt)
                {
                    case 'h':
                        stdout.Write(Usage);
                        return 0;
                    case 'V':
                        stdout.WriteLine($"{Prog} version 7.2.0 (strata)");
                        return 0;
                    case 'c': commands.Add(value!); break;
                    case 'f': format = value; break;
                    case 'r': readOnly = true; break;
                    case 'U': forceShare = true; break;
                    case 'I': imageOpts = true; break;
                    case 'O': objects.Add(value!); break;
                    case 't':
                        if (value is not ("none" or "writeback" or "writethrough" or "directsync" or "unsafe" or "off" or "on"))
                        {
                            stderr.WriteLine($"{Prog}: Invalid cache option: {value}");
                            return 1;
                        }
                        break;
                    case 'i':
                        if (value is not ("threads" or "native" or "io_uring"))
                        {
                            stderr.WriteLine($"{Prog}: Invalid aio option: {value}");
                            return 1;
                        }
                        break;
                    case 'd':
                        if (value is not ("ignore" or "off" or "unmap" or "on"))
                        {
                            stderr.WriteLine($"{Prog}: Invalid discard option: {value}");
                            return 1;
                        }
                        break;
                    // -s, -n, -C, -m, -k, -T: accepted; the data written and read is the same without them.
                }
            }
        }
        if (files.Count > 1)
        {
            stdout.Write(Usage);
            return 1;
        }
        try
        {
            var ids = new HashSet<string>(StringComparer.Ordinal);
            foreach (var o in objects) QemuObjects.Define(o, ids);
        }
        catch (BlockException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return 1;
        }
        if (imageOpts && format is not null)
        {
            stderr.WriteLine($"{Prog}: --image-opts and -f are mutually exclusive");
            return 1;
        }

        using var session = new Session(stdout, stderr) { Format = format, ReadOnly = readOnly, ForceShare = forceShare };
        if (files.Count == 1)
        {
            string name = files[0];
            try
            {
                var options = imageOpts ? BlockSpec.FromKeyValues(name) : null;
                session.Image = OpenForSession(session, name, options, format, readOnly);
            }
            catch (BlockException e)
            {
                stderr.WriteLine(imageOpts ? $"{Prog}: can't open: {Reason(name, e)}" : $"{Prog}: can't open device {name}: {Reason(name, e)}");
                return 1;
            }
        }
        bool failed = false;
        foreach (var line in commands)
        {
            if (line.Trim() is "quit" or "q") break;
            if (!Execute(session, line)) failed = true;
        }
        if (commands.Count == 0)
        {
            // No -c: qemu-io reads commands from its input, prompting before each (the iotests pipe scripts in).
            while (true)
            {
                stdout.Write("qemu-io> ");
                stdout.Flush();
                if (Console.In.ReadLine() is not { } line || line.Trim() is "quit" or "q") break;
                if (!Execute(session, line)) failed = true;
            }
        }
        try
        {
            session.Close();
        }
        catch (BlockException e)
        {
            stderr.WriteLine($"{Prog}: {e.Message}");
            return 1;
        }
        stdout.Flush();
        return failed ? 1 : 0;
    }

    /// <summary>qemu-io names the device, then the driver's reason without qemu-img's "Could not open 'NAME'" frame.</summary>
    private static string Reason(string name, BlockException e)
    {
        string prefix = $"Could not open '{name}': ";
        return e.Message.StartsWith(prefix, StringComparison.Ordinal) ? e.Message[prefix.Length..] : e.Message;
    }

    private static BlockImage OpenForSession(Session s, string name, BlockOptions? options, string? format, bool readOnly)
    {
        var locking = s.ForceShare ? ImageLocking.ForceShare : ImageLocking.Normal;
        var image = options is null
            ? ImageOpener.Open(name, format, readOnly, locking: locking)
            : ImageOpener.OpenSpecChain(name, options, format, readOnly, locking: locking);
        try
        {
            ImageOpener.UnlockChain(name, image);
        }
        catch
        {
            image.Dispose();
            throw;
        }
        return image;
    }

    private static int UsageError(TextWriter stdout, TextWriter stderr, string message)
    {
        stderr.WriteLine($"{Prog}: {message}");
        stdout.Write(Usage);
        return 1;
    }

    /// <summary>A command's own usage error: qemu-io prints the command's one-line help and goes on.</summary>
    private sealed class CommandUsageException : Exception;

    /// <summary>A failed command whose message is already printed.</summary>
    private sealed class CommandFailedException : Exception;

    private static readonly Dictionary<string, string> CommandHelp = new(StringComparer.Ordinal)
    {
        ["read"] = "read [-abCqv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset",
        ["write"] = "write [-bcCfnquz] [-P pattern] off len -- writes a number of bytes at a specified offset",
        ["readv"] = "readv [-Cqv] [-P pattern] off len [len..] -- reads a number of bytes at a specified offset",
        ["writev"] = "writev [-Cfq] [-P pattern] off len [len..] -- writes a number of bytes at a specified offset",
        ["aio_read"] = "aio_read [-Cqv] [-P pattern] off len [len..] -- asynchronously reads a number of bytes",
        ["aio_write"] = "aio_write [-Cfiquz] [-P pattern] off len [len..] -- asynchronously writes a number of bytes",
        ["discard"] = "discard [-Cq] off len -- discards a number of bytes at a specified offset",
        ["alloc"] = "alloc offset [count] -- checks if offset is allocated in the file",
        ["open"] = "open [-rsnkCU] [-t cache] [-d discard] [-o options] [path] -- open the file specified by path",
    };

    /// <summary>Runs one -c command; false when it failed (qemu-io's exit code is 1 then, the next commands still run).</summary>
    private static bool Execute(Session s, string line)
    {
        var words = SplitCommand(line);
        if (words.Count == 0) return true;
        string name = words[0];
        try
        {
            switch (name)
            {
                case "read": return ReadCommand(s, words, vectored: false, "read");
                case "readv": return ReadCommand(s, words, vectored: true, "readv");
                case "aio_read": return ReadCommand(s, words, vectored: true, "aio_read");
                case "write": return WriteCommand(s, words, vectored: false);
                case "writev": return WriteCommand(s, words, vectored: true);
                case "aio_write": return WriteCommand(s, words, vectored: true);
                case "aio_flush":
                case "flush":
                    Need(s).Flush();
                    return true;
                case "discard": return DiscardCommand(s, words);
                case "map": return MapCommand(s);
                case "alloc": return AllocCommand(s, words);
                case "length":
                    s.Out.WriteLine(Cvt(Need(s).Size));
                    return true;
                case "open": return OpenCommand(s, words);
                case "close":
                    s.Close();
                    return true;
                case "x-stress":
                    return StressWriter.Run(Need(s), int.Parse(words[1], CultureInfo.InvariantCulture), int.Parse(words[2], CultureInfo.InvariantCulture), s.Out) == 0;
                default:
                    s.Err.WriteLine($"command \"{name}\" not found");
                    return false;
            }
        }
        catch (CommandUsageException)
        {
            s.Out.WriteLine(CommandHelp.GetValueOrDefault(name, name));
            return false;
        }
        catch (CommandFailedException)
        {
            return false;
        }
    }

    /// <summary>qemu-io splits a command line on blanks (no quoting).</summary>
    private static List<string> SplitCommand(string line) => [.. line.Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries)];

    private static BlockImage Need(Session s)
    {
        if (s.Image is not null) return s.Image;
        s.Err.WriteLine("no file open, try 'help open'");
        throw new CommandFailedException();
    }

    /// <summary>getopt over a command's words: flags, options with values (from <paramref name="withValue"/>), the rest.</summary>
    private static (HashSet<char> Flags, Dictionary<char, string> Values, List<string> Words) Options(List<string> words, string flags, string withValue)
    {
        var set = new HashSet<char>();
        var values = new Dictionary<char, string>();
        var rest = new List<string>();
        for (int i = 1; i < words.Count; i++)
        {
            string w = words[i];
            if (w.Length < 2 || w[0] != '-' || (char.IsAsciiDigit(w[1]) && rest.Count > 0))
            {
                rest.Add(w);
                continue;
            }
            for (int j = 1; j < w.Length; j++)
            {
                char c = w[j];
                if (withValue.Contains(c))
                {
                    if (j + 1 < w.Length) values[c] = w[(j + 1)..];
                    else if (i + 1 < words.Count) values[c] = words[++i];
                    else throw new CommandUsageException();
                    break;
                }
                if (!flags.Contains(c)) throw new CommandUsageException();
                set.Add(c);
            }
        }
        return (set, values, rest);
    }

    /// <summary>qemu's cvtnum: a byte count with an optional binary suffix.</summary>
    private static long Number(Session s, string text)
    {
        if (SizeText.TryParse(text, out long v)) return v;
        if (text.StartsWith("0x", StringComparison.OrdinalIgnoreCase) && long.TryParse(text.AsSpan(2), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out v)) return v;
        if (text.StartsWith('-') && long.TryParse(text, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out v)) return v;
        bool wellFormed = System.Text.RegularExpressions.Regex.IsMatch(text, "^[0-9]+(\\.[0-9]+)?([kKmMgGtTpPeE]|[kKmMgGtTpPeE]?[bB])?$");
        s.Out.WriteLine(wellFormed ? $"Parsing error: argument too large -- {text}" : $"Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {text}");
        throw new CommandFailedException();
    }

    /// <summary>A -P pattern: a byte, decimal or 0x hex.</summary>
    private static byte Pattern(Session s, string text)
    {
        bool ok = text.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? long.TryParse(text.AsSpan(2), NumberStyles.HexNumber, CultureInfo.InvariantCulture, out long v)
            : long.TryParse(text, NumberStyles.Integer, CultureInfo.InvariantCulture, out v);
        if (ok && v is >= 0 and <= 255) return (byte)v;
        s.Out.WriteLine($"{text} is not a valid pattern byte");
        throw new CommandFailedException();
    }

    private static (long Offset, long Length) Range(Session s, List<string> rest, bool vectored)
    {
        if (rest.Count < 2 || (!vectored && rest.Count != 2)) throw new CommandUsageException();
        long off = Number(s, rest[0]);
        long len = 0;
        foreach (var l in rest.Skip(1))
        {
            long part = Number(s, l);
            if (part < 0 || part > int.MaxValue)
            {
                s.Out.WriteLine($"length cannot be negative or exceed {int.MaxValue}, was {l}");
                throw new CommandFailedException();
            }
            len += part;
        }
        if (off < 0)
        {
            s.Out.WriteLine($"offset cannot be negative, was {rest[0]}");
            throw new CommandFailedException();
        }
        return (off, len);
    }

    /// <summary>An I/O error as qemu-io words it: "read failed: Input/output error".</summary>
    private static bool Failed(Session s, string op, BlockException e)
    {
        string reason = e switch
        {
            BlockIOException io => BlockIOException.Describe(io.Errno),
            _ when e.Message.Contains("read-only", StringComparison.Ordinal) => "Permission denied",
            _ when e.Message.Contains("Operation not supported", StringComparison.Ordinal) => "Operation not supported",
            _ => "Input/output error",
        };
        s.Out.WriteLine($"{op} failed: {reason}");
        return false;
    }

    private static bool ReadCommand(Session s, List<string> words, bool vectored, string op)
    {
        var (flags, values, rest) = Options(words, vectored ? "Cqvip" : "abCqvp", vectored ? "P" : "Psl");
        var image = Need(s);
        var (off, len) = Range(s, rest, vectored);
        if (off + len > image.Size || off > image.Size)
        {
            s.Out.WriteLine($"{op} failed: Input/output error");
            return false;
        }
        byte? pattern = values.TryGetValue('P', out var p) ? Pattern(s, p) : null;
        long pOff = values.TryGetValue('s', out var so) ? Number(s, so) : 0;
        long pLen = values.TryGetValue('l', out var lo) ? Number(s, lo) : len - pOff;
        if (pattern is not null && (pOff < 0 || pLen < 0 || pOff + pLen > len))
        {
            s.Out.WriteLine("pattern verification range exceeds end of read data");
            return false;
        }
        // Read in pieces (a pattern check needs no more); -v keeps the whole buffer to print it.
        bool dump = flags.Contains('v');
        var buf = new byte[dump ? len : Math.Min(len, 4 << 20)];
        bool patternOk = true;
        var sw = Stopwatch.StartNew();
        try
        {
            for (long pos = 0; pos < len || (len == 0 && pos == 0); pos += buf.Length)
            {
                var piece = buf.AsSpan(0, (int)Math.Min(buf.Length, len - pos));
                image.Read(off + pos, piece);
                if (pattern is { } want)
                {
                    long from = Math.Max(pOff, pos), to = Math.Min(pOff + pLen, pos + piece.Length);
                    if (from < to && piece[(int)(from - pos)..(int)(to - pos)].IndexOfAnyExcept(want) >= 0) patternOk = false;
                }
                if (len == 0) break;
            }
        }
        catch (BlockException e)
        {
            return Failed(s, op, e);
        }
        sw.Stop();
        bool ok = true;
        if (!patternOk)
        {
            s.Out.WriteLine($"Pattern verification failed at offset {off + pOff}, {pLen} bytes");
            ok = false;
        }
        if (flags.Contains('v')) Dump(s.Out, buf, off);
        if (!flags.Contains('q')) Report(s.Out, "read", off, len, sw.Elapsed);
        return ok;
    }

    private static bool WriteCommand(Session s, List<string> words, bool vectored)
    {
        var (flags, values, rest) = Options(words, vectored ? "Cfquzip" : "bcCfnquzp", vectored ? "P" : "Ps");
        var image = Need(s);
        bool zero = flags.Contains('z'), unmap = flags.Contains('u'), compressed = flags.Contains('c');
        if (zero && values.ContainsKey('P'))
        {
            s.Out.WriteLine("Only one of -z, -P, and -s can be specified at the same time");
            return false;
        }
        if (unmap && !zero)
        {
            s.Out.WriteLine("-u requires -z to be specified");
            return false;
        }
        var (off, len) = Range(s, rest, vectored);
        byte pattern = values.TryGetValue('P', out var p) ? Pattern(s, p) : (byte)0xcd;
        if (off + len > image.Size)
        {
            s.Out.WriteLine($"{words[0]} failed: Input/output error");
            return false;
        }
        var sw = Stopwatch.StartNew();
        try
        {
            if (zero) image.WriteZeroes(off, len, unmap);
            else if (compressed) image.WriteCompressed(off, Filled(len, pattern));
            else WriteChunks(image, off, len, pattern);
        }
        catch (BlockException e) when (e.Message.Contains("read-only", StringComparison.Ordinal))
        {
            s.Err.WriteLine($"{Prog}: Block node is read-only");
            return false;
        }
        catch (BlockException e)
        {
            return Failed(s, words[0], e);
        }
        sw.Stop();
        if (!flags.Contains('q')) Report(s.Out, "wrote", off, len, sw.Elapsed);
        return true;
    }

    private static bool DiscardCommand(Session s, List<string> words)
    {
        var (flags, _, rest) = Options(words, "Cq", "");
        var image = Need(s);
        var (off, len) = Range(s, rest, vectored: false);
        var sw = Stopwatch.StartNew();
        try
        {
            image.Discard(off, len);
        }
        catch (BlockException e)
        {
            return Failed(s, "discard", e);
        }
        sw.Stop();
        if (!flags.Contains('q')) Report(s.Out, "discard", off, len, sw.Elapsed);
        return true;
    }

    /// <summary>qemu-io's map: runs of the whole chain, allocated (in some layer) or not.</summary>
    private static bool MapCommand(Session s)
    {
        var image = Need(s);
        long offset = 0;
        while (offset < image.Size)
        {
            var first = ChainStatus.Get(image, offset, image.Size - offset);
            long length = first.Length;
            while (offset + length < image.Size)
            {
                var next = ChainStatus.Get(image, offset + length, image.Size - offset - length);
                if (next.Present != first.Present || next.Length <= 0) break;
                length += next.Length;
            }
            s.Out.WriteLine($"{Cvt(length),-6} (0x{length:x}) bytes {(first.Present ? "    allocated" : "not allocated")} at offset {Cvt(offset)} (0x{offset:x})");
            offset += length;
        }
        return true;
    }

    /// <summary>qemu-io's alloc: how much of a range the top layer itself holds.</summary>
    private static bool AllocCommand(Session s, List<string> words)
    {
        var (_, _, rest) = Options(words, "", "");
        if (rest.Count is < 1 or > 2) throw new CommandUsageException();
        var image = Need(s);
        long off = Number(s, rest[0]);
        long count = rest.Count == 2 ? Number(s, rest[1]) : 512;
        long allocated = 0;
        for (long pos = off; pos < Math.Min(off + count, image.Size);)
        {
            var ext = image.GetLayerStatus(pos, Math.Min(off + count, image.Size) - pos);
            if (ext.Length <= 0) break;
            if (ext.State != LayerState.Unallocated) allocated += ext.Length;
            pos += ext.Length;
        }
        s.Out.WriteLine($"{allocated}/{count} bytes allocated at offset {Cvt(off)}");
        return true;
    }

    /// <summary>open [-rsnkCU] [-t cache] [-d discard] [-o options] [path]: options and path together name the image.</summary>
    private static bool OpenCommand(Session s, List<string> words)
    {
        var (flags, values, rest) = Options(words, "rsnkCU", "tdo");
        if (rest.Count > 1) throw new CommandUsageException();
        s.Close();
        bool readOnly = flags.Contains('r');
        bool forceShare = flags.Contains('U');
        string? path = rest.Count == 1 ? rest[0] : null;
        try
        {
            var opened = new Session(s.Out, s.Err) { ForceShare = forceShare };
            if (values.TryGetValue('o', out var o))
            {
                var given = BlockSpec.FromKeyValues(o);
                var options = path is null ? given : ImageOpener.WithFilename(given, path);
                s.Image = OpenForSession(opened, path ?? o, options, null, readOnly);
            }
            else if (path is not null) s.Image = OpenForSession(opened, path, null, null, readOnly);
            else throw new CommandUsageException();
        }
        catch (BlockException e)
        {
            s.Err.WriteLine($"{Prog}: can't open{(path is null ? "" : $" device {path}")}: {Reason(path ?? "", e)}");
            return false;
        }
        return true;
    }

    /// <summary>qemu-io's statistics: "wrote 4096/4096 bytes at offset 0" then
    /// "4 KiB, 1 ops; 00.00 sec (… KiB/sec and … ops/sec)".</summary>
    private static void Report(TextWriter o, string op, long offset, long length, TimeSpan elapsed)
    {
        double seconds = Math.Max(elapsed.TotalSeconds, 1e-6);
        o.WriteLine($"{op} {length}/{length} bytes at offset {offset}");
        o.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{Cvt(length)}, 1 ops; {TimeText(elapsed)} ({Cvt(length / seconds)}/sec and {1 / seconds:F4} ops/sec)"));
    }

    /// <summary>qemu's timestr: "SS.hh sec" under a minute, "M:SS.hh" under an hour, else "H:MM:SS.hh".</summary>
    private static string TimeText(TimeSpan t)
    {
        double sec = t.TotalSeconds;
        if (sec >= 3600) return string.Create(CultureInfo.InvariantCulture, $"{(int)(sec / 3600)}:{(int)(sec % 3600 / 60):00}:{sec % 60:00.00}");
        if (sec >= 60) return string.Create(CultureInfo.InvariantCulture, $"{(int)(sec / 60)}:{sec % 60:00.00}");
        return string.Create(CultureInfo.InvariantCulture, $"{sec:00.00} sec");
    }

    /// <summary>qemu's cvtstr: three decimals in the largest binary unit reached, ".000" dropped ("4 KiB", "1.500 KiB").</summary>
    private static string Cvt(double value)
    {
        string[] units = [" EiB", " PiB", " TiB", " GiB", " MiB", " KiB"];
        string suffix = " bytes";
        for (int i = 0; i < units.Length; i++)
        {
            double unit = Math.Pow(1024, units.Length - i);
            if (value >= unit)
            {
                value /= unit;
                suffix = units[i];
                break;
            }
        }
        string text = value.ToString("F3", CultureInfo.InvariantCulture);
        int trim = text.IndexOf(".000", StringComparison.Ordinal);
        return trim >= 0 ? text[..trim] + suffix : text + suffix;
    }

    /// <summary>read -v: qemu-io's hex dump, 16 bytes a line, letters and digits shown as themselves, the rest as '.'.</summary>
    private static void Dump(TextWriter o, byte[] buf, long offset)
    {
        var sb = new StringBuilder();
        for (int i = 0; i < buf.Length; i += 16)
        {
            int n = Math.Min(16, buf.Length - i);
            sb.Append(CultureInfo.InvariantCulture, $"{offset + i:x8}:  ");
            for (int j = 0; j < n; j++) sb.Append(CultureInfo.InvariantCulture, $"{buf[i + j]:x2} ");
            sb.Append(' ');
            for (int j = 0; j < n; j++) sb.Append(char.IsAsciiLetterOrDigit((char)buf[i + j]) ? (char)buf[i + j] : '.');
            sb.Append('\n');
        }
        o.Write(sb.ToString());
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

    private const string Usage = """
        Usage: qemu-io [OPTIONS]... [-c STRING]... [file]
        QEMU Disk exerciser

          --object OBJECTDEF   define an object such as 'secret' for
                               passwords and/or encryption keys
          --image-opts         treat file as option string
          -c, --cmd STRING     execute command with its arguments
                               from the given string
          -f, --format FMT     specifies the block driver to use
          -r, --read-only      export read-only
          -s, --snapshot       use snapshot file
          -n, --nocache        disable host cache, short for -t none
          -C, --copy-on-read   enable copy-on-read
          -m, --misalign       misalign allocations for O_DIRECT
          -k, --native-aio     use kernel AIO implementation
                               (Linux only, prefer use of -i)
          -i, --aio=MODE       use AIO mode (threads, native or io_uring)
          -t, --cache=MODE     use the given cache mode for the image
          -d, --discard=MODE   use the given discard mode for the image
          -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                               specify tracing options
                               see qemu-img(1) man page for full description
          -U, --force-share    force shared permissions
          -h, --help           display this help and exit
          -V, --version        output version information and exit

        See 'qemu-io -c help' for information on available commands.

        See <https://qemu.org/contribute/report-a-bug> for how to report bugs.
        More information on the QEMU project at <https://qemu.org>.

        """;
}
