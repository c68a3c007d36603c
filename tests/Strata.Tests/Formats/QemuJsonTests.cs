using Strata.Formats.Json;

namespace Strata.Tests.Formats;

public class QemuJsonTests
{
    [Fact]
    public void OrdersKeysAsQemuInfoPrintsThem()
    {
        // The order qemu-img 7.2 prints `info --output=json` for an overlay.
        var d = new QDict()
            .Add("filename", "o.qcow2").Add("format", "qcow2").Add("dirty-flag", false).Add("actual-size", 1)
            .Add("virtual-size", 2).Add("cluster-size", 65536).Add("backing-filename", "b").Add("full-backing-filename", "b")
            .Add("backing-filename-format", "qcow2").Add("format-specific", new QDict());
        Assert.Equal(
            ["backing-filename-format", "virtual-size", "filename", "cluster-size", "format", "actual-size", "format-specific", "full-backing-filename", "backing-filename", "dirty-flag"],
            d.Ordered.Select(e => e.Key).ToArray());
    }

    [Fact]
    public void OrdersCheckKeysAsQemuDoes()
    {
        var d = new QDict().Add("filename", "x").Add("format", "qcow2").Add("check-errors", 0).Add("image-end-offset", 1)
            .Add("total-clusters", 2).Add("allocated-clusters", 3).Add("fragmented-clusters", 4).Add("compressed-clusters", 5);
        Assert.Equal(
            ["image-end-offset", "compressed-clusters", "total-clusters", "check-errors", "allocated-clusters", "filename", "format", "fragmented-clusters"],
            d.Ordered.Select(e => e.Key).ToArray());
    }

    [Fact]
    public void PrettyAndCompactForms()
    {
        var d = new QDict().Add("a", 1).Add("b", new object[] { true, "x\"y" });
        string compact = QemuJson.Compact(d);
        Assert.DoesNotContain("\n", compact);
        using var doc = System.Text.Json.JsonDocument.Parse(compact);
        Assert.Equal(1, doc.RootElement.GetProperty("a").GetInt32());
        Assert.Equal("x\"y", doc.RootElement.GetProperty("b")[1].GetString());
        string pretty = QemuJson.Pretty(new QDict().Add("k", new QDict().Add("n", 5)));
        Assert.Equal("{\n    \"k\": {\n        \"n\": 5\n    }\n}", pretty);
    }
}

public class SizeTextTests
{
    [Theory]
    [InlineData(0L, "0 B")]
    [InlineData(512L, "512 B")]
    [InlineData(1024L, "1 KiB")]
    [InlineData(1536L, "1.5 KiB")]
    [InlineData(102400L, "100 KiB")]
    [InlineData(1022976L, "999 KiB")]
    [InlineData(1024000L, "0.977 MiB")]
    [InlineData(1048064L, "1 MiB")]
    [InlineData(1380352L, "1.32 MiB")]
    [InlineData(123456512L, "118 MiB")]
    [InlineData(1L << 30, "1 GiB")]
    [InlineData(3L << 60 >> 1, "1.5 EiB")]
    public void PrintsSizesAsQemuDoes(long bytes, string expected) => Assert.Equal(expected, Strata.Cli.Img.SizeText.Human(bytes));

    [Theory]
    [InlineData("64M", 64L << 20)]
    [InlineData("1.5G", 3L << 29)]
    [InlineData("1000", 1000L)]
    [InlineData("1.5k", 1536L)]
    [InlineData("2E", 2L << 60)]
    [InlineData("0x10000", 65536L)]
    public void ParsesSizes(string text, long expected)
    {
        Assert.True(Strata.Cli.Img.SizeText.TryParse(text, out long v));
        Assert.Equal(expected, v);
    }

    [Theory]
    [InlineData("64X")]
    [InlineData("abc")]
    [InlineData("100E")]
    [InlineData("0x1k")]
    [InlineData("0x")]
    [InlineData("")]
    [InlineData("0xg")]
    public void RejectsBadSizes(string text) => Assert.False(Strata.Cli.Img.SizeText.TryParse(text, out _));
}
