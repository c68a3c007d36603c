using Strata.Interop.Tests.Infra;
using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>qcow2 images with an external data file, against qemu-img and qemu-io 7.2: images either tool creates
/// and writes read the same in the other (check, compare, map), a raw data file stays byte-identical to the disk
/// through every kind of change, and bad images are refused with qemu-img's messages. Data file names are
/// absolute here: the installed QEMU resolves a relative one from its current directory.</summary>
public class DataFileTests : ScratchDirTest
{
    /// <summary>Writes, zero writes (unmapping or not, whole and partial clusters) and discards, in qemu-io syntax.</summary>
    internal static readonly string[] Changes =
    [
        "write -P 0x11 0 1M",
        "write -P 0x22 1100k 3k",
        "write -z 0 64k",
        "write -z 64k 4k",
        "discard 128k 64k",
        "write -z -u 192k 64k",
        "write -P 0x33 200k 1k",
        "discard 300k 10k",
        "write -P 0x44 2M 128k",
        "write -z -u 2M 64k",
    ];

    private string CreateWithQemu(string name, bool raw, string size = "4M")
    {
        string img = P(name + ".qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-o", $"data_file={P(name + ".raw")},data_file_raw={(raw ? "on" : "off")}", img, size).Ok();
        return img;
    }

    private string CreateWithStrata(string name, bool raw, string size = "4M", string extra = "")
    {
        string img = P(name + ".qcow2");
        Tools.StrataCmd("img", "create", "-q", "-f", "qcow2", "-o", $"data_file={P(name + ".raw")},data_file_raw={(raw ? "on" : "off")}{extra}", img, size).Ok();
        return img;
    }

    private static string Strip(string stderr, string img) =>
        stderr.Replace(img, "IMG").Replace("qemu-img:", "").Replace("strata img:", "").Trim();

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void QemuWrittenImagesReadTheSameInStrata(bool raw)
    {
        string img = CreateWithQemu("q", raw);
        Tools.QemuIo(img, Changes);

        Assert.Equal(Tools.QemuImg("map", "--output=json", img).Ok().Stdout, Tools.StrataCmd("img", "map", "--output=json", img).Ok().Stdout);
        var check = Tools.StrataCmd("img", "check", img).Ok();
        Assert.Equal(Tools.QemuImg("check", img).Stdout, check.Stdout);
        Tools.QemuImg("convert", "-O", "raw", img, P("qemu-view.raw")).Ok();
        Tools.StrataCmd("img", "convert", "-O", "raw", img, P("strata-view.raw")).Ok();
        Assert.Equal(Tools.Sha256(P("qemu-view.raw")), Tools.Sha256(P("strata-view.raw")));
        Assert.Contains("Images are identical.", Tools.StrataCmd("img", "compare", "-F", "raw", img, P("qemu-view.raw")).Ok().Stdout);
    }

    [Theory]
    [InlineData(false, "off")]
    [InlineData(false, "metadata")]
    [InlineData(true, "off")]
    [InlineData(true, "full")]
    public void StrataWrittenImagesReadTheSameInQemu(bool raw, string preallocation)
    {
        string img = CreateWithStrata("s", raw, extra: $",preallocation={preallocation}");
        string reference = CreateWithQemu("q", raw);
        Tools.StrataIo(img, Changes);
        Tools.QemuIo(reference, Changes);

        Tools.AssertQemuCheckClean(img);
        Tools.AssertQemuIdentical(reference, img);
        Assert.Equal(Tools.QemuImg("map", "--output=json", img).Ok().Stdout, Tools.StrataCmd("img", "map", "--output=json", img).Ok().Stdout);
        if (preallocation == "off")
            Assert.Equal(Tools.QemuImg("map", "--output=json", reference).Ok().Stdout, Tools.QemuImg("map", "--output=json", img).Ok().Stdout);
    }

