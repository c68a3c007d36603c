using System.Text.Json.Nodes;

namespace Strata.Interop.Tests;

/// <summary>
/// Waits for jobs by their events (JOB_STATUS_CHANGE, which qemu-storage-daemon and Strata both send on every
/// state change), not by polling. query-jobs is asked only to settle what events cannot: a state reached before the
/// log began (or after it was cleared), and at the deadline, a last look before giving up.
/// </summary>
public static class JobWaits
{
    private static readonly TimeSpan DefaultTimeout = TimeSpan.FromSeconds(20);

    /// <summary>Until job <paramref name="id"/> reaches <paramref name="status"/> ("null": dismissed, gone).</summary>
    public static async Task UntilStatus(EventLog events, string id, string status, TimeSpan? timeout = null)
    {
        if (await StatusNow(events, id) == status) return;
        // The latest life of this id: an id may be used again once its job is gone.
        var reached = await events.WaitForAsync(list =>
        {
            int from = list.FindLastIndex(e => IsStatus(e, id, "created"));
            for (int i = Math.Max(0, from); i < list.Count; i++)
                if (IsStatus(list[i], id, status)) return list[i];
            return null;
        }, timeout ?? DefaultTimeout);
        if (reached is not null || await StatusNow(events, id) == status) return;
        throw new TimeoutException($"job {id} never reached {status}; it is {await StatusNow(events, id)}");
    }

    /// <summary>Until job <paramref name="id"/> has concluded (with or without an error; not dismissed).</summary>
    public static Task UntilConcluded(EventLog events, string id, TimeSpan? timeout = null) => UntilStatus(events, id, "concluded", timeout);

    /// <summary>Until no job is left (every one concluded and dismissed).</summary>
    public static async Task UntilNoJobs(EventLog events, TimeSpan? timeout = null)
    {
        var deadline = DateTime.UtcNow + (timeout ?? DefaultTimeout);
        while (true)
        {
            var ids = (await events.Client.ExecuteAsync("query-jobs"))!.AsArray().Select(j => j!["id"]!.GetValue<string>()).ToList();
            if (ids.Count == 0) return;
            var left = deadline - DateTime.UtcNow;
            if (left <= TimeSpan.Zero) throw new TimeoutException($"jobs still there: {string.Join(", ", ids)}");
            foreach (var id in ids) await UntilStatus(events, id, "null", left);
        }
    }

    /// <summary>The job's status as query-jobs gives it, "null" when it is not listed.</summary>
    public static async Task<string> StatusNow(EventLog events, string id) =>
        (await events.Client.ExecuteAsync("query-jobs"))!.AsArray().FirstOrDefault(j => j!["id"]!.GetValue<string>() == id)?["status"]?.GetValue<string>() ?? "null";

    /// <summary>The job's query-jobs entry (null when it is not listed).</summary>
    public static async Task<JsonNode?> Info(EventLog events, string id) =>
        (await events.Client.ExecuteAsync("query-jobs"))!.AsArray().FirstOrDefault(j => j!["id"]!.GetValue<string>() == id);

    private static bool IsStatus(JsonObject e, string id, string status) =>
        e["event"]!.GetValue<string>() == "JOB_STATUS_CHANGE" && e["data"]!["id"]!.GetValue<string>() == id && e["data"]!["status"]!.GetValue<string>() == status;
}
