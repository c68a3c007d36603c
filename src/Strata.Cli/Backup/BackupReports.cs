using System.Text.Json.Serialization;
using Strata.Backup;

namespace Strata.Cli.Backup;

/// <summary>One point as <c>backup run --json</c> and <c>backup list --json</c> print it: the manifest without its
/// extents and digests.</summary>
internal sealed record PointSummary(
    string Id, string Disk, DateTimeOffset Time, string Level, string? Parent, string File, string Mode, string Node, string Bitmap,
    long VirtualSize, long CopiedBytes, long FileSize, string? Note)
{
    public static PointSummary Of(BackupManifest m) =>
        new(m.Id, m.Disk, m.Time, m.Level, m.Parent, m.File, m.Mode, m.Node, m.Bitmap, m.VirtualSize, m.CopiedBytes, m.FileSize, m.Note);
}

/// <summary>What <c>backup verify --json</c> prints.</summary>
internal sealed record VerifyReport(int Points, IReadOnlyList<VerifyProblem> Problems);

/// <summary>The <c>--json</c> outputs of <c>strata backup</c>, in the repository files' style (kebab-case, indented,
/// nulls left out), serialised by generated code so that the native AOT build prints the same.</summary>
[JsonSourceGenerationOptions(
    PropertyNamingPolicy = JsonKnownNamingPolicy.KebabCaseLower,
    WriteIndented = true,
    DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull)]
[JsonSerializable(typeof(List<PointSummary>))]
[JsonSerializable(typeof(VerifyReport))]
internal sealed partial class BackupReportJson : JsonSerializerContext;
