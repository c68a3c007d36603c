using System.CommandLine;
using System.Globalization;
using Strata.Block;
using Strata.Block.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img snapshot`: qemu-img snapshot's options, messages and listing.</summary>
internal static partial class ImgCommands
{
    private static Command SnapshotCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var list = new Option<bool>("-l") { Description = "list the snapshots" };
        var apply = LastWins("-a", "apply (revert the disk to) a snapshot");
        var create = LastWins("-c", "create a snapshot");
        var delete = LastWins("-d", "delete a snapshot");
        var quiet = QuietOption();
        var forceShare = ForceShareOption();
        var file = new Argument<string>("filename");
        var cmd = new Command("snapshot", "List, apply, create or delete internal snapshots")
            { format, list, apply, create, delete, quiet, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            int actions = (r.GetValue(list) ? 1 : 0) + (r.GetValue(apply) is null ? 0 : 1) +
                          (r.GetValue(create) is null ? 0 : 1) + (r.GetValue(delete) is null ? 0 : 1);
            if (actions > 1) throw new UsageException("Cannot mix '-l', '-a', '-c', '-d'");
            bool listing = actions == 0 || r.GetValue(list);
            using var image = OpenImage(r.GetValue(file)!, r.GetValue(format), readOnly: listing, openBacking: false,
                ReadLocking(r.GetValue(forceShare)));
            if (actions == 0) return 0; // qemu-img opens the image and does nothing
            if (r.GetValue(list))
            {
                stdout.Write(SnapshotListText(image));
                return 0;
            }
            if (image is not Qcow2Image q)
                throw new BlockException($"Block format '{image.FormatName}' used by device '' does not support internal snapshots");
            if (r.GetValue(create) is { } createName)
            {
                try
                {
                    q.CreateSnapshot(createName, DateTimeOffset.UtcNow);
                }
                catch (SnapshotException e)
                {
                    throw new BlockException($"Could not create snapshot '{createName}': -{e.Errno} ({Strerror(e.Errno)})");
                }
            }
            else if (r.GetValue(apply) is { } applyName)
            {
                try
                {
                    q.ApplySnapshot(applyName);
                }
                catch (SnapshotException e)
                {
                    if (e.Message.Length > 0) stderr.WriteLine($"{Prog}: {e.Message}");
                    throw new BlockException($"Could not apply snapshot '{applyName}': Failed to load snapshot: {Strerror(e.Errno)}");
                }
            }
            else if (r.GetValue(delete) is { } deleteName)
            {
                try
                {
                    q.DeleteSnapshot(deleteName);
                }
                catch (SnapshotException e)
                {
                    throw new BlockException($"Could not delete snapshot '{deleteName}': {e.Message}");
                }
            }
            return 0;
        }));
        return cmd;
    }

    private static string Strerror(int errno) => errno switch
    {
        2 => "No such file or directory",
        11 => "Resource temporarily unavailable",
        17 => "File exists",
        22 => "Invalid argument",
        27 => "File too large",
        95 => "Operation not supported",
        _ => $"Unknown error {errno}",
    };

    /// <summary>The snapshot table as qemu-img prints it ("Snapshot list:" and the columns of bdrv_snapshot_dump);
    /// nothing when there are no snapshots.</summary>
    internal static string SnapshotListText(BlockImage image)
    {
        if (image is not Qcow2Image { Snapshots.Count: > 0 } q) return "";
        var sb = new System.Text.StringBuilder();
        sb.Append("Snapshot list:\n");
        sb.Append($"{"ID",-10}{"TAG",-17}{"VM SIZE",8}{"DATE",20}{"VM CLOCK",13}{"ICOUNT",11}\n");
        foreach (var sn in q.Snapshots)
        {
            string date = DateTimeOffset.FromUnixTimeSeconds(sn.DateSeconds).ToLocalTime()
                .ToString("yyyy-MM-dd HH:mm:ss", CultureInfo.InvariantCulture);
            ulong secs = sn.VmClockNanoseconds / 1_000_000_000;
            string clock = string.Create(CultureInfo.InvariantCulture,
                $"{(int)(secs / 3600):00}:{(int)(secs / 60 % 60):00}:{(int)(secs % 60):00}.{(int)(sn.VmClockNanoseconds / 1_000_000 % 1000):000}");
            string icount = sn.Icount == ulong.MaxValue ? "" : ((long)sn.Icount).ToString(CultureInfo.InvariantCulture);
            sb.Append($"{sn.Id,-9} {sn.Name,-16} {SizeText.Human((long)sn.VmStateSize),8}{date,20}{clock,13}{icount,11}\n");
        }
        return sb.ToString();
    }
}
