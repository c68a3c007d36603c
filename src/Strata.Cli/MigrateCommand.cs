using System.CommandLine;
using Strata.Backup;

namespace Strata.Cli;

/// <summary>`strata migrate`: move a live disk and its dirty bitmaps from one strata daemon to another.</summary>
internal static class MigrateCommand
{
    public static Command Build(TextWriter stdout, TextWriter stderr)
    {
        var from = new Option<string>("--from") { Description = "QMP socket of the daemon that has the disk", Required = true };
        var to = new Option<string>("--to") { Description = "QMP socket of the daemon that gets it", Required = true };
        var disk = new Option<string>("--disk") { Description = "node name of the disk (kept on the destination)", Required = true };
        var image = new Option<string>("--image") { Description = "new qcow2 file the destination keeps the disk in", Required = true };
        var fromNbd = new Option<string?>("--from-nbd") { Description = "unix socket of an NBD server the source already runs" };
        var toNbd = new Option<string?>("--to-nbd") { Description = "unix socket of an NBD server the destination already runs" };
        var cmd = new Command("migrate", "Move a live disk and every dirty bitmap to another strata daemon (mirror, switch-over, bitmap transfer)\n"
            + "Exit codes: 0 moved; 1 failed (before the switch-over the disk stays on the source); 2 bad arguments; 4 a daemon could not be reached.")
            { from, to, disk, image, fromNbd, toNbd };
        cmd.SetAction(r =>
        {
            try
            {
                new DiskMigrator(new MigrationOptions
                {
                    From = r.GetValue(from)!, To = r.GetValue(to)!, Disk = r.GetValue(disk)!, Image = r.GetValue(image)!,
                    FromNbd = r.GetValue(fromNbd), ToNbd = r.GetValue(toNbd),
                }, stdout.WriteLine).RunAsync().GetAwaiter().GetResult();
                stdout.WriteLine($"{r.GetValue(disk)} moved");
                return 0;
            }
            catch (BackupException e)
            {
                stderr.WriteLine($"strata migrate: {e.Message}");
                if (e.Hint is not null) stderr.WriteLine($"hint: {e.Hint}");
                return e.ExitCode;
            }
            catch (Exception e) when (e is Strata.Protocol.Qmp.QmpException or IOException or Strata.Block.BlockException)
            {
                stderr.WriteLine($"strata migrate: {e.Message}");
                return 1;
            }
        });
        return cmd;
    }
}
