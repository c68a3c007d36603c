using System.Text.Json.Nodes;
using Xunit.Abstractions;
using Strata.Interop.Tests.Infra;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;

namespace Strata.Interop.Tests;

/// <summary>
/// Every QMP command the daemon lists, its arguments broken one at a time at every depth: each member of a
/// well-typed request (nested objects and list items included: blockdev-add's driver options and inline children,
/// transaction actions' data, nbd-server-start's addr, block-export-add's bitmaps, …) replaced by wrong types and
/// out-of-range numbers and strings, removed, or joined by an unknown member; and every member query-qmp-schema
/// lists for the command added with each of those values. Every attempt gets an error with a class or a result,
/// never a dropped connection: the same connection answers query-version after each, no failure is an untranslated
/// exception, and at the end the disk is still served over NBD.
/// </summary>
public class QmpArgumentFuzzTests(ITestOutputHelper output) : ScratchDirTest
{
    /// <summary>What goes in place of a member: every JSON type, and numbers and strings out of every range.</summary>
    private static readonly string[] Garbage =
    [
        "1", "-1", "2147483648", "4294967296", "9223372036854775808", "18446744073709551616", "-9223372036854775809", "1e300", "1.5",
        "\"x\"", "\"\"", "\"" + new string('a', 5000) + "\"", "\"\\u0000\"", "true", "null", "{}", "[]", "[1]", "{\"x\":1}",
    ];

