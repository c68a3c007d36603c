using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Strata.Interop.Tests.Infra;
using Strata.Protocol.Nbd;
using Strata.Protocol.Qmp;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Raw disks with a qcow2 of metadata (an external data file) in the daemons, against qemu-storage-daemon 7.2: the
/// data file as a node (from the header's name, named, or inline) with the same graph, reads, block status and
/// locks; a raw data file that stays the disk through every kind of change over NBD; blockdev-create adopting an
/// existing raw disk; bad setups refused with QEMU's words. File names are absolute: the installed QEMU resolves a
/// relative data file name from its current directory.
/// </summary>
public partial class RawDiskDaemonTests : ScratchDirTest
{
    /// <summary>A qcow2 over a raw data file, both made and written (<see cref="DataFileTests.Changes"/>) by QEMU.</summary>
    private string QemuWrittenImage(string name, bool raw, string size = "4M")
    {
        string img = P(name + ".qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={P(name + ".raw")},data_file_raw={(raw ? "on" : "off")}", img, size).Ok();
        Tools.QemuIo(img, DataFileTests.Changes).Ok();
        return img;
    }

    /// <summary>The blockdev options of a read-only qcow2 node "disk" on <paramref name="img"/>, its data file given
    /// as <paramref name="how"/> says: from the header's name, as a named file node, or defined inline.</summary>
    private static string[] DiskNode(string img, string dataFile, string how, bool readOnly = true)
    {
        string ro = readOnly ? "on" : "off";
        string[] file = ["--blockdev", $"driver=file,node-name=meta,filename={img},read-only={ro}"];
        return how switch
        {
            "implicit" => [.. file, "--blockdev", $"driver=qcow2,node-name=disk,file=meta,read-only={ro}"],
            "named" => [.. file, "--blockdev", $"driver=file,node-name=data,filename={dataFile},read-only={ro}",
                "--blockdev", $"driver=qcow2,node-name=disk,file=meta,data-file=data,read-only={ro}"],
            _ => [.. file, "--blockdev", $"driver=qcow2,node-name=disk,file=meta,read-only={ro},data-file.driver=file,data-file.filename={dataFile}"],
        };
    }

    [GeneratedRegex("#block[0-9]+")]
    private static partial Regex AutomaticNodeName();

    /// <summary>A JSON value with its object members in name order and automatic node names made equal (QEMU's
    /// counter also counts names it gives away internally), for comparing two daemons' answers.</summary>
    private static string Canonical(JsonNode? node) => AutomaticNodeName().Replace(node switch
    {
        JsonObject o => "{" + string.Join(",", o.OrderBy(p => p.Key, StringComparer.Ordinal).Select(p => $"\"{p.Key}\":{Canonical(p.Value)}")) + "}",
        JsonArray a => "[" + string.Join(",", a.Select(Canonical)) + "]",
        null => "null",
        _ => node.ToJsonString(),
    }, "#block");

