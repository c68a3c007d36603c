using System.CommandLine;
using Strata.Cli;
using Strata.Cli.Img;
using Strata.Cli.Io;

// Reached through a link named after one of QEMU's tools, strata is that tool.
string? face = (Environment.GetEnvironmentVariable("STRATA_FACE") ?? ToolFace.InvokedName()) is { } invoked ? ToolFace.SubcommandFor(invoked) : null;
return face is null ? StrataCli.Run(args, Console.Out, Console.Error) : StrataCli.RunAs(face, args, Console.Out, Console.Error);

namespace Strata.Cli
{
    /// <summary>The `strata` command line; tests run it in-process.</summary>
    public static class StrataCli
    {
        /// <summary>Runs as qemu-img ("img"), qemu-io ("io") or qemu-storage-daemon ("daemon"): QEMU's command line
        /// for that tool, QEMU's name in every message.</summary>
        public static int RunAs(string subcommand, string[] args, TextWriter stdout, TextWriter stderr)
        {
            ToolFace.AsQemu = true;
            return Run([subcommand, .. args], stdout, stderr);
        }

        public static int Run(string[] args, TextWriter stdout, TextWriter stderr)
        {
            // Image names like nbd+unix://… reach an NBD server through the protocol library, which the block
            // layer does not reference.
            Strata.Block.ImageOpener.NbdConnector ??= Img.NbdConnect.Connect;
            // The daemon takes qemu-storage-daemon's getopt_long command line verbatim.
            if (args.Length > 0 && args[0] == "daemon") return Daemon.DaemonCommand.Run(args[1..], stdout, stderr);
            // So does qemu-io's (getopt, and commands that go on after one fails).
            if (args.Length > 0 && args[0] == "io") return IoCommand.Run(args[1..], stdout, stderr);
            var root = new RootCommand("Strata: incremental backups for disk images, compatible with QEMU's tools");
            (string Name, Func<Command> Build)[] subcommands =
            [
                ("img", () => ImgCommands.Build(stdout, stderr)),
                ("io", () => IoCommand.Build(stdout, stderr)),
                ("backup", () => Backup.BackupCommands.Build(stdout, stderr)),
                ("migrate", () => MigrateCommand.Build(stdout, stderr)),
                ("demo", () => DemoCommand.Build(stdout, stderr)),
            ];
            // Only the subcommand named, when one is: the others' trees (qemu-img's alone is dozens of commands and
            // options) are not built on the way into every backup run. Without one, all of them, for the root's help.
            bool named = args.Length > 0 && subcommands.Any(c => c.Name == args[0]);
            foreach (var (name, build) in subcommands)
                if (!named || name == args[0]) root.Subcommands.Add(build());
            var config = new InvocationConfiguration { Output = stdout, Error = stderr };
            var parsed = root.Parse(FixNegativeSizes(args));
            if (parsed.Errors.Count > 0 && args.Length > 0)
            {
                // qemu-img's command line errors are qemu-img's messages, not the parser's.
                if (args[0] == "img") return ImgCommands.ReportParseErrors(parsed, stderr);
                // Strata's own commands exit 2 on bad arguments (the README's promise).
                foreach (var error in parsed.Errors) stderr.WriteLine($"strata: {error.Message}");
                var names = new List<string>();
                for (System.CommandLine.Parsing.SymbolResult? r = parsed.CommandResult; r is System.CommandLine.Parsing.CommandResult c && c.Parent is not null; r = c.Parent)
                    names.Insert(0, c.Command.Name);
                stderr.WriteLine($"Try '{string.Join(' ', names.Prepend("strata"))} --help' for more information");
                return 2;
            }
            int rc = parsed.Invoke(config);
            stdout.Flush();
            return rc;
        }

        /// <summary>`img resize FILE -1G`: a leading minus on the last argument is a size, not an option.</summary>
        private static string[] FixNegativeSizes(string[] args)
        {
            if (args.Length >= 4 && args[0] == "img" && args[1] == "resize" && args[^1].Length > 1 && args[^1][0] == '-' && char.IsAsciiDigit(args[^1][1]) && !args.Contains("--"))
                return [.. args[..^1], "--", args[^1]];
            return args;
        }
    }
}
