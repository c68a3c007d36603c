using Strata.Backup;

namespace Strata.Tests.Backup;

public class RetentionPolicyTests
{
    private static (string, DateTimeOffset) At(string id, string time) => (id, DateTimeOffset.Parse(time, System.Globalization.CultureInfo.InvariantCulture));

    private static readonly (string, DateTimeOffset)[] Points =
    [
        At("a", "2026-09-30T10:00:00Z"), At("b", "2026-10-15T10:00:00Z"), At("c", "2026-10-31T23:00:00Z"),
        At("d", "2026-11-02T08:00:00Z"), At("e", "2026-11-02T20:00:00Z"), At("f", "2026-11-09T09:00:00Z"),
        At("g", "2026-11-10T09:00:00Z"), At("h", "2026-11-10T18:00:00Z"),
    ];

    [Fact]
    public void KeepLastKeepsTheNewestPoints() =>
        Assert.Equal(["f", "g", "h"], new RetentionPolicy(3, 0, 0, 0).Keep(Points).Order());

    [Fact]
    public void TheNewestPointIsKeptEvenWithANullPolicy() =>
        Assert.Equal(["h"], new RetentionPolicy(0, 0, 0, 0).Keep(Points));

    [Fact]
    public void KeepDailyKeepsTheNewestPointOfEachOfTheLastDaysWithBackups() =>
        // Days with backups, newest first: 11-10 (h), 11-09 (f), 11-02 (e: the later of d and e).
        Assert.Equal(["e", "f", "h"], new RetentionPolicy(0, 3, 0, 0).Keep(Points).Order());

    [Fact]
    public void KeepWeeklyUsesIsoWeeks() =>
        // ISO weeks: W46 holds f, g, h (11-09 is a Monday), W45 holds d and e.
        Assert.Equal(["e", "h"], new RetentionPolicy(0, 0, 2, 0).Keep(Points).Order());

    [Fact]
    public void KeepMonthlyKeepsTheNewestOfEachMonth() =>
        Assert.Equal(["a", "c", "h"], new RetentionPolicy(0, 0, 0, 3).Keep(Points).Order());

    [Fact]
    public void PoliciesAddUp() =>
        Assert.Equal(["c", "g", "h"], new RetentionPolicy(2, 0, 0, 2).Keep(Points).Order());

    [Fact]
    public void NoPointsKeepNothing() => Assert.Empty(new RetentionPolicy(5, 5, 5, 5).Keep([]));
}
