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
