using System.CommandLine;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Json;

namespace Strata.Cli.Img;

/// <summary>`img check`: qemu-img check's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command CheckCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var repair = LastWins("-r", "repair: leaks or all");
        var quiet = QuietOption();
        var file = new Argument<string>("filename");
        var forceShare = ForceShareOption();
        var cmd = new Command("check", "Check an image for consistency") { format, output, repair, quiet, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string mode = OutputMode(r.GetValue(output)!);
            var repairMode = r.GetValue(repair) switch
            {
                null => RepairMode.None,
                "leaks" => RepairMode.Leaks,
                "all" => RepairMode.All,
                var other => throw new UsageException($"Unknown option value for -r (expecting 'leaks' or 'all'): {other}"),
            };
            string path = r.GetValue(file)!;
            var locking = repairMode == RepairMode.None ? ReadLocking(r.GetValue(forceShare)) : ImageLocking.Normal;
            using var image = OpenImage(path, r.GetValue(format), readOnly: repairMode == RepairMode.None, openBacking: true, locking,
                forCheck: true);
            if (image is not Qcow2Image q)
            {
                stderr.WriteLine($"{Prog}: This image format does not support checks");
                return 63;
            }
            CheckReport report;
            CheckReport? repaired = null;
            try
            {
                report = q.Check(repairMode);
                if (repairMode != RepairMode.None && (report.LeaksFixed > 0 || report.CorruptionsFixed > 0))
                {
                    repaired = report;
                    report = q.Check(RepairMode.None);
                }
            }
            catch (CheckFailedException e)
            {
                foreach (var m in e.Report.Messages) stderr.WriteLine(ToolMessage(m));
                stderr.WriteLine($"{Prog}: {e.Message}");
                return 1;
            }
            foreach (var m in (repaired?.Messages ?? []).Concat(report.Messages)) stderr.WriteLine(ToolMessage(m));
            bool quietMode = r.GetValue(quiet);
            if (mode == "json")
            {
                stdout.WriteLine(QemuJson.Pretty(CheckJson(path, report, repaired)));
            }
            else if (!quietMode)
            {
                stdout.Write(CheckHuman(report, repaired));
            }
            if (report.CheckErrors > 0) return 1;
            if (report.Corruptions > 0) return 2;
            if (report.Leaks > 0) return 3;
            return 0;
        }));
        return cmd;
    }

    private static string ToolMessage(string message) =>
        message.StartsWith(CheckReport.ToolPrefix, StringComparison.Ordinal) ? $"{Prog}: {message[CheckReport.ToolPrefix.Length..]}" : message;

    internal static QDict CheckJson(string file, CheckReport report, CheckReport? repaired)
    {
        var d = new QDict();
        d.Add("filename", file);
        d.Add("format", "qcow2");
        d.Add("check-errors", report.CheckErrors);
        d.Add("image-end-offset", report.ImageEndOffset);
        if (report.Corruptions > 0) d.Add("corruptions", report.Corruptions);
        if (report.Leaks > 0) d.Add("leaks", report.Leaks);
        if (repaired is not null && repaired.CorruptionsFixed > 0) d.Add("corruptions-fixed", repaired.CorruptionsFixed);
        if (repaired is not null && repaired.LeaksFixed > 0) d.Add("leaks-fixed", repaired.LeaksFixed);
        d.Add("total-clusters", report.TotalClusters);
        if (report.AllocatedClusters > 0) d.Add("allocated-clusters", report.AllocatedClusters);
        if (report.FragmentedClusters > 0) d.Add("fragmented-clusters", report.FragmentedClusters);
        if (report.CompressedClusters > 0) d.Add("compressed-clusters", report.CompressedClusters);
        return d;
    }

    internal static string CheckHuman(CheckReport report, CheckReport? repaired)
    {
        var sb = new System.Text.StringBuilder();
        if (repaired is not null)
        {
            sb.Append("The following inconsistencies were found and repaired:\n\n");
            sb.Append($"    {repaired.LeaksFixed} leaked clusters\n");
            sb.Append($"    {repaired.CorruptionsFixed} corruptions\n\n");
            sb.Append("Double checking the fixed image now...\n");
        }
        if (report.Corruptions == 0 && report.Leaks == 0 && report.CheckErrors == 0)
            sb.Append("No errors were found on the image.\n");
        if (report.Corruptions > 0)
            sb.Append($"\n{report.Corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n");
        if (report.Leaks > 0)
            sb.Append($"\n{report.Leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n");
        if (report.CheckErrors > 0)
            sb.Append($"\n{report.CheckErrors} internal errors have occurred during the check.\n");
        if (report.TotalClusters > 0 && report.AllocatedClusters > 0)
        {
            double t = report.TotalClusters;
            sb.Append(System.FormattableString.Invariant(
                $"{report.AllocatedClusters}/{report.TotalClusters} = {report.AllocatedClusters * 100.0 / t:F2}% allocated, {(report.AllocatedClusters == 0 ? 0 : report.FragmentedClusters * 100.0 / report.AllocatedClusters):F2}% fragmented, {(report.AllocatedClusters == 0 ? 0 : report.CompressedClusters * 100.0 / report.AllocatedClusters):F2}% compressed clusters\n"));
        }
        if (report.ImageEndOffset > 0) sb.Append($"Image end offset: {report.ImageEndOffset}\n");
        return sb.ToString();
    }
}
