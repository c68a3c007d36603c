using System.Globalization;

namespace Strata.Backup;

/// <summary>How many points to keep: the newest N, and the newest point of each of the last N days, weeks and months
/// that have one. The newest point is always kept (the source's bitmap continues from it).</summary>
public sealed record RetentionPolicy(int KeepLast, int KeepDaily, int KeepWeekly, int KeepMonthly)
{
    /// <summary>The ids (of points of one disk, any order) to keep.</summary>
    public HashSet<string> Keep(IEnumerable<(string Id, DateTimeOffset Time)> points)
    {
        var newestFirst = points.OrderByDescending(p => p.Time).ThenByDescending(p => p.Id, StringComparer.Ordinal).ToList();
        var keep = new HashSet<string>();
        if (newestFirst.Count == 0) return keep;
        keep.Add(newestFirst[0].Id);
        foreach (var p in newestFirst.Take(KeepLast)) keep.Add(p.Id);
        KeepPerPeriod(newestFirst, KeepDaily, t => t.UtcDateTime.ToString("yyyy-MM-dd", CultureInfo.InvariantCulture), keep);
        KeepPerPeriod(newestFirst, KeepWeekly, t => $"{ISOWeek.GetYear(t.UtcDateTime)}-W{ISOWeek.GetWeekOfYear(t.UtcDateTime)}", keep);
        KeepPerPeriod(newestFirst, KeepMonthly, t => t.UtcDateTime.ToString("yyyy-MM", CultureInfo.InvariantCulture), keep);
        return keep;
    }

    private static void KeepPerPeriod(List<(string Id, DateTimeOffset Time)> newestFirst, int count, Func<DateTimeOffset, string> period, HashSet<string> keep)
    {
        var seen = new HashSet<string>();
        foreach (var p in newestFirst)
        {
            if (seen.Count >= count) break;
            if (seen.Add(period(p.Time))) keep.Add(p.Id);
        }
    }
}
