using System.Diagnostics;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>
/// Command lines a qemu-img user types, run through real qemu-img and through strata on twin images: the same output,
/// exit status and resulting image (map, contents, disk usage). Covers repeated and malformed options, names with
/// colons, format names, bench, resize --preallocation, the space a shrink gives back, bitmap metadata sizes and the
/// NBD client's x-dirty-bitmap view.
/// </summary>
public class QemuImgParityTests : ScratchDirTest
{
    private (int Exit, string Output) Both(string tool, string[] args, string dir)
    {
        var r = tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args]);
        // strata's own face names itself "strata img" where qemu-img names itself.
        string output = (r.Stdout + r.Stderr).Replace("strata img", "qemu-img").Replace(dir, "DIR");
        return (r.Exit, output);
    }

    /// <summary>Runs one command line against a fresh folder per tool (IMG is a 1 MiB qcow2 there, DIR the folder) and
    /// asserts equal answers.</summary>
    private void AssertSameAnswer(string command, Action<string>? prepare = null)
    {
        var answers = new List<(int, string)>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string dir = P(tool);
            Directory.CreateDirectory(dir);
            Tools.QemuImg("create", "-q", "-f", "qcow2", Path.Combine(dir, "img.qcow2"), "1M").Ok();
            prepare?.Invoke(dir);
            string[] args = command.Split(' ').Select(a => a.Replace("IMG", Path.Combine(dir, "img.qcow2")).Replace("DIR", dir)).ToArray();
            answers.Add(Both(tool, args, dir));
        }
        Assert.Equal(answers[0], answers[1]);
    }

    [Theory]
    [InlineData("create -f foo -f qcow2 DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -o backing_file=IMG, -o help DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -o backing_file=IMG -o ,help DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -o backing_file=IMG -o ,, -o help DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -o cluster_size=0x10000 DIR/n.qcow2 1M")]
    [InlineData("create -f bochs -o help")]
    [InlineData("create -f file DIR/n.raw 1M")]
    [InlineData("create -f qcow2 file:DIR/a:b.qcow2 1M")]
    [InlineData("create -f qcow2 -b DIR/missing -F qcow2 DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -b DIR/missing DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -u -b DIR/missing DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -b IMG -F bogus DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -u -b IMG -F bogus DIR/n.qcow2 1M")]
    [InlineData("create -f qcow2 -u -b IMG -F vmdk DIR/n.qcow2 1M")]
    [InlineData("convert -O foo -O qcow2 IMG DIR/n.qcow2")]
    [InlineData("convert -C -S 4k -O qcow2 IMG DIR/n.qcow2")]
    [InlineData("convert -C -c -O qcow2 IMG DIR/n.qcow2")]
    [InlineData("convert -C --salvage -O qcow2 IMG DIR/n.qcow2")]
    [InlineData("amend -f foo -f qcow2 -o lazy_refcounts=on IMG")]
    [InlineData("amend -o size=2M -U IMG")]
    [InlineData("amend -o help")]
    [InlineData("rebase -u -b DIR/x -F bogus IMG")]
    [InlineData("rebase -u -b DIR/x -F host_device IMG")]
    [InlineData("info -f bogus IMG")]
    [InlineData("bench -w -c 8 --flush-interval=2 IMG")]
    [InlineData("bench --flush-interval=64 IMG")]
    [InlineData("bench -c 0 IMG")]
    [InlineData("bench -c 1k IMG")]
    [InlineData("bench -c 1 -s x IMG")]
    [InlineData("bench -c 1 --pattern=300 IMG")]
    [InlineData("bench -U -w -c 1 IMG")]
    [InlineData("resize -f qcow2 --preallocation=full IMG 512k")]
    [InlineData("resize -f qcow2 --preallocation=bogus IMG 2M")]
    [InlineData("info -U --image-opts driver=null-co,force-share=off")]
    [InlineData("info -U --image-opts driver=null-co,force-share=on")]
    public void AnswersAsQemuImg(string command) => AssertSameAnswer(command);

    [Fact]
    public void BenchPrintsQemuImgsLinesAndWritesThePattern()
    {
        string img = P("b.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
        var r = Tools.StrataCmd("img", "bench", "-w", "-c", "32", "-d", "4", "-s", "8k", "-S", "16k", "-o", "4096", "--pattern=165", img).Ok();
        var lines = r.Stdout.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Equal("Sending 32 write requests, 8192 bytes each, 4 in parallel (starting at offset 4096, step size 16384)", lines[0]);
        Assert.Matches(@"^Run completed in \d+\.\d{3} seconds\.$", lines[1]);
        Tools.AssertQemuCheckClean(img);
        // 32 requests of 8 KiB every 16 KiB from 4 KiB wrap nothing in 1 MiB: 0xa5 there, zeros between.
        var io = Tools.QemuIo(img, ["read -P 165 4096 8k", "read -P 0 12288 8k", "read -P 165 512000 8k"], "qcow2");
        Assert.DoesNotContain("Pattern verification failed", io.Stdout);
    }

    /// <summary>Growing an overlay over a longer backing file with each preallocation mode: the grown range reads zeros
    /// and the map (allocation, zero flags, host offsets) is qemu-img's own.</summary>
    [Theory]
    [InlineData("metadata")]
    [InlineData("falloc")]
    [InlineData("full")]
    [InlineData("off")]
    public void ResizeWithPreallocationMapsAsQemuImg(string mode)
    {
        var maps = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string b = P($"{tool}-base.qcow2"), top = P($"{tool}-top.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", b, "10M").Ok();
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", top, "5M").Ok();
            Tools.QemuIo(b, ["write -P 1 9M 64k"], "qcow2").Ok();
            var args = new[] { "resize", "-f", "qcow2", "--preallocation", mode, top, "15M" };
            (tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args])).Ok();
            Tools.AssertQemuCheckClean(top);
            Assert.DoesNotContain("Pattern verification failed", Tools.QemuIo(top, ["read -P 0 9M 64k"], "qcow2").Stdout);
            maps.Add(Tools.QemuImg("map", "--output=json", top).Ok().Stdout);
        }
        Assert.Equal(maps[0], maps[1]);
    }

    /// <summary>Created with extended L2 entries, a backing file and falloc/full preallocation, the image still reads
    /// its backing file (the preallocated subclusters stay unallocated, as in QEMU) — and grows to zeros.</summary>
    [Theory]
    [InlineData("falloc")]
    [InlineData("full")]
    public void PreallocatedExtendedL2OverlayReadsItsBackingFile(string mode)
    {
        var maps = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string b = P($"{tool}-base.raw"), top = P($"{tool}-top.qcow2");
            Tools.QemuImg("create", "-q", "-f", "raw", b, "1M").Ok();
            Tools.QemuIo(b, ["write -P 0x5a 0 1M"], "raw").Ok();
            var create = new[] { "create", "-q", "-f", "qcow2", "-o", $"extended_l2=on,preallocation={mode}", "-b", b, "-F", "raw", top, "512k" };
            (tool == "qemu" ? Tools.QemuImg(create) : Tools.StrataCmd(["img", .. create])).Ok();
            var resize = new[] { "resize", "-f", "qcow2", "--preallocation", mode, top, "1M" };
            (tool == "qemu" ? Tools.QemuImg(resize) : Tools.StrataCmd(["img", .. resize])).Ok();
            Assert.DoesNotContain("Pattern verification failed", Tools.QemuIo(top, ["read -P 0x5a 0 512k", "read -P 0 512k 512k"], "qcow2").Stdout);
            Tools.AssertQemuCheckClean(top);
            // Where the grown clusters land in the file is the allocator's choice; what reads from where is not.
            maps.Add(System.Text.RegularExpressions.Regex.Replace(Tools.QemuImg("map", "--output=json", top).Ok().Stdout, @"""offset"": \d+", "\"offset\": N"));
        }
        Assert.Equal(maps[0], maps[1]);
    }

    /// <summary>A shrink gives the freed clusters' disk blocks back (holes) and ends the file after the last cluster in
    /// use, as qemu-img does; a metadata-preallocated image's holes show as zeros in map.</summary>
    [Fact]
    public void ShrinkGivesSpaceBackAsQemuImg()
    {
        var results = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = P($"{tool}.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=1M,preallocation=metadata", img, "300M").Ok();
            Tools.QemuIo(img, ["discard 0 10M", "discard 290M 10M", "write 290M 10M", "write 0 10M"], "qcow2").Ok();
            string map = (tool == "qemu" ? Tools.QemuImg("map", img) : Tools.StrataCmd("img", "map", img)).Ok().Stdout.Replace(img, "IMG");
            long before = DiskUsage(img);
            var args = new[] { "resize", "--shrink", img, "5M" };
            (tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args])).Ok();
            Tools.AssertQemuCheckClean(img);
            results.Add($"{map}\nfreed {before - DiskUsage(img)}\nlength {new FileInfo(img).Length}");
        }
        Assert.Equal(results[0], results[1]);
    }

    /// <summary>A shrink drops refcount blocks that count nothing any more from the refcount table, as QEMU's does
    /// (iotest 163 reads every block the table names and wants none empty); the data and the check stay clean.</summary>
    [Fact]
    public void ShrinkLeavesNoEmptyRefcountBlockNamed()
    {
        string img = P("rb.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=512,refcount_bits=64", img, "3M").Ok();
        Tools.QemuIo(img, ["write -P 7 0 256k", "write -P 7 1M 256k", "write -P 7 2M 256k", "write -P 7 2560k 256k"], "qcow2").Ok();
        Tools.StrataCmd("img", "resize", "--shrink", img, "1M").Ok();
        Tools.AssertQemuCheckClean(img);
        Assert.DoesNotContain("Pattern verification failed", Tools.QemuIo(img, ["read -P 7 0 256k"], "qcow2").Stdout);
        var bytes = File.ReadAllBytes(img);
        long tableOffset = (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(48));
        int tableClusters = (int)System.Buffers.Binary.BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(56));
        for (int i = 0; i < tableClusters * 512 / 8; i++)
        {
            long block = (long)System.Buffers.Binary.BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan((int)tableOffset + i * 8));
            if (block != 0) Assert.True(bytes.AsSpan((int)block, 512).IndexOfAnyExcept((byte)0) >= 0, $"refcount block {i} at 0x{block:x} is empty");
        }
    }

    /// <summary>Bitmap tables and the directory are written without padding, so the file ends where qemu-img's does.</summary>
    [Fact]
    public void BitmapMetadataLeavesTheFileAsLongAsQemuImgDoes()
    {
        var lengths = new List<long>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = P($"{tool}.qcow2");
            Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", img, "64G").Ok();
            foreach (var args in new[] { new[] { "bitmap", "--add", "-g", "512", img, "b1" }, ["bitmap", "--add", img, "b2"] })
                (tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args])).Ok();
            Tools.AssertQemuCheckClean(img);
            lengths.Add(new FileInfo(img).Length);
        }
        Assert.Equal(lengths[0], lengths[1]);
    }

    /// <summary>x-dirty-bitmap: map through an NBD client reads a bitmap context as if it were allocation (set bits
    /// are "not present"), the same from strata as from qemu-img.</summary>
    [Fact]
    public void MapThroughXDirtyBitmapMatchesQemuImg()
    {
        string img = P("d.qcow2"), sock = P("nbd.sock");
        Tools.QemuImg("create", "-q", "-f", "qcow2", img, "4M").Ok();
        Tools.QemuImg("bitmap", "--add", "-g", "64k", img, "b0").Ok();
        Tools.QemuIo(img, ["write 1M 128k", "write 3M 64k"], "qcow2").Ok();
        using var nbd = Process.Start(new ProcessStartInfo("qemu-nbd", ["-r", "-t", "-f", "qcow2", "-B", "b0", "-k", sock, img])
            { RedirectStandardError = true })!;
        try
        {
            Listening.WaitFor(sock, 10000);
            string opts = $"driver=nbd,server.type=unix,server.path={sock},x-dirty-bitmap=qemu:dirty-bitmap:b0";
            var qemu = Tools.QemuImg("map", "--output=json", "--image-opts", opts).Ok().Stdout;
            var strata = Tools.StrataCmd("img", "map", "--output=json", "--image-opts", opts).Ok().Stdout;
            Assert.Equal(qemu, strata);
            Assert.Contains("\"present\": false", strata);
        }
        finally
        {
            nbd.Kill();
            nbd.WaitForExit();
        }
    }

    private static long DiskUsage(string path)
    {
        var r = Tools.Run("du", "--block-size=1", path).Ok();
        return long.Parse(r.Stdout.Split('\t')[0], System.Globalization.CultureInfo.InvariantCulture);
    }
}
