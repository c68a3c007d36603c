using System.Diagnostics;
using System.Text.Json;
using Strata.Interop.Tests.Infra;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// `strata backup run --domain` against the real libvirtd (libvirt 9 + QEMU, TCG domains): the chain of libvirt
/// checkpoints, online and shut off, a checkpoint libvirt lost, a killed run; every point restored with
/// `restore --domain` is compared byte for byte with a copy of each disk taken at that point.
/// </summary>
public class LibvirtBackupTests : ScratchDirTest
{
    private string Repo => P("repo");

    public LibvirtBackupTests() => Tools.StrataCmd("backup", "init", Repo).Ok();

    /// <summary>One run; its points (one per disk, all with one id).</summary>
    private List<JsonElement> Run(LibvirtTestDomain dom, params string[] extra)
    {
        var points = Tools.StrataCmd(["backup", "run", "--domain", dom.Name, "--json", .. extra, Repo]).Ok().Json().EnumerateArray().ToList();
        Assert.Equal(dom.Targets.Select(t => $"{dom.Name}.{t}"), points.Select(p => p.GetProperty("disk").GetString()));
        Assert.Single(points.Select(p => p.GetProperty("id").GetString()).Distinct());
        return points;
    }

    private static string Id(List<JsonElement> points) => points[0].GetProperty("id").GetString()!;

    private static void AssertLevel(List<JsonElement> points, string level, string? parent)
    {
        foreach (var p in points)
        {
            Assert.Equal(level, p.GetProperty("level").GetString());
            Assert.Equal(parent, p.TryGetProperty("parent", out var pa) ? pa.GetString() : null);
        }
    }

    private static long Copied(List<JsonElement> points, string target) =>
        points.Single(p => p.GetProperty("disk").GetString()!.EndsWith("." + target, StringComparison.Ordinal)).GetProperty("copied-bytes").GetInt64();

    /// <summary>`restore --domain` of the point writes each disk byte for byte as its copy, its digests are those of
    /// the copy, and a domain XML points at the restored files.</summary>
    private void AssertDomainRestores(LibvirtTestDomain dom, string id, Dictionary<string, string> copies)
    {
        string to = P("restore-" + id);
        var r = Tools.StrataCmd("backup", "restore", "--domain", dom.Name, "--at", id, "--to", to, "--name", dom.Name + "-r", Repo).Ok();
        foreach (var (target, copy) in copies)
        {
            string restored = Path.Combine(to, $"{dom.Name}-r-{target}.raw");
            Assert.True(File.ReadAllBytes(restored).AsSpan().SequenceEqual(File.ReadAllBytes(copy)), $"{target}@{id} does not restore to the disk as it was\n{r}");
            // libvirt points record granule digests as every other point does (PointCommit).
            Infra.RepositoryAsserts.AssertDigests(Repo, $"{dom.Name}.{target}", id, copy);
        }
        string xml = File.ReadAllText(Path.Combine(to, dom.Name + "-r.xml"));
        foreach (var target in copies.Keys) Assert.Contains($"{dom.Name}-r-{target}.raw", xml);
        Directory.Delete(to, recursive: true);
    }

    private string Checkpoint(string id) => $"strata-{JsonDocument.Parse(File.ReadAllText(Path.Combine(Repo, "strata-repository.json"))).RootElement.GetProperty("tag").GetString()}-{id}";