    [Theory]
    [InlineData(false, "off")]
    [InlineData(true, "off")]
    [InlineData(false, "metadata")]
    [InlineData(true, "falloc")]
    public void CreateLaysOutTheImageAndDataFileAsQemuImgDoes(bool raw, string preallocation)
    {
        string opts = $"data_file_raw={(raw ? "on" : "off")},preallocation={preallocation}";
        var q = Tools.QemuImg("create", "-f", "qcow2", "-o", $"data_file={P("q.raw")},{opts}", P("q.qcow2"), "3M").Ok();
        var s = Tools.StrataCmd("img", "create", "-f", "qcow2", "-o", $"data_file={P("s.raw")},{opts}", P("s.qcow2"), "3M").Ok();
        Assert.Equal(q.Stdout.Replace(P("q."), "X."), s.Stdout.Replace(P("s."), "X."));
        Assert.Equal(new FileInfo(P("q.qcow2")).Length, new FileInfo(P("s.qcow2")).Length);
        Assert.Equal(new FileInfo(P("q.raw")).Length, new FileInfo(P("s.raw")).Length);
        Assert.Equal(Tools.QemuImg("map", "--output=json", P("q.qcow2")).Ok().Stdout, Tools.QemuImg("map", "--output=json", P("s.qcow2")).Ok().Stdout);
        var qi = Tools.QemuImg("info", P("q.qcow2")).Ok().Stdout;
        var si = Tools.StrataCmd("img", "info", P("s.qcow2")).Ok().Stdout;
        Assert.Equal(Normalize(qi, "q"), Normalize(si, "s"));
        Tools.AssertQemuCheckClean(P("s.qcow2"));
    }

    /// <summary>The info text, without the lines that depend on the host (disk size) and with the file names made equal.</summary>
    private string Normalize(string info, string name) =>
        string.Join('\n', info.Replace(P(name + "."), "X.").Split('\n').Where(l => !l.StartsWith("disk size:")));

    /// <summary>Regression: the raw data file must equal the virtual disk after every change, including zero writes
    /// and discards (whose new L2 entries no longer point at the bytes in the data file).</summary>
    [Fact]
    public void ARawDataFileStaysByteIdenticalToTheDisk()
    {
        string img = CreateWithStrata("s", raw: true);
        foreach (var change in Changes)
        {
            Tools.StrataIo(img, [change]);
            Tools.StrataCmd("img", "convert", "-O", "raw", img, P("view.raw")).Ok();
            Assert.True(Tools.Sha256(P("view.raw")) == Tools.Sha256(P("s.raw")), $"raw data file differs from the disk after '{change}'");
        }
        Tools.AssertQemuCheckClean(img);
        Tools.AssertQemuIdentical(P("s.raw"), img, "-f", "raw", "-F", "qcow2");
        Assert.Contains("data file raw: true", Tools.QemuImg("info", img).Ok().Stdout);
    }

    [Fact]
    public void GrowingAndShrinkingResizeTheDataFileAsQemuDoes()
    {
        foreach (var tool in new[] { "q", "s" })
        {
            string img = CreateWithQemu(tool, raw: true, size: "1M");
            var r = tool == "q" ? Tools.QemuImg("resize", img, "2M") : Tools.StrataCmd("img", "resize", img, "2M");
            r.Ok();
        }
        Assert.Equal(new FileInfo(P("q.raw")).Length, new FileInfo(P("s.raw")).Length);
        Assert.Equal(Tools.QemuImg("map", "--output=json", P("q.qcow2")).Ok().Stdout, Tools.QemuImg("map", "--output=json", P("s.qcow2")).Ok().Stdout);
        Tools.QemuImg("resize", "--shrink", P("q.qcow2"), "512k").Ok();
        Tools.StrataCmd("img", "resize", "--shrink", P("s.qcow2"), "512k").Ok();
        Assert.Equal(new FileInfo(P("q.raw")).Length, new FileInfo(P("s.raw")).Length);
        Tools.AssertQemuCheckClean(P("s.qcow2"));
    }

