using Strata.Block;

namespace Strata.Tests.Block;

public class BlockSpecTests
{
    private static Dictionary<string, string?> Flat(BlockOptions o) => o.Values.ToDictionary(kv => kv.Key, kv => kv.Value);

    [Fact]
    public void JsonNestedAndDottedKeysFlattenAlike()
    {
        var nested = BlockSpec.FromFilename("json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'a b.qcow2'}}");
        var dotted = BlockSpec.FromFilename("json:{\"driver\":\"qcow2\",\"file.driver\":\"file\",\"file.filename\":\"a b.qcow2\"}");
        var expected = new Dictionary<string, string?> { ["driver"] = "qcow2", ["file.driver"] = "file", ["file.filename"] = "a b.qcow2" };
        Assert.Equal(expected, Flat(nested));
        Assert.Equal(expected, Flat(dotted));
    }

    [Fact]
    public void JsonListsBooleansNumbersAndNull()
    {
        var o = BlockSpec.FromJson("{ 'inject-error': [{ 'event': 'write_aio', 'errno': 28, 'once': true }], 'backing': null, 'x': false, 'n': -1.5 }");
        Assert.Equal("write_aio", o["inject-error.0.event"]);
        Assert.Equal("28", o["inject-error.0.errno"]);
        Assert.Equal("on", o["inject-error.0.once"]);
        Assert.Equal("off", o["x"]);
        Assert.Equal("-1.5", o["n"]);
        Assert.True(o.Contains("backing"));
        Assert.Null(o["backing"]);
    }

    [Fact]
    public void JsonStringEscapes()
    {
        var o = BlockSpec.FromJson("{\"f\": \"a\\\"b\\\\c\\u0041\", 'g': 'it\\'s'}");
        Assert.Equal("a\"b\\cA", o["f"]);
        Assert.Equal("it's", o["g"]);
    }

    [Theory]
    [InlineData("json:{", "Could not parse the JSON options: JSON parse error, premature EOI")]
    [InlineData("json:{x}", "Could not parse the JSON options: JSON parse error, invalid keyword 'x'")]
    [InlineData("json:{\"a\":}", "Could not parse the JSON options: JSON parse error, expecting value")]
    [InlineData("json:{\"a\" 1}", "Could not parse the JSON options: JSON parse error, missing : in object pair")]
    [InlineData("json:", "Could not parse the JSON options: Expecting a JSON value")]
    [InlineData("json:[1]", "Invalid JSON object given")]
    [InlineData("foo:bar", "Unknown protocol 'foo'")]
    [InlineData("null-co://x", "The only allowed filename for this driver is 'null-co://'")]
    [InlineData("blkdebug:", "blkdebug requires both config file and image path")]
    [InlineData("nbd://", "No valid URL specified")]
    [InlineData("nbd+unix:///e", "No valid URL specified")]
    public void BadNamesGiveQemusReasons(string name, string message)
    {
        var e = Assert.ThrowsAny<BlockException>(() => BlockSpec.FromFilename(name));
        Assert.Equal(message, e.Message);
    }

    [Fact]
    public void PlainPathsAndFilePrefix()
    {
        Assert.False(BlockSpec.IsSpecial("dir/x:y/a.qcow2"));
        Assert.False(BlockSpec.IsSpecial("/tmp/a:b"));
        Assert.Equal("a:b", BlockSpec.FromFilename("file:a:b")["filename"]);
        Assert.Equal("file", BlockSpec.FromFilename("/tmp/a:b")["driver"]);
    }

    [Fact]
    public void BlkdebugKeepsTheInnerNameWhole()
    {
        var o = BlockSpec.FromFilename("blkdebug:/c.conf:json:{\"filename\":\"x\"}");
        Assert.Equal("blkdebug", o["driver"]);
        Assert.Equal("/c.conf", o["config"]);
        Assert.Equal("json:{\"filename\":\"x\"}", o["x-image"]);
        Assert.False(BlockSpec.FromFilename("blkdebug::x").Contains("config"));
    }

    [Theory]
    [InlineData("nbd://localhost:10810/exp", "inet", "localhost", "10810", "exp")]
    [InlineData("nbd://example", "inet", "example", "10809", null)]
    [InlineData("nbd+unix:///disk?socket=/tmp/s.sock", "unix", "/tmp/s.sock", null, "disk")]
    [InlineData("nbd:unix:/tmp/s.sock", "unix", "/tmp/s.sock", null, null)]
    [InlineData("nbd:unix:/tmp/s.sock:exportname=e", "unix", "/tmp/s.sock", null, "e")]
    [InlineData("nbd:host:1234", "inet", "host", "1234", null)]
    public void NbdNames(string name, string type, string where, string? port, string? export)
    {
        var o = BlockSpec.FromFilename(name);
        Assert.Equal("nbd", o["driver"]);
        Assert.Equal(type, o["server.type"]);
        Assert.Equal(where, o[type == "unix" ? "server.path" : "server.host"]);
        Assert.Equal(port, o["server.port"]);
        Assert.Equal(export, o["export"]);
    }

    [Fact]
    public void KeyValueStringsWithEscapedCommas()
    {
        var o = BlockSpec.FromKeyValues("driver=qcow2,file.filename=a,,b.qcow2,file.locking=off");
        Assert.Equal(new Dictionary<string, string?> { ["driver"] = "qcow2", ["file.filename"] = "a,b.qcow2", ["file.locking"] = "off" }, Flat(o));
        Assert.Equal("secret", BlockSpec.FromKeyValues("secret,id=s0", impliedKey: "qom-type")["qom-type"]);
        Assert.Throws<BlockSpecException>(() => BlockSpec.FromKeyValues("driver=qcow2,oops"));
    }

    [Fact]
    public void BlkdebugConfigFileAndInlineRules()
    {
        var sections = Blkdebug.ParseConfig("# comment\n[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nonce =\"off\"\n\n[set-state]\nstate = \"1\"\nevent = \"write_aio\"\nnew_state = \"2\"\n");
        Assert.Equal(["inject-error", "set-state"], sections.Select(s => s.Name));
        Assert.Equal("off", sections[0].Keys["once"]);
        Assert.Equal("2", sections[1].Keys["new_state"]);
        Assert.Throws<BlockSpecException>(() => Blkdebug.ParseConfig("[inject-error]\nevent = read_aio\n"));

        // An error on reads only once the state machine moved to 2 (first write): reads before it pass.
        var faults = Blkdebug.FromOptions("[set-state]\nstate = \"1\"\nevent = \"write_aio\"\nnew_state = \"2\"\n",
            BlockSpec.FromJson("{'inject-error': [{'event': 'read_aio', 'errno': 28, 'state': 2}]}"));
        faults.Event("read_aio", 0, 512);
        faults.Event("write_aio", 0, 512);
        var e = Assert.Throws<BlockIOException>(() => faults.Event("read_aio", 0, 512));
        Assert.Equal(28, e.Errno);
    }
}