    /// <summary>One well-typed request per command, or several to reach every nested shape, over the fixture
    /// (node vda with bitmap b, its file node vda-file, an NBD server with export guest-vda). They need not succeed:
    /// types are checked before anything else. "after" undoes what the request or a mutation of it may have done.</summary>
    private List<(string Command, string Json, (string Command, string Json)? After)> Seeds()
    {
        string D = Dir;
        const string backupOptions = """
            "speed":0,"bitmap":"b","bitmap-mode":"on-success","compress":false,"on-source-error":"report","on-target-error":"report",
            "auto-finalize":true,"auto-dismiss":true,"filter-node-name":"fz-filter","x-perf":{"use-copy-range":false,"max-workers":4,"max-chunk":0}
            """;
        const string mirrorOptions = """
            "sync":"full","speed":0,"granularity":65536,"buf-size":0,"on-source-error":"report","on-target-error":"report",
            "copy-mode":"background","auto-finalize":true,"auto-dismiss":true
            """;
        static (string, string)? Del(string node) => ("blockdev-del", $$"""{"node-name":"{{node}}"}""");
        (string, string)? importCancel = ("x-strata-bitmap-import-cancel", """{"node":"vda"}""");
        return
        [
            ("block-dirty-bitmap-add", """{"node":"vda","name":"fz","granularity":65536,"persistent":false,"disabled":false}""", ("block-dirty-bitmap-remove", """{"node":"vda","name":"fz"}""")),
            ("block-dirty-bitmap-clear", """{"node":"vda","name":"nosuch"}""", null),
            ("block-dirty-bitmap-disable", """{"node":"vda","name":"nosuch"}""", null),
            ("block-dirty-bitmap-enable", """{"node":"vda","name":"nosuch"}""", null),
            ("block-dirty-bitmap-remove", """{"node":"vda","name":"nosuch"}""", null),
            ("block-dirty-bitmap-merge", """{"node":"vda","target":"nosuch","bitmaps":["b",{"node":"vda","name":"b"}]}""", null),
            ("x-debug-block-dirty-bitmap-sha256", """{"node":"vda","name":"b"}""", null),
            ("block-export-add", """{"type":"nbd","id":"fz-exp","node-name":"vda","writable":true,"writethrough":false,"name":"fz","description":"d","bitmaps":["b",{"node":"vda","name":"b"}],"allocation-depth":true}""", ("block-export-del", """{"id":"fz-exp","mode":"hard"}""")),
            ("block-export-del", """{"id":"nosuch","mode":"safe"}""", null),
            ("nbd-server-add", """{"device":"vda","name":"fz-old","description":"d","writable":false,"bitmap":"nosuch"}""", ("nbd-server-remove", """{"name":"fz-old","mode":"hard"}""")),
            ("nbd-server-remove", """{"name":"nosuch","mode":"safe"}""", null),
            ("nbd-server-start", $$$"""{"addr":{"type":"unix","data":{"path":"{{{D}}}/fz.nbd","abstract":false,"tight":true}},"max-connections":4}""", null),
            ("nbd-server-start", """{"addr":{"type":"inet","data":{"host":"127.0.0.1","port":"0","numeric":true,"to":0,"ipv4":true,"ipv6":false,"keep-alive":false,"mptcp":false}},"tls-authz":"x"}""", null),
            ("block-job-cancel", """{"device":"nosuch","force":true}""", null),
            ("block-job-pause", """{"device":"nosuch"}""", null),
            ("block-job-resume", """{"device":"nosuch"}""", null),
            ("block-job-complete", """{"device":"nosuch"}""", null),
            ("block-job-set-speed", """{"device":"nosuch","speed":0}""", null),
            ("block-job-finalize", """{"id":"nosuch"}""", null),
            ("block-job-dismiss", """{"id":"nosuch"}""", null),
            ("job-pause", """{"id":"nosuch"}""", null),
            ("job-resume", """{"id":"nosuch"}""", null),
            ("job-cancel", """{"id":"nosuch"}""", null),
            ("job-complete", """{"id":"nosuch"}""", null),
            ("job-finalize", """{"id":"nosuch"}""", null),
            ("job-dismiss", """{"id":"nosuch"}""", null),
            ("blockdev-add", $$$"""{"driver":"file","node-name":"fz-file","filename":"{{{D}}}/nosuch.img","locking":"auto","aio":"threads","aio-max-batch":0,"cache":{"direct":false,"no-flush":false},"read-only":true,"auto-read-only":false,"force-share":false,"discard":"ignore","detect-zeroes":"off"}""", Del("fz-file")),
            ("blockdev-add", $$$"""{"driver":"qcow2","node-name":"fz-qcow2","file":{"driver":"file","filename":"{{{D}}}/nosuch.qcow2","read-only":true},"backing":null,"lazy-refcounts":false,"cache-size":0,"l2-cache-size":0,"pass-discard-request":true}""", Del("fz-qcow2")),
            ("blockdev-add", """{"driver":"raw","node-name":"fz-raw","file":"nosuch","read-only":true}""", Del("fz-raw")),
            ("blockdev-add", """{"driver":"qcow2","node-name":"fz-qcow2b","file":"nosuch","backing":"vda"}""", Del("fz-qcow2b")),
            ("blockdev-add", """{"driver":"null-co","node-name":"fz-null","size":1048576,"read-zeroes":true,"latency-ns":0}""", Del("fz-null")),
            ("blockdev-add", $$$"""{"driver":"nbd","node-name":"fz-nbd","server":{"type":"unix","path":"{{{D}}}/nobody.nbd"},"export":"x","reconnect-delay":0,"open-timeout":0}""", Del("fz-nbd")),
            ("blockdev-add", """{"driver":"nbd","node-name":"fz-nbd2","server":{"type":"inet","host":"127.0.0.1","port":"1"},"export":"x"}""", Del("fz-nbd2")),
            ("blockdev-add", $$$"""{"driver":"blkdebug","node-name":"fz-blkdebug","image":{"driver":"file","filename":"{{{D}}}/nosuch.img"},"align":512,"inject-error":[{"event":"read_aio","errno":5,"sector":0,"once":true,"immediately":false,"state":1}],"set-state":[{"event":"read_aio","state":1,"new_state":2}]}""", Del("fz-blkdebug")),
            ("blockdev-add", """{"driver":"copy-before-write","node-name":"fz-cbw","file":"vda","target":"nosuch","bitmap":{"node":"vda","name":"b"},"on-cbw-error":"break-snapshot","cbw-timeout":1}""", Del("fz-cbw")),
            ("blockdev-add", """{"driver":"snapshot-access","node-name":"fz-access","file":"nosuch"}""", Del("fz-access")),
            ("blockdev-add", """{"driver":"throttle","node-name":"fz-throttle","file":"nosuch","throttle-group":"nosuch"}""", Del("fz-throttle")),
            ("blockdev-del", """{"node-name":"nosuch"}""", null),
            ("blockdev-create", $$$"""{"job-id":"fz-create","options":{"driver":"file","filename":"{{{D}}}/fz-created.img","size":1048576,"preallocation":"off","nocow":false}}""", ("job-dismiss", """{"id":"fz-create"}""")),
            ("blockdev-create", """{"job-id":"fz-create2","options":{"driver":"qcow2","file":"nosuch","size":1048576,"version":"v3","cluster-size":65536,"refcount-bits":16,"compression-type":"zlib","lazy-refcounts":false,"backing-file":"x","backing-fmt":"qcow2"}}""", ("job-dismiss", """{"id":"fz-create2"}""")),
            ("blockdev-backup", $$$"""{"job-id":"fz-backup","device":"vda","target":"nosuch","sync":"full",{{{backupOptions}}}}""", null),
            ("drive-backup", $$$"""{"job-id":"fz-dbackup","device":"nosuch","target":"{{{D}}}/fz-db.qcow2","sync":"full","format":"qcow2","mode":"absolute-paths",{{{backupOptions}}}}""", null),
            ("blockdev-mirror", $$$"""{"job-id":"fz-mirror","device":"vda","target":"nosuch","filter-node-name":"fz-mfilter",{{{mirrorOptions}}}}""", null),
            ("drive-mirror", $$$"""{"job-id":"fz-dmirror","device":"nosuch","target":"{{{D}}}/fz-dm.qcow2","format":"qcow2","node-name":"fz-dm","mode":"absolute-paths","unmap":true,{{{mirrorOptions}}}}""", null),
            ("blockdev-snapshot-sync", $$$"""{"node-name":"nosuch","snapshot-file":"{{{D}}}/fz-snap.qcow2","snapshot-node-name":"fz-snap","format":"qcow2","mode":"absolute-paths"}""", null),
            // Each transaction ends with an abort: whatever its actions prepared is rolled back.
            ("transaction", """{"actions":[{"type":"block-dirty-bitmap-add","data":{"node":"vda","name":"fz-t","granularity":65536,"persistent":false,"disabled":false}},{"type":"block-dirty-bitmap-merge","data":{"node":"vda","target":"b","bitmaps":["b",{"node":"vda","name":"b"}]}},{"type":"block-dirty-bitmap-clear","data":{"node":"vda","name":"b"}},{"type":"block-dirty-bitmap-disable","data":{"node":"vda","name":"b"}},{"type":"block-dirty-bitmap-enable","data":{"node":"vda","name":"b"}},{"type":"block-dirty-bitmap-remove","data":{"node":"vda","name":"nosuch"}},{"type":"abort","data":{}}],"properties":{"completion-mode":"individual"}}""", null),
            ("transaction", $$$"""{"actions":[{"type":"blockdev-backup","data":{"job-id":"fz-tb","device":"vda","target":"nosuch","sync":"full",{{{backupOptions}}}}},{"type":"abort","data":{}}]}""", null),
            ("transaction", $$$"""{"actions":[{"type":"drive-backup","data":{"job-id":"fz-td","device":"nosuch","target":"{{{D}}}/fz-td.qcow2","sync":"full","format":"qcow2","mode":"existing"}},{"type":"abort","data":{}}]}""", null),
            ("transaction", $$$"""{"actions":[{"type":"blockdev-snapshot-sync","data":{"node-name":"nosuch","snapshot-file":"{{{D}}}/fz-ts.qcow2","snapshot-node-name":"fz-ts","format":"qcow2","mode":"existing"}},{"type":"abort","data":{}}]}""", null),
            ("x-strata-bitmap-import-begin", """{"node":"vda","bitmaps":[{"name":"fz-i","granularity":65536,"persistent":false,"recording":true}]}""", importCancel),
            ("x-strata-bitmap-import", $$$"""{"node":"vda","server":{"type":"unix","path":"{{{D}}}/nobody.nbd"},"export":"x"}""", null),
            ("x-strata-bitmap-import", """{"node":"vda","server":{"type":"inet","host":"127.0.0.1","port":"1"},"export":"x"}""", null),
            ("x-strata-bitmap-import-cancel", """{"node":"nosuch"}""", null),
            ("query-named-block-nodes", """{"flat":true}""", null),
        ];
    }