    [Theory]
    [InlineData("missing data file")]
    [InlineData("raw bit without data file")]
    [InlineData("data file bit without name")]
    [InlineData("data file shorter than the disk")]
    [InlineData("name without the feature bits")]
    public void BadDataFileHeadersAreRefusedAsQemuImgRefusesThem(string fault)
    {
        var answers = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = CreateWithQemu(tool, raw: true, size: "1M");
            Tools.QemuIo(img, ["write -P 0x61 0 1M"]).Ok();
            switch (fault)
            {
                case "missing data file":
                    File.Delete(P(tool + ".raw"));
                    break;
                case "raw bit without data file":
                    Qcow2Edit.WriteU64(img, 72, 0);
                    break;
                case "data file bit without name":
                    Qcow2Edit.WriteU64(img, 112, 0x5858585800000000 | Qcow2Edit.ReadU64(img, 112) & 0xffffffff);
                    break;
                case "data file shorter than the disk":
                    // QEMU 7.2 accepts it: what lies past the data file's end reads as zeros.
                    using (var f = File.OpenHandle(P(tool + ".raw"), FileMode.Open, FileAccess.Write))
                        RandomAccess.SetLength(f, 300 * 1024);
                    break;
                case "name without the feature bits":
                    // Neither the incompatible nor the autoclear bit: the name is ignored, the data read from the image file.
                    Qcow2Edit.WriteU64(img, 72, 0);
                    Qcow2Edit.WriteU64(img, 88, 0);
                    break;
            }
            foreach (var cmd in new[] { "check", "map", "info" })
            {
                var r = tool == "qemu" ? Tools.QemuImg(cmd, img) : Tools.StrataCmd("img", cmd, img);
                answers.Add($"{cmd}: {r.Exit} {Strip(r.Stderr, img).Replace(P(tool + ".raw"), "RAW")} {Normalize(r.Stdout, tool)}");
            }
            string view = P(tool + "-view.raw");
            var c = tool == "qemu" ? Tools.QemuImg("convert", "-O", "raw", img, view) : Tools.StrataCmd("img", "convert", "-O", "raw", img, view);
            answers.Add($"convert: {c.Exit} {Strip(c.Stderr, img).Replace(P(tool + ".raw"), "RAW")} {(c.Exit == 0 ? Tools.Sha256(view) : "")}");
        }
        Assert.Equal(answers[..4], answers[4..]);
        if (fault is "missing data file" or "raw bit without data file" or "data file bit without name")
            Assert.NotEqual(0, int.Parse(answers[4].Split(' ')[1]));
    }

    [Fact]
    public void InternalSnapshotsAndCompressionAreRefused()
    {
        string q = CreateWithQemu("q", raw: false, size: "1M");
        string s = CreateWithQemu("s", raw: false, size: "1M");
        var qr = Tools.QemuImg("snapshot", "-c", "snap", q);
        var sr = Tools.StrataCmd("img", "snapshot", "-c", "snap", s);
        Assert.Equal((qr.Exit, Strip(qr.Stderr, q)), (sr.Exit, Strip(sr.Stderr, s)));
        Assert.Equal(1, sr.Exit);
        var c = Tools.StrataCmd("img", "convert", "-c", "-O", "qcow2", "-o", $"data_file={P("c.raw")}", s, P("c.qcow2"));
        Assert.Equal(1, c.Exit);
        Assert.False(Tools.LooksLikeCrash(c.Stderr), c.ToString());
    }

    [Fact]
    public void AmendChangesTheDataFileNameAndClearsTheRawBitAsQemuImgDoes()
    {
        var answers = new List<string>();
        foreach (var tool in new[] { "q", "s" })
        {
            ToolResult Img(params string[] args) => tool == "q" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args]);
            string plain = P(tool + "-plain.qcow2");
            Img("create", "-q", "-f", "qcow2", plain, "1M").Ok();
            string img = CreateWithQemu(tool, raw: true, size: "1M");
            string opts = $"data-file.filename={P(tool + ".raw")},file.filename={img}";
            foreach (var args in new[]
                     {
                         new[] { "amend", "-o", "data_file=foo", plain },
                         ["amend", "-o", "compat=0.10", img],
                         ["amend", "-o", "data_file_raw=on", img],
                         ["amend", "-o", "data_file_raw=off", img],
                         ["amend", "-o", "data_file_raw=on", img],
                         ["amend", "-o", "data_file=renamed", img],
                         ["info", img],
                         ["check", "--image-opts", opts],
                         ["map", "--output=json", "--image-opts", opts],
                         ["amend", "-o", "data_file=", "--image-opts", opts],
                         ["info", img],
                         ["check", img],
                     })
            {
                var r = Img(args);
                answers.Add($"{string.Join(' ', args).Replace(P(tool), "X")}: {r.Exit} {Strip(r.Stderr, img).Replace(plain, "PLAIN")} {Normalize(r.Stdout, tool)}");
            }
        }
        Assert.Equal(answers[..(answers.Count / 2)], answers[(answers.Count / 2)..]);
        Assert.Contains("data file raw: false", answers[^2]);
    }
}