    [Fact]
    public void TwoDisks_FullAndThreeIncrementals_EveryPointRestores_AndDefines()
    {
        using var dom = new LibvirtTestDomain(Dir, paused: false);
        Assert.Equal("running", LibvirtTestDomain.Virsh("domstate", dom.Name).Stdout.Trim());
        var copies = new List<(string Id, Dictionary<string, string> Disks)>();
        var before = dom.Copy(Dir, "p0");
        var full = Run(dom);
        AssertLevel(full, "full", null);
        copies.Add((Id(full), before));
        Assert.Equal([Checkpoint(Id(full))], dom.Checkpoints());

        string parent = Id(full);
        for (int k = 1; k <= 3; k++)
        {
            // vda: k blocks of 64 KiB at k MiB; vdb: one block, and a zeroed range over the data it had.
            dom.Write("vda", Enumerable.Range(0, k).Select(i => $"write -P 0x{0x20 + k:x2} {(k << 20) + i * 131072} 64k").ToArray());
            dom.Write("vdb", $"write -P 0x{0x30 + k:x2} {16 + k}M 64k", $"write -z {k * 64}k 64k");
            var at = dom.Copy(Dir, "p" + k);
            var inc = Run(dom);
            AssertLevel(inc, "inc", parent);
            // Exactly the data written since the last point is read: no more (the bitmap), no less (the restore).
            Assert.Equal(k * 65536L, Copied(inc, "vda"));
            Assert.Equal(65536L, Copied(inc, "vdb"));
            // One checkpoint: the older ones were deleted once the new point was committed.
            Assert.Equal([Checkpoint(Id(inc))], dom.Checkpoints());
            Assert.False(dom.HasJob(), "the run left libvirt's backup job running");
            copies.Add((Id(inc), at));
            parent = Id(inc);
        }
        foreach (var (id, disks) in copies) AssertDomainRestores(dom, id, disks);

        // --define: libvirt takes the restored domain, which runs on the restored disks.
        string copyName = dom.Name + "-d";
        try
        {
            Tools.StrataCmd("backup", "restore", "--domain", dom.Name, "--to", P("defined"), "-O", "qcow2", "--name", copyName, "--define", Repo).Ok();
            LibvirtTestDomain.Virsh("start", copyName, "--paused");
            var blk = LibvirtTestDomain.Virsh("domblklist", copyName).Stdout;
            foreach (var t in dom.Targets) Assert.Contains(Path.Combine(P("defined"), $"{copyName}-{t}.qcow2"), blk);
        }
        finally
        {
            Tools.Run("virsh", "-c", LibvirtTestDomain.Uri, "destroy", copyName);
            Tools.Run("virsh", "-c", LibvirtTestDomain.Uri, "undefine", copyName);
        }
    }

    /// <summary>The sequence in which virtnbdbackup 1.9.15 loses an increment: online full, online incremental,
    /// shut down, written while off, an offline incremental, started, online incremental.</summary>
    [Fact]
    public void ShutOffDomain_IncrementalFromTheImagesBitmap_ThenOnlineAgain_EveryPointRestores()
    {
        using var dom = new LibvirtTestDomain(Dir);
        var points = new List<(string Id, Dictionary<string, string> Disks)>();
        var c0 = dom.Copy(Dir, "p0");
        var full = Run(dom);
        points.Add((Id(full), c0));
        dom.Write("vda", "write -P 0x41 10M 64k");
        dom.Write("vdb", "write -P 0x42 20M 128k");
        var c1 = dom.Copy(Dir, "p1");
        var inc = Run(dom);
        AssertLevel(inc, "inc", Id(full));
        points.Add((Id(inc), c1));

        dom.Destroy();
        Tools.QemuIo(dom.Image("vda"), ["write -P 0x43 30M 64k", "write -z 0 64k"]);
        Tools.QemuIo(dom.Image("vdb"), ["write -P 0x44 40M 64k"]);
        var c2 = dom.Copy(Dir, "p2");
        var offline = Run(dom);
        AssertLevel(offline, "inc", Id(inc));
        Assert.Equal(65536L, Copied(offline, "vda"));
        Assert.Equal(65536L, Copied(offline, "vdb"));
        // libvirt knows the offline point's checkpoint, whose bitmap the images hold under its name.
        Assert.Equal([Checkpoint(Id(offline))], dom.Checkpoints());
        Assert.Contains(Checkpoint(Id(offline)), Tools.QemuImg("info", dom.Image("vda")).Ok().Stdout);
        points.Add((Id(offline), c2));

        dom.Start();
        dom.Write("vda", "write -P 0x45 50M 64k");
        dom.Write("vdb", "write -P 0x46 10M 64k");
        var c3 = dom.Copy(Dir, "p3");
        var online = Run(dom);
        AssertLevel(online, "inc", Id(offline));
        Assert.Equal(65536L, Copied(online, "vda"));
        Assert.Equal(65536L, Copied(online, "vdb"));
        points.Add((Id(online), c3));

        foreach (var (id, disks) in points) AssertDomainRestores(dom, id, disks);
    }