    /// <summary>Every member and list item of <paramref name="node"/>, depth first, as paths of keys and indexes.</summary>
    private static IEnumerable<object[]> Paths(JsonNode? node, object[] prefix)
    {
        switch (node)
        {
            case JsonObject o:
                foreach (var (key, child) in o)
                {
                    object[] path = [.. prefix, key];
                    yield return path;
                    foreach (var p in Paths(child, path)) yield return p;
                }
                break;
            case JsonArray a:
                for (int i = 0; i < a.Count; i++)
                {
                    object[] path = [.. prefix, i];
                    yield return path;
                    foreach (var p in Paths(a[i], path)) yield return p;
                }
                break;
        }
    }

    private static JsonNode? At(JsonNode root, IEnumerable<object> path) =>
        path.Aggregate<object, JsonNode?>(root, (n, step) => step is string k ? n![k] : n![(int)step]);

    private static string Show(object[] path) => path.Length == 0 ? "(arguments)" : string.Concat(path.Select((s, i) => s is int n ? $"[{n}]" : i == 0 ? (string)s : "." + s));

    /// <summary>The seed broken in one place at a time.</summary>
    private static IEnumerable<(string What, JsonObject Args)> Mutations(JsonObject seed, IEnumerable<string> schemaMembers)
    {
        foreach (var path in Paths(seed, []))
        {
            var parentPath = path[..^1];
            foreach (var g in Garbage)
            {
                var copy = seed.DeepClone().AsObject();
                var parent = At(copy, parentPath)!;
                if (path[^1] is string key) parent[key] = JsonNode.Parse(g);
                else parent[(int)path[^1]] = JsonNode.Parse(g);
                yield return ($"{Show(path)} = {(g.Length > 40 ? g[..40] + "…" : g)}", copy);
            }
            var without = seed.DeepClone().AsObject();
            if (path[^1] is string k2) At(without, parentPath)!.AsObject().Remove(k2);
            else At(without, parentPath)!.AsArray().RemoveAt((int)path[^1]);
            yield return ($"without {Show(path)}", without);
        }
        foreach (var objectPath in Paths(seed, []).Prepend([]).Where(p => At(seed, p) is JsonObject))
        {
            var copy = seed.DeepClone().AsObject();
            At(copy, objectPath)!.AsObject()["no-such-member"] = 1;
            yield return ($"{Show(objectPath)} + no-such-member", copy);
        }
        foreach (var member in schemaMembers.Where(m => !seed.ContainsKey(m)))
            foreach (var g in Garbage)
            {
                var copy = seed.DeepClone().AsObject();
                copy[member] = JsonNode.Parse(g);
                yield return ($"{member} = {(g.Length > 40 ? g[..40] + "…" : g)}", copy);
            }
    }

