using System.Globalization;

namespace Strata.Backup;

/// <summary>How every repository kind reads <c>--at</c>: a point id, the newest point at or before a time (ISO 8601),
/// or <c>latest</c>.</summary>
public static class PointSelection
{
    /// <param name="points">The disk's points, oldest first.</param>
    /// <param name="disks">Every disk of the repository, for the hint when this one has no points.</param>
    public static T Find<T>(IReadOnlyList<T> points, string disk, string at, Func<T, string> id, Func<T, DateTimeOffset> time, Func<IReadOnlyList<string>> disks)
    {
        if (points.Count == 0)
        {
            var known = disks();
            throw new BackupException($"no backups of disk '{disk}'", known.Count > 0 ? "disks in this repository: " + string.Join(", ", known) : null, BackupExitCodes.Usage);
        }
        if (at == "latest") return points[^1];
        if (points.FirstOrDefault(p => id(p) == at) is { } exact) return exact;
        if (DateTimeOffset.TryParse(at, CultureInfo.InvariantCulture, DateTimeStyles.AssumeUniversal, out var when))
        {
            if (points.LastOrDefault(p => time(p) <= when) is { } before) return before;
            throw new BackupException($"no backup of '{disk}' at or before {when:O}", $"the oldest is {id(points[0])} ({time(points[0]):O})", BackupExitCodes.Usage);
        }
        throw new BackupException($"no backup '{at}' of disk '{disk}'", "`strata backup list` shows the ids", BackupExitCodes.Usage);
    }
}