    [Fact]
    public void CheckpointMetadataLost_IsRedefinedFromTheRepository_OrAFullWithTheReason()
    {
        using var dom = new LibvirtTestDomain(Dir);
        var full = Run(dom);
        dom.Write("vda", "write -P 0x51 5M 64k");
        // libvirt forgets the checkpoint (as a transient domain would), the bitmaps stay in QEMU and the images.
        LibvirtTestDomain.Virsh("checkpoint-delete", dom.Name, Checkpoint(Id(full)), "--metadata");
        Assert.Empty(dom.Checkpoints());
        var c1 = dom.Copy(Dir, "p1");
        var r = Tools.StrataCmd("backup", "run", "--domain", dom.Name, Repo).Ok();
        Assert.Contains($"redefined checkpoint {Checkpoint(Id(full))}", r.Stdout);
        var inc = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().Where(p => p.GetProperty("level").GetString() == "inc").ToList();
        Assert.Equal(2, inc.Count);
        Assert.Equal(65536L, Copied(inc, "vda"));
        Assert.Equal(0L, Copied(inc, "vdb"));
        AssertDomainRestores(dom, Id(inc), c1);

        // Now the checkpoint goes with its bitmaps: it cannot be redefined, and the run says why it takes a full.
        LibvirtTestDomain.Virsh("checkpoint-delete", dom.Name, Checkpoint(Id(inc)));
        dom.Write("vdb", "write -P 0x52 6M 64k");
        var c2 = dom.Copy(Dir, "p2");
        var again = Run(dom);
        AssertLevel(again, "full", null);
        foreach (var p in again)
        {
            string note = p.GetProperty("note").GetString()!;
            Assert.Contains($"full because libvirt lost checkpoint {Checkpoint(Id(inc))} and it cannot be redefined", note);
            Assert.Contains("bitmap", note);
        }
        AssertDomainRestores(dom, Id(again), c2);
        // --level inc refuses rather than take a wrong incremental.
        LibvirtTestDomain.Virsh("checkpoint-delete", dom.Name, Checkpoint(Id(again)));
        var refused = Tools.StrataCmd("backup", "run", "--domain", dom.Name, "--level", "inc", Repo);
        Assert.Equal(1, refused.Exit);
        Assert.Contains("cannot take an incremental", refused.Stderr);
    }

    /// <summary>A run killed (SIGKILL) while libvirt's job runs and its new checkpoint exists: the next run ends
    /// the job, deletes the checkpoint (its bitmap merged into the head's) and takes a correct incremental. A run
    /// stopped by SIGTERM cleans up by itself.</summary>
    [Fact]
    public void KilledRun_NextRunEndsItsJobAndCheckpoint_SigtermCleansUpAtOnce()
    {
        using var dom = new LibvirtTestDomain(Dir);
        var full = Run(dom);
        dom.Write("vda", "write -P 0x61 3M 64k");

        using (var killed = StartHeld(dom))
        {
            Assert.True(dom.HasJob(), "the held run has no libvirt job");
            Assert.Equal(2, dom.Checkpoints().Count);
            killed.Kill();
            killed.WaitForExit();
        }
        Assert.True(dom.HasJob(), "the job is gone by itself: the kill did not leave one to clean up");
        dom.Write("vdb", "write -P 0x62 4M 64k");
        var c1 = dom.Copy(Dir, "p1");
        var r = Tools.StrataCmd("backup", "run", "--domain", dom.Name, Repo).Ok();
        Assert.Contains("ending the backup job left running by an interrupted run", r.Stdout);
        Assert.False(dom.HasJob());
        var points = Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().EnumerateArray().ToList();
        var inc = points.Where(p => p.GetProperty("level").GetString() == "inc").ToList();
        Assert.Equal(2, inc.Count);
        Assert.All(inc, p => Assert.Equal(Id(full), p.GetProperty("parent").GetString()));
        Assert.Equal(65536L, Copied(inc, "vda"));
        Assert.Equal(65536L, Copied(inc, "vdb"));
        Assert.Equal([Checkpoint(Id(inc))], dom.Checkpoints());
        AssertDomainRestores(dom, Id(inc), c1);

        using (var stopped = StartHeld(dom))
        {
            Assert.Equal(0, Tools.Run("kill", "-TERM", stopped.Id.ToString(System.Globalization.CultureInfo.InvariantCulture)).Exit);
            Assert.True(stopped.WaitForExit(30_000), "SIGTERM did not end the run");
            Assert.Equal(1, stopped.ExitCode);
        }
        Assert.False(dom.HasJob(), "SIGTERM left libvirt's job running");
        Assert.Equal([Checkpoint(Id(inc))], dom.Checkpoints());
        Assert.Equal(4, Tools.StrataCmd("backup", "list", "--json", Repo).Ok().Json().GetArrayLength());
    }

