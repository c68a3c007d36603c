using System.Text.Json;

namespace Strata.Interop.Tests.Infra;

/// <summary>Parsed `map --output=json` extents, as comparable strings.</summary>
public static class Maps
{
    public static List<string> Normalize(JsonElement map, bool withOffsets)
    {
        var list = new List<string>();
        foreach (var e in map.EnumerateArray())
        {
            string s = $"start={e.GetProperty("start").GetInt64()} length={e.GetProperty("length").GetInt64()} depth={e.GetProperty("depth").GetInt32()} " +
                       $"present={e.GetProperty("present").GetBoolean()} zero={e.GetProperty("zero").GetBoolean()} data={e.GetProperty("data").GetBoolean()}";
            if (withOffsets) s += e.TryGetProperty("offset", out var o) ? $" offset={o.GetInt64()}" : " offset=-";
            list.Add(s);
        }
        return list;
    }

    /// <summary>Extents (without host offsets) with adjacent equal-attribute extents merged: layout-independent.</summary>
    public static List<string> Merged(JsonElement map)
    {
        var list = new List<(long Start, long Length, string Attrs)>();
        foreach (var e in map.EnumerateArray())
        {
            long start = e.GetProperty("start").GetInt64(), len = e.GetProperty("length").GetInt64();
            string attrs = $"depth={e.GetProperty("depth").GetInt32()} present={e.GetProperty("present").GetBoolean()} zero={e.GetProperty("zero").GetBoolean()} data={e.GetProperty("data").GetBoolean()}";
            if (list.Count > 0 && list[^1].Attrs == attrs && list[^1].Start + list[^1].Length == start)
                list[^1] = (list[^1].Start, list[^1].Length + len, attrs);
            else
                list.Add((start, len, attrs));
        }
        return list.Select(x => $"start={x.Start} length={x.Length} {x.Attrs}").ToList();
    }

    /// <summary>Compares two maps extent by extent; "offset" compared only where both have it, and presence must agree.</summary>
    public static void AssertEqual(JsonElement expected, JsonElement actual, string context)
    {
        var e = Normalize(expected, false);
        var a = Normalize(actual, false);
        Assert.True(e.SequenceEqual(a), $"{context}: map extents differ\nexpected (qemu-img):\n  {string.Join("\n  ", Normalize(expected, true))}\nactual (strata):\n  {string.Join("\n  ", Normalize(actual, true))}");
        var ea = expected.EnumerateArray().ToList();
        var aa = actual.EnumerateArray().ToList();
        for (int i = 0; i < ea.Count; i++)
        {
            bool eh = ea[i].TryGetProperty("offset", out var eo);
            bool ah = aa[i].TryGetProperty("offset", out var ao);
            Assert.True(eh == ah, $"{context}: extent {i} ({e[i]}): qemu-img has offset: {eh}, strata has offset: {ah}");
            if (eh && ah) Assert.True(eo.GetInt64() == ao.GetInt64(), $"{context}: extent {i} ({e[i]}): offset qemu-img={eo.GetInt64()} strata={ao.GetInt64()}");
        }
    }
}

/// <summary>Backing chains built by QEMU.</summary>
public static class Chains
{
    /// <summary>c0 (base) &lt;- c1 &lt;- c2 (top), relative backing names, data in each layer and some overlap.</summary>
    public static void BuildQemuChain(TempDir t)
    {
        Workloads.QemuQcow2(t["c0.qcow2"], "64M", ["write -P 0x10 0 4M", "write -P 0x11 32M 1M"]);
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", "c0.qcow2", "-F", "qcow2", t["c1.qcow2"]).Ok();
        Tools.QemuIo(t["c1.qcow2"], ["write -P 0x20 1M 1M", "write -z 32M 64k", "write -P 0x21 40M 128k"], "qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", "-b", "c1.qcow2", "-F", "qcow2", t["c2.qcow2"]).Ok();
        Tools.QemuIo(t["c2.qcow2"], ["write -P 0x30 1536k 64k", "write -P 0x31 40M 4k", "write -P 0x32 60M 64k"], "qcow2");
    }
}