    [Theory]
    [InlineData(true, "implicit")]
    [InlineData(false, "implicit")]
    [InlineData(true, "named")]
    [InlineData(false, "inline")]
    public async Task BothDaemonsServeADataFileImageAlike(bool raw, string how)
    {
        string img = QemuWrittenImage("d", raw);
        Tools.QemuImg("convert", "-O", "raw", img, P("expected.raw")).Ok();
        var seen = new List<List<string>>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            string nbd = P(kind + ".nbd");
            using var daemon = new BareDaemon(kind, Dir, [.. DiskNode(img, P("d.raw"), how),
                "--nbd-server", $"addr.type=unix,addr.path={nbd}", "--export", "type=nbd,id=e,node-name=disk,name=disk"]);
            Listening.WaitFor(nbd);
            var log = new List<string>();
            await using (var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath))
            {
                log.Add(Canonical(await qmp.ExecuteAsync("query-named-block-nodes")));
                log.Add(Canonical(await qmp.ExecuteAsync("query-block")));
                await using (var client = await NbdClient.ConnectUnixAsync(nbd, "disk"))
                {
                    var bytes = await client.ReadAllAsync();
                    Assert.True(bytes.AsSpan().SequenceEqual(File.ReadAllBytes(P("expected.raw"))), $"{kind} reads the disk unlike qemu-img convert");
                }
                log.Add(Tools.Run("nbdinfo", "--map", $"nbd+unix:///disk?socket={nbd}").Ok().Stdout);
                await qmp.ExecuteAsync("quit");
            }
            seen.Add(log);
        }
        Assert.Equal(seen[0], seen[1]);
        // The data file is a node of the graph, whichever way it was given.
        Assert.Contains($"\"filename\":\"{P("d.raw")}\"", seen[1][0]);
    }

    /// <summary>A tool's command line, exit code and error, with the scratch folder's path made DIR.</summary>
    private string Probe(ToolResult r) => $"{r.Tool} {string.Join(' ', r.Args)}: {r.Exit} {r.Stderr.Trim()}".Replace(Dir, "DIR");

    /// <summary>What other processes may do to the two files while a daemon serves the disk writable: the data file
    /// takes writers (QEMU shares writing it) but no resize, the metadata file neither.</summary>
    [Fact]
    public void LocksOnBothFilesAreQemus()
    {
        string img = QemuWrittenImage("d", raw: true);
        var answers = new List<List<string>>();
        foreach (var kind in new[] { "qsd", "strata" })
        {
            string nbd = P(kind + ".nbd");
            var seen = new List<string>();
            using (new BareDaemon(kind, Dir, [.. DiskNode(img, P("d.raw"), "implicit", readOnly: false)]))
            {
                seen.Add(Probe(Tools.QemuImg("resize", "-f", "raw", P("d.raw"), "8M")));
                seen.Add(Probe(Tools.QemuImg("info", img)));
            }
            using (var daemon = new BareDaemon(kind, Dir, [.. DiskNode(img, P("d.raw"), "implicit", readOnly: false),
                       "--nbd-server", $"addr.type=unix,addr.path={nbd}", "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"]))
            {
                Listening.WaitFor(nbd);
                seen.Add(Probe(Tools.Run("qemu-io", "-f", "raw", "-c", "read 0 4k", P("d.raw"))));
                seen.Add(Probe(Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", P("d.raw"))));
                seen.Add(Probe(Tools.QemuImg("resize", "-f", "raw", P("d.raw"), "8M")));
                seen.Add(Probe(Tools.QemuImg("info", "-U", P("d.raw"))));
                seen.Add(Probe(Tools.Run("qemu-io", "-c", "read 0 4k", img)));
                seen.Add(Probe(Tools.Run("qemu-io", "-r", "-c", "read 0 4k", img)));
            }
            answers.Add(seen);
        }
        Assert.Equal(answers[0], answers[1]);
        Assert.Contains(answers[1], a => a.Contains("Failed to get \"resize\" lock"));
    }

    /// <summary>Random writes, zero writes (punching holes or not) and discards over NBD: after each batch the raw data
    /// file reads exactly as the disk does, and every byte whose last change was a write or a zero write holds it.</summary>
    [Theory]
    [InlineData("unmap")]
    [InlineData("ignore")]
    public async Task ARawDataFileIsTheDiskAfterWritesZeroesAndDiscardsOverNbd(string discard)
    {
        const int size = 8 << 20;
        string img = P("d.qcow2"), raw = P("d.raw"), nbd = P("s.nbd");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={raw},data_file_raw=on", img, size.ToString()).Ok();
        var model = new byte[size];
        var known = new bool[size];
        Array.Fill(known, true);
        using (var daemon = new BareDaemon("strata", Dir, [
                   "--blockdev", $"driver=file,node-name=meta,filename={img}",
                   "--blockdev", $"driver=qcow2,node-name=disk,file=meta,discard={discard}",
                   "--nbd-server", $"addr.type=unix,addr.path={nbd}", "--export", "type=nbd,id=e,node-name=disk,name=disk,writable=on"]))
        {
            Listening.WaitFor(nbd);
            await using var client = await NbdClient.ConnectUnixAsync(nbd, "disk");
            var rng = new Random(15);
            for (int batch = 0; batch < 6; batch++)
            {
                for (int op = 0; op < 40; op++)
                {
                    // Lengths and offsets from single bytes to several clusters, aligned or not.
                    int length = rng.Next(4) switch { 0 => rng.Next(1, 4096), 1 => 65536, 2 => rng.Next(1, 4) * 65536, _ => rng.Next(1, 300_000) };
                    int offset = rng.Next(2) == 0 ? rng.Next(0, size / 65536) * 65536 : rng.Next(0, size);
                    length = Math.Min(length, size - offset);
                    if (length == 0) continue;
                    switch (rng.Next(4))
                    {
                        case 0 or 1:
                            var data = new byte[length];
                            rng.NextBytes(data);
                            await client.WriteAsync(offset, data);
                            data.CopyTo(model, offset);
                            known.AsSpan(offset, length).Fill(true);
                            break;
                        case 2:
                            await client.WriteZeroesAsync(offset, (uint)length, noHole: rng.Next(2) == 0);
                            model.AsSpan(offset, length).Clear();
                            known.AsSpan(offset, length).Fill(true);
                            break;
                        default:
                            // A discard may or may not change what the range reads.
                            await client.TrimAsync(offset, (uint)length);
                            known.AsSpan(offset, length).Fill(false);
                            break;
                    }
                }
                await client.FlushAsync();
                var disk = await client.ReadAllAsync();
                var file = File.ReadAllBytes(raw);
                Assert.Equal(size, file.Length);
                int differs = disk.AsSpan().CommonPrefixLength(file);
                Assert.True(differs == size, $"batch {batch}: the raw file differs from the disk at {differs}");
                for (int i = 0; i < size; i++)
                    if (known[i] && disk[i] != model[i]) Assert.Fail($"batch {batch}: byte {i} reads {disk[i]}, was set to {model[i]}");
            }
            await using var qmp = await QmpClient.ConnectUnixAsync(daemon.QmpPath);
            await qmp.ExecuteAsync("quit");
        }
        Tools.AssertQemuCheckClean(img);
        Tools.AssertQemuIdentical(raw, img, "-f", "raw", "-F", "qcow2");
        Assert.Contains("data file raw: true", Tools.QemuImg("info", img).Ok().Stdout);
    }

    /// <summary>blockdev-create over an existing raw disk's node, as both daemons run it: the disk keeps its bytes
    /// (a larger disk only extends it), the new image reads exactly them, and bad requests fail the job alike.</summary>
    [Fact]
    public async Task BlockdevCreateAdoptsAnExistingRawDiskAsQemuDoes()
    {
        string Raw(string p, string n) => P($"{p}-{n}.raw");
        async Task<List<string>> Scenario(QmpClient c, string prefix)
        {
            var log = new List<string>();
            var events = new EventLog(c);
            async Task Job(string id, string options)
            {
                await c.ExecuteAsync("blockdev-create", JsonNode.Parse($$"""{"job-id":"{{id}}","options":{{options}}}""")!.AsObject());
                await JobWaits.UntilConcluded(events, id);
                log.Add($"{id}: {(await JobWaits.Info(events, id))!["error"]?.GetValue<string>() ?? "ok"}");
                await c.ExecuteAsync("job-dismiss", JsonNode.Parse($$"""{"id":"{{id}}"}""")!.AsObject());
            }
            foreach (var (name, size) in new[] { ("same", 4 << 20), ("larger", 8 << 20), ("v2", 4 << 20), ("nope", 4 << 20), ("noraw", 4 << 20) })
            {
                string disk = Raw(prefix, name), meta = P($"{prefix}-{name}.qcow2");
                Tools.QemuImg("create", "-q", "-f", "raw", disk, "4M").Ok();
                Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 3M 512k", disk).Ok();
                await Job($"f-{name}", $$"""{"driver":"file","filename":"{{meta}}","size":0}""");
                await c.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"file","node-name":"m-{{name}}","filename":"{{meta}}"}""")!.AsObject());
                await c.ExecuteAsync("blockdev-add", JsonNode.Parse($$"""{"driver":"file","node-name":"d-{{name}}","filename":"{{disk}}"}""")!.AsObject());
                string options = name switch
                {
                    "v2" => $$"""{"driver":"qcow2","file":"m-v2","data-file":"d-v2","data-file-raw":true,"version":"v2","size":{{size}}}""",
                    "nope" => $$"""{"driver":"qcow2","file":"m-nope","data-file":"nosuch","data-file-raw":true,"size":{{size}}}""",
                    "noraw" => $$"""{"driver":"qcow2","file":"m-noraw","data-file-raw":true,"size":{{size}}}""",
                    _ => $$"""{"driver":"qcow2","file":"m-{{name}}","data-file":"d-{{name}}","data-file-raw":true,"size":{{size}}}""",
                };
                await Job($"q-{name}", options);
            }
            await c.ExecuteAsync("quit");
            return log;
        }
        var (qemu, strata) = await Differential.OnBothDaemons(Dir, Scenario);
        Assert.Equal(qemu, strata);
        Assert.Contains("q-same: ok", strata);
        foreach (var name in new[] { "same", "larger" })
        {
            Assert.Equal(Tools.Sha256(Raw("q", name)), Tools.Sha256(Raw("s", name)));
            Assert.Equal(new FileInfo(Raw("q", name)).Length, new FileInfo(Raw("s", name)).Length);
            Tools.AssertQemuCheckClean(P($"s-{name}.qcow2"));
            Tools.AssertQemuIdentical(Raw("s", name), P($"s-{name}.qcow2"), "-f", "raw", "-F", "qcow2");
            Assert.Equal(Tools.QemuImg("map", "--output=json", P($"q-{name}.qcow2")).Ok().Stdout,
                         Tools.QemuImg("map", "--output=json", P($"s-{name}.qcow2")).Ok().Stdout);
        }
        // The disk's bytes are untouched: what qemu-io wrote before is still there.
        Tools.Run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x33 3M 512k", "-c", "read -P 0 1M 2M", Raw("s", "same")).Ok();
    }

    /// <summary>strata img create --adopt-data-file: the offline way to the image blockdev-create makes over a raw disk.
    /// The disk keeps its bytes; refusals (no raw bit, a size that would hide data, preallocation that would overwrite
    /// it) create nothing.</summary>
    [Fact]
    public void ImgCreateAdoptsAnExistingRawDiskWithoutTouchingIt()
    {
        string disk = P("disk.raw"), meta = P("meta.qcow2");
        Tools.QemuImg("create", "-q", "-f", "raw", disk, "6M").Ok();
        Tools.Run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x33 5M 512k", disk).Ok();
        string before = Tools.Sha256(disk);
        foreach (var refused in new[]
                 {
                     new[] { "-f", "qcow2", "-o", $"data_file={disk}", meta },
                     ["-f", "qcow2", "-o", $"data_file={disk},data_file_raw=on", meta, "1M"],
                     ["-f", "qcow2", "-o", $"data_file={disk},data_file_raw=on,preallocation=full", meta],
                     ["-f", "raw", meta],
                     ["-f", "qcow2", "-o", $"data_file={P("missing.raw")},data_file_raw=on", meta],
                 })
        {
            var r = Tools.StrataCmd(["img", "create", "--adopt-data-file", .. refused]);
            Assert.True(r.Exit == 1 && r.Stderr.Contains("meta.qcow2: "), r.ToString());
            Assert.False(File.Exists(meta), r.ToString());
            Assert.Equal(before, Tools.Sha256(disk));
        }
        var made = Tools.StrataCmd("img", "create", "-f", "qcow2", "--adopt-data-file", "-o", $"data_file={disk},data_file_raw=on", meta).Ok();
        Assert.Contains("size=6291456", made.Stdout);
        Assert.Equal(before, Tools.Sha256(disk));
        Tools.AssertQemuCheckClean(meta);
        Tools.AssertQemuIdentical(disk, meta, "-f", "raw", "-F", "qcow2");
        Assert.Contains("data file raw: true", Tools.QemuImg("info", meta).Ok().Stdout);
        // Every cluster of the disk is mapped to its own offset in the raw file.
        Assert.Equal("""[{ "start": 0, "length": 6291456, "depth": 0, "present": true, "zero": false, "data": true, "offset": 0}]""",
                     Tools.QemuImg("map", "--output=json", meta).Ok().Stdout.Trim());
        // qemu-img create, by contrast, makes the disk anew.
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={disk},data_file_raw=on", P("qemu.qcow2"), "6M").Ok();
        Assert.NotEqual(before, Tools.Sha256(disk));
    }

    /// <summary>Bad data-file setups in blockdev-add, with QEMU's classes and words: a data file for an image without
    /// one, a node that does not exist, a data file that is missing, the feature bit without a name.</summary>
    [Fact]
    public async Task BadDataFileSetupsAreRefusedAsQemuRefusesThem()
    {
        async Task<List<string>> Scenario(QmpClient c, string prefix)
        {
            var t = new QmpTranscript(c, Dir);
            string plain = P($"{prefix}-plain.qcow2"), missing = P($"{prefix}-missing.qcow2"), noName = P($"{prefix}-noname.qcow2");
            string missingRaw = P($"{prefix}-missing.raw"), rawFile = P($"{prefix}-data.raw");
            Tools.QemuImg("create", "-q", "-f", "qcow2", plain, "1M").Ok();
            Tools.QemuImg("create", "-q", "-f", "raw", rawFile, "1M").Ok();
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={missingRaw},data_file_raw=on", missing, "1M").Ok();
            File.Delete(missingRaw);
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={P($"{prefix}-nn.raw")}", noName, "1M").Ok();
            // The name extension's type overwritten: the feature bit stays, the name is gone.
            Qcow2Edit.WriteU64(noName, 112, 0x5858585800000000 | Qcow2Edit.ReadU64(noName, 112) & 0xffffffff);
            foreach (var (n, f) in new[] { ("plain", plain), ("missing", missing), ("noname", noName) })
                await t.Try("blockdev-add", $$"""{"driver":"file","node-name":"f-{{n}}","filename":"{{f}}"}""");
            await t.Try("blockdev-add", $$"""{"driver":"file","node-name":"raw","filename":"{{rawFile}}"}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"a","file":"f-plain","data-file":"raw"}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"b","file":"f-missing","data-file":"nosuch"}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"c","file":"f-missing"}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"d","file":"f-noname"}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"e","file":"f-missing","data-file":{"driver":"file","filename":"/nonexistent/x.raw"}}""");
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"f","file":"f-missing","data-file":42}""");
            // The node used as a data file cannot go while it is one, and the image then opens with it.
            await t.Try("blockdev-add", """{"driver":"qcow2","node-name":"g","file":"f-noname","data-file":"raw"}""");
            await t.Try("blockdev-del", """{"node-name":"raw"}""");
            await t.Try("blockdev-del", """{"node-name":"g"}""");
            await t.Try("blockdev-del", """{"node-name":"raw"}""");
            await c.ExecuteAsync("quit");
            return t.Lines.Select(l => l.Replace($"DIR/{prefix}-", "DIR/X-")).ToList();
        }
        var (qemu, strata) = await Differential.OnBothDaemons(Dir, Scenario);
        Assert.Equal(qemu, strata);
        Assert.Contains(strata, l => l.Contains("'data-file' can only be set for images with an external data file"));
    }
}