    /// <summary>`strata backup run` as its own process, holding libvirt's job once it began.</summary>
    private Process StartHeld(LibvirtTestDomain dom)
    {
        var psi = Tools.StrataStartInfo("backup", "run", "--domain", dom.Name, "--x-hold-after-begin", "120", Repo);
        psi.RedirectStandardOutput = psi.RedirectStandardError = true;
        psi.UseShellExecute = false;
        var p = Process.Start(psi)!;
        var seen = new System.Text.StringBuilder();
        while (p.StandardOutput.ReadLine() is { } line)
        {
            seen.AppendLine(line);
            if (line.StartsWith("holding libvirt's backup job", StringComparison.Ordinal)) return p;
        }
        p.WaitForExit();
        Assert.Fail($"the run did not hold its job:\n{seen}{p.StandardError.ReadToEnd()}");
        return p;
    }

    /// <summary>A raw disk has no bitmap to keep: it is in every point, as a full, and out of the checkpoint, while
    /// the qcow2 disk beside it goes on with incrementals.</summary>
    [Fact]
    public void RawDiskBesideQcow2_FullEachTime_TheQcow2ChainGoesOn()
    {
        using var dom = new LibvirtTestDomain(Dir, formats: ["qcow2", "raw"]);
        var c0 = dom.Copy(Dir, "p0");
        var first = Run(dom);
        AssertLevel(first, "full", null);
        var tracked = System.Xml.Linq.XElement.Parse(LibvirtTestDomain.Virsh("checkpoint-dumpxml", dom.Name, Checkpoint(Id(first)), "--no-domain").Stdout)
            .Element("disks")!.Elements("disk").Where(d => (string?)d.Attribute("checkpoint") == "bitmap").Select(d => (string?)d.Attribute("name"));
        Assert.Equal(["vda"], tracked);
        dom.Write("vda", "write -P 0x71 7M 64k");
        dom.Write("vdb", "write -P 0x72 9M 64k");
        var c1 = dom.Copy(Dir, "p1");
        var second = Run(dom);
        var vda = second.Single(p => p.GetProperty("disk").GetString()!.EndsWith(".vda", StringComparison.Ordinal));
        var vdb = second.Single(p => p.GetProperty("disk").GetString()!.EndsWith(".vdb", StringComparison.Ordinal));
        Assert.Equal("inc", vda.GetProperty("level").GetString());
        Assert.Equal(65536L, vda.GetProperty("copied-bytes").GetInt64());
        Assert.Equal("full", vdb.GetProperty("level").GetString());
        Assert.Contains("the disk is raw", vdb.GetProperty("note").GetString());
        AssertDomainRestores(dom, Id(first), c0);
        AssertDomainRestores(dom, Id(second), c1);
    }

    [Fact]
    public void BadInput_ClearErrors()
    {
        var noDomain = Tools.StrataCmd("backup", "run", "--domain", "no-such-domain-x", Repo);
        Assert.Equal(2, noDomain.Exit);
        Assert.Contains("no domain 'no-such-domain-x'", noDomain.Stderr);
        var both = Tools.StrataCmd("backup", "run", "--domain", "x", "--socket", "/nonexistent", Repo);
        Assert.Equal(2, both.Exit);
        Assert.Contains("not with --socket", both.Stderr);
        var badUri = Tools.StrataCmd("backup", "run", "--domain", "x", "--connect", "qemu:///nonexistent-path", Repo);
        Assert.Equal(4, badUri.Exit);
        Assert.Contains("cannot connect to libvirt", badUri.Stderr);
        var nothing = Tools.StrataCmd("backup", "restore", "--domain", "never-backed-up", "--to", P("r"), Repo);
        Assert.Equal(2, nothing.Exit);
        Assert.Contains("holds no disk of domain 'never-backed-up'", nothing.Stderr);
    }
}
