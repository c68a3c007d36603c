using Tools = Strata.Interop.Tests.Infra.Tools;
using Strata.Block;
using Strata.Cli;

namespace Strata.Interop.Tests;

/// <summary>Persistent dirty bitmaps: what Strata stores QEMU reads bit for bit, and the reverse.</summary>
public class BitmapInteropTests : ScratchDirTest
{
    private static int Strata(params string[] args)
    {
        var o = new StringWriter();
        var e = new StringWriter();
        int rc = StrataCli.Run(args, o, e);
        Assert.True(rc == 0, $"strata {string.Join(' ', args)} → {rc}: {o}{e}");
        return rc;
    }

    private static string StrataHash(string image, string bitmap)
    {
        using var img = ImageOpener.Open(image, "qcow2", readOnly: true, openBacking: false);
        return img.Bitmaps.Get(bitmap).Bits.Sha256();
    }

    [Fact]
    public void BitmapsStrataStoresAreReadIdenticallyByQemu()
    {
        string img = P("s.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").Exit);
        Strata("img", "bitmap", "--add", img, "b0");
        Strata("img", "bitmap", "--add", "-g", "4k", "--disable", img, "b1");
        Strata("img", "bitmap", "--add", "-g", "1M", img, "b2");
        Strata("io", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 4k", "-c", "write -z 63M 1M", "-c", "write -P 3 100k 1", img);
        Strata("img", "bitmap", "--merge", "b0", img, "b1");

        var check = Tools.Run("qemu-img", "check", img);
        Assert.True(check.Exit == 0, check.Stdout + check.Stderr);
        var info = System.Text.Json.Nodes.JsonNode.Parse(Tools.Run("qemu-img", "info", "--output=json", img).Stdout)!;
        var bitmaps = info["format-specific"]!["data"]!["bitmaps"]!.AsArray();
        Assert.Equal(["b0:65536:auto", "b1:4096:", "b2:1048576:auto"],
            bitmaps.Select(b => $"{b!["name"]}:{b["granularity"]}:{string.Join(',', b["flags"]!.AsArray().Select(f => f!.GetValue<string>()))}").Order().ToArray());

        var expected = new[] { "b0", "b1", "b2" }.ToDictionary(n => n, n => StrataHash(img, n));
        using var qsd = new QsdProcess(img);
        foreach (var (name, hash) in expected) Assert.Equal(hash, qsd.Sha256("disk0", name));
        var counts = qsd.Bitmaps("disk0").ToDictionary(b => b!["name"]!.GetValue<string>(), b => b!["count"]!.GetValue<long>());
        // b0 at 64 KiB: [0,64k) and byte 100k → 2 bits, 1M → 1 bit, 63M..64M → 16 bits. b1 was disabled (no writes)
        // and then took b0's bits by the merge, as 4 KiB bits covering the same bytes.
        Assert.Equal(19 * 65536, counts["b0"]);
        Assert.Equal(19 * 65536, counts["b1"]);
    }