    /// <summary>The fixture both daemons get: one qcow2 disk (vda on vda-file) exported writable over NBD.</summary>
    private string[] FixtureOptions(string kind)
    {
        string image = P(kind + "-vda.qcow2");
        Workloads.QemuQcow2(image, "32M", ["write -P 0x5a 0 1M"]);
        return
        [
            "--blockdev", $"driver=file,node-name=vda-file,filename={image}", "--blockdev", "driver=qcow2,node-name=vda,file=vda-file",
            "--nbd-server", $"addr.type=unix,addr.path={P(kind + ".nbd")}", "--export", "type=nbd,id=guest-vda,node-name=vda,name=vda,writable=on",
        ];
    }

    /// <summary>Each broken request's outcome on one daemon: "ok", the error's class and text, or "dropped" (the
    /// daemon is then started again: qemu-storage-daemon 7.2 crashes on a few of these).</summary>
    private async Task<List<(string Command, string What, string Outcome)>> RunAllAsync(string kind, Func<string, bool> include)
    {
        var outcomes = new List<(string, string, string)>();
        BareDaemon? daemon = null;
        QmpClient? qmp = null;
        try
        {
            foreach (var (command, json, after) in Seeds().Where(s => include(s.Command)))
            {
                foreach (var (what, args) in Mutations(JsonNode.Parse(json)!.AsObject(), []))
                {
                    if (qmp is null)
                    {
                        daemon?.Dispose();
                        // Each daemon in a folder of its own: a relative file one creates is not the other's.
                        daemon = new BareDaemon(kind, Directory.CreateDirectory(P(kind + "-cwd")).FullName, FixtureOptions(kind));
                        qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
                        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "b" });
                    }
                    string outcome;
                    try
                    {
                        await qmp.ExecuteAsync(command, args).WaitAsync(TimeSpan.FromSeconds(30));
                        outcome = "ok";
                    }
                    catch (QmpException e)
                    {
                        outcome = $"{e.ErrorClass}: {e.Message.Replace(Dir, "DIR")}";
                    }
                    catch (Exception e) when (e is IOException or TimeoutException)
                    {
                        outcome = e is IOException ? "dropped" : "hung";
                        await qmp.DisposeAsync();
                        qmp = null;
                    }
                    outcomes.Add((command, what, outcome));
                    if (after is { } undo && qmp is not null)
                        try { await qmp.ExecuteAsync(undo.Command, JsonNode.Parse(undo.Json)).WaitAsync(TimeSpan.FromSeconds(30)); } catch (QmpException) { }
                }
            }
        }
        finally
        {
            if (qmp is not null) await qmp.DisposeAsync();
            daemon?.Dispose();
        }
        return outcomes;
    }

    /// <summary>Differential: the same broken requests (every command both daemons have) against qemu-storage-daemon
    /// and strata daemon. Where either answers with an argument-checking error (wrong type, missing or unexpected
    /// member, value out of an enum or a range), both answer the same class and text. Requests that crash or hang
    /// qemu-storage-daemon 7.2 itself are listed in the output and skipped.</summary>
    [Fact]
    public async Task BrokenArgumentsGetQemusTypeErrors()
    {
        var qemu = await RunAllAsync("qsd", c => !c.StartsWith("x-strata-", StringComparison.Ordinal));
        var strata = await RunAllAsync("strata", c => !c.StartsWith("x-strata-", StringComparison.Ordinal));
        int compared = 0;
        var differences = new List<string>();
        foreach (var (q, s) in qemu.Zip(strata))
        {
            if (q.Outcome is "dropped" or "hung") output.WriteLine($"qemu-storage-daemon {q.Outcome}: {q.Command} {q.What}");
            Assert.True(s.Outcome is not ("dropped" or "hung"), $"strata daemon {s.Outcome}: {s.Command} {s.What}");
            if (q.Outcome is "dropped" or "hung") continue;
            string qm = q.Outcome[(q.Outcome.IndexOf(": ", StringComparison.Ordinal) + 2)..], sm = s.Outcome[(s.Outcome.IndexOf(": ", StringComparison.Ordinal) + 2)..];
            if (!IsTypeError(qm) && !IsTypeError(sm)) continue;
            compared++;
            // The one difference kept on purpose: QEMU takes a negative number for a uint64 member modulo 2^64
            // (a size of -1 is 16 EiB); Strata refuses it.
            if (q.What.EndsWith(" = -1", StringComparison.Ordinal) && sm.EndsWith("' expects uint64", StringComparison.Ordinal)) continue;
            if (q.Outcome != s.Outcome) differences.Add($"{q.Command} {q.What}\n   qsd:    {q.Outcome}\n   strata: {s.Outcome}");
        }
        output.WriteLine($"{compared} type errors compared");
        Assert.True(compared > 3000, $"only {compared} type errors compared");
        Assert.True(differences.Count == 0, $"{differences.Count} differ:\n{string.Join("\n", differences)}");
    }

    /// <summary>The errors of QEMU's input visitor: wrong type, missing or unexpected member, value out of an enum or a range.</summary>
    private static bool IsTypeError(string message) => System.Text.RegularExpressions.Regex.IsMatch(message,
        @"^(Invalid parameter type for '[^']*', expected: \S+|Parameter '[^']*' (is missing|is unexpected|does not accept value '.*'|expects (uint64|u?int(8|16|32|64)_t)))$",
        System.Text.RegularExpressions.RegexOptions.Singleline);

    [Fact]
    public async Task EveryCommandAnswersEveryBrokenArgumentAtEveryDepthAndTheConnectionKeepsWorking()
    {
        string image = P("vda.qcow2");
        Workloads.QemuQcow2(image, "32M", ["write -P 0x5a 0 1M"]);
        string nbd = P("strata.nbd");
        using var daemon = new BareDaemon("strata", Dir,
        [
            "--blockdev", $"driver=file,node-name=vda-file,filename={image}", "--blockdev", "driver=qcow2,node-name=vda,file=vda-file",
            "--nbd-server", $"addr.type=unix,addr.path={nbd}", "--export", "type=nbd,id=guest-vda,node-name=vda,name=vda,writable=on",
        ]);
        await using var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
        await qmp.ExecuteAsync("block-dirty-bitmap-add", new { node = "vda", name = "b" });
        var schema = (await qmp.ExecuteAsync("query-qmp-schema"))!.AsArray();
        var commands = (await qmp.ExecuteAsync("query-commands"))!.AsArray().Select(c => c!["name"]!.GetValue<string>()).ToList();
        var seeds = Seeds();
        // Every listed command is covered: by seeds, or (no arguments, or none that matter here) by an empty one.
        foreach (var command in commands.Where(c => c is not ("quit" or "qmp_capabilities") && seeds.All(s => s.Command != c)))
            seeds.Add((command, "{}", null));
        Assert.Empty(seeds.Select(s => s.Command).Where(c => !commands.Contains(c)).Distinct());

        int attempts = 0, errors = 0;
        foreach (var (command, json, after) in seeds)
        {
            var seed = JsonNode.Parse(json)!.AsObject();
            string? argType = schema.FirstOrDefault(e => e!["name"]?.GetValue<string>() == command)?["arg-type"]?.GetValue<string>();
            var members = schema.FirstOrDefault(e => e!["name"]?.GetValue<string>() == argType)?["members"]?.AsArray()
                .Select(m => m!["name"]!.GetValue<string>()).ToList() ?? [];
            // Zero-argument commands that change the daemon (nbd-server-stop) are only ever sent broken.
            if (json != "{}")
            {
                try
                {
                    await qmp.ExecuteAsync(command, seed.DeepClone()).WaitAsync(TimeSpan.FromSeconds(30));
                }
                catch (QmpException e)
                {
                    Assert.False(IsTypeError(e.Message), $"seed {command} {json} is not well-typed: {e.Message}");
                }
                if (after is { } undo) await Undo(undo);
            }
            foreach (var (what, args) in Mutations(seed, members))
            {
                attempts++;
                try
                {
                    await qmp.ExecuteAsync(command, args).WaitAsync(TimeSpan.FromSeconds(30));
                }
                catch (QmpException e)
                {
                    errors++;
                    Assert.False(string.IsNullOrEmpty(e.ErrorClass) || string.IsNullOrEmpty(e.Message), $"{command} {what}: an error without class or text");
                }
                catch (Exception e) when (e is not QmpException)
                {
                    Assert.Fail($"{command} {what}: {e.GetType().Name}: {e.Message}\n{args.ToJsonString()[..Math.Min(400, args.ToJsonString().Length)]}\nstderr:\n{daemon.Stderr}");
                }
                // The same connection goes on.
                Assert.Equal(7, (await qmp.ExecuteAsync("query-version").WaitAsync(TimeSpan.FromSeconds(10)))!["qemu"]!["major"]!.GetValue<int>());
                if (after is { } undo) await Undo(undo);
            }
        }
        output.WriteLine($"{attempts} broken requests over {seeds.Count} seeds and {commands.Count} commands: {errors} errors, {attempts - errors} results");
        Assert.True(attempts > 5000, $"only {attempts} attempts");
        Assert.True(errors > attempts * 9 / 10, $"{errors} errors of {attempts}: the seeds no longer reach the checks");
        // Every failure was a translated error, not an exception nobody expected.
        var unexpected = daemon.Stderr.Split('\n').Where(l => l.Contains("unexpected error", StringComparison.Ordinal)).Distinct().ToList();
        Assert.True(unexpected.Count == 0, $"{unexpected.Count} kinds of untranslated failure:\n{string.Join("\n", unexpected)}");
        // Still serving: the disk over NBD, and a new QMP client.
        await using (var client = await NbdClient.ConnectUnixAsync(nbd, "vda"))
        {
            var data = new byte[4096];
            await client.ReadAsync(0, data);
            Assert.All(data, b => Assert.Equal(0x5a, b));
        }
        await using var second = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
        await second.ExecuteAsync("query-named-block-nodes");
        await qmp.ExecuteAsync("quit");

        async Task Undo((string Command, string Json) undo)
        {
            try
            {
                await qmp.ExecuteAsync(undo.Command, JsonNode.Parse(undo.Json)).WaitAsync(TimeSpan.FromSeconds(30));
            }
            catch (QmpException)
            {
                // Nothing to undo.
            }
        }
    }
}