    [Fact]
    public void BitmapsQemuFilledLoadWithTheSameBitsInStrata()
    {
        string img = P("q.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", img, "a").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", "-g", "512", img, "fine").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 9 0 1M", "-c", "write -P 8 5M 512", "-c", "write -P 7 60M 3M", img).Exit);
        string ha, hf;
        long countA;
        using (var qsd = new QsdProcess(img, readOnly: true))
        {
            ha = qsd.Sha256("disk0", "a");
            hf = qsd.Sha256("disk0", "fine");
            countA = qsd.Bitmaps("disk0").First(b => b!["name"]!.GetValue<string>() == "a")!["count"]!.GetValue<long>();
            qsd.Quit();
        }
        using var mine = ImageOpener.Open(img, "qcow2", readOnly: true, openBacking: false);
        Assert.Equal(ha, mine.Bitmaps.Get("a").Bits.Sha256());
        Assert.Equal(hf, mine.Bitmaps.Get("fine").Bits.Sha256());
        Assert.Equal(countA, mine.Bitmaps.Get("a").CountBytes);
        Assert.Equal(512, mine.Bitmaps.Get("fine").Granularity);
    }

    [Fact]
    public void BitmapsLeftInUseByAKilledQemuLoadAsInconsistent()
    {
        string img = P("k.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", img, "b0").Exit);
        using (var qsd = new QsdProcess(img))
        {
            qsd.Execute("block-dirty-bitmap-add", new Dictionary<string, object> { ["node"] = "disk0", ["name"] = "b1", ["persistent"] = true });
            qsd.Kill();
        }
        using (var mine = ImageOpener.Open(img, "qcow2", readOnly: true, openBacking: false))
        {
            var b0 = mine.Bitmaps.Get("b0");
            Assert.True(b0.Inconsistent);
            Assert.Equal(0, b0.CountBytes);
            Assert.False(b0.Recording);
            Assert.Null(mine.Bitmaps.Find("b1")); // never stored: simply gone, as in QEMU
        }
        // Only remove works on it; the image stays clean for qemu-img.
        var e = new StringWriter();
        Assert.Equal(1, StrataCli.Run(["img", "bitmap", "--clear", img, "b0"], new StringWriter(), e));
        Assert.Contains("inconsistent", e.ToString());
        Strata("img", "bitmap", "--remove", img, "b0");
        var check = Tools.Run("qemu-img", "check", img);
        Assert.True(check.Exit == 0, check.Stdout + check.Stderr);
        Assert.DoesNotContain("bitmaps:", Tools.Run("qemu-img", "info", img).Stdout);
    }

    public static TheoryData<string[]> Operations => new()
    {
        { ["--add", "x"] },
        { ["--add", "-g", "8k", "--disable", "x"] },
        { ["--clear", "b0"] },
        { ["--disable", "b0"] },
        { ["--enable", "b1"] },
        { ["--remove", "b1"] },
        { ["--merge", "b1", "b0"] },
        { ["--add", "--merge", "b0", "y"] },
    };

    [Theory]
    [MemberData(nameof(Operations))]
    public void EveryBitmapOperationGivesWhatQemuImgGives(string[] op)
    {
        string baseImg = P("base.qcow2");
        Assert.Equal(0, Tools.Run("qemu-img", "create", "-q", "-f", "qcow2", baseImg, "64M").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", baseImg, "b0").Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--add", "-g", "16k", "--disable", baseImg, "b1").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 1 0 100k", "-c", "write -P 2 9M 1M", baseImg).Exit);
        Assert.Equal(0, Tools.Run("qemu-img", "bitmap", "--enable", baseImg, "b1").Exit);
        Assert.Equal(0, Tools.Run("qemu-io", "-c", "write -P 3 30M 64k", baseImg).Exit);
        string q = P("q.qcow2"), s = P("s.qcow2");
        File.Copy(baseImg, q);
        File.Copy(baseImg, s);
        string name = op[^1];
        var qemuArgs = new List<string> { "bitmap" };
        qemuArgs.AddRange(op[..^1]);
        qemuArgs.Add(q);
        qemuArgs.Add(name);
        var qr = Tools.Run("qemu-img", [.. qemuArgs]);
        Assert.True(qr.Exit == 0, qr.Stderr);
        Strata(["img", "bitmap", .. op[..^1], s, name]);

        string Describe(string image)
        {
            var info = System.Text.Json.Nodes.JsonNode.Parse(Tools.Run("qemu-img", "info", "--output=json", image).Stdout)!;
            var list = info["format-specific"]!["data"]!["bitmaps"]?.AsArray();
            if (list is null) return "";
            return string.Join(";", list.Select(b => $"{b!["name"]}:{b["granularity"]}:{string.Join(',', b["flags"]!.AsArray().Select(f => f!.GetValue<string>()))}:{StrataHash(image, b["name"]!.GetValue<string>())}").Order());
        }
        Assert.Equal(Describe(q), Describe(s));
        Assert.Equal(0, Tools.Run("qemu-img", "check", s).Exit);
        // And QEMU itself agrees on the bits Strata stored.
        using var qsd = new QsdProcess(s, readOnly: true);
        foreach (var b in qsd.Bitmaps("disk0"))
            Assert.Equal(StrataHash(q, b!["name"]!.GetValue<string>()), qsd.Sha256("disk0", b["name"]!.GetValue<string>()));
    }
}
