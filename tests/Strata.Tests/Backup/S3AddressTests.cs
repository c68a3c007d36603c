using Strata.Backup.Chunks;

namespace Strata.Tests.Backup;

/// <summary>Reading a repository argument <c>s3://BUCKET[/PREFIX]</c>.</summary>
public class S3AddressTests
{
    [Theory]
    [InlineData("s3://backups", "backups", "")]
    [InlineData("s3://backups/", "backups", "")]
    [InlineData("s3://backups/vm/prod", "backups", "vm/prod")]
    [InlineData("s3://backups/vm/prod/", "backups", "vm/prod")]
    [InlineData("S3://my.bucket-01/x", "my.bucket-01", "x")]
    public void ParsesBucketAndPrefix(string text, string bucket, string prefix)
    {
        Assert.True(S3Address.TryParse(text, out var address, out string error), error);
        Assert.Equal(new S3Address(bucket, prefix), address);
    }

    [Theory]
    [InlineData("s3://", "names no bucket")]
    [InlineData("s3:///prefix", "names no bucket")]
    [InlineData("s3://ab", "'ab' is not a valid bucket name")]
    [InlineData("s3://Backups", "'Backups' is not a valid bucket name")]
    [InlineData("s3://back_ups", "'back_ups' is not a valid bucket name")]
    [InlineData("s3://-backups", "'-backups' is not a valid bucket name")]
    [InlineData("s3://backups/a//b", "'a//b' is not a valid key prefix")]
    [InlineData("s3://backups/a/../b", "'a/../b' is not a valid key prefix")]
    [InlineData("/srv/backups", "is not an s3:// address")]
    public void RefusesMalformedAddressesSayingWhy(string text, string why)
    {
        Assert.False(S3Address.TryParse(text, out _, out string error));
        Assert.Contains(why, error);
    }

    [Fact]
    public void PrintsBackAsWritten()
    {
        Assert.Equal("s3://backups/vm/prod", new S3Address("backups", "vm/prod").ToString());
        Assert.Equal("s3://backups", new S3Address("backups", "").ToString());
    }

    [Fact]
    public void OpenRefusesAMalformedAddressOrEndpointBeforeAnyRequest()
    {
        var e = Assert.Throws<ObjectStoreException>(() => ObjectStores.Open("s3://B"));
        Assert.StartsWith("invalid S3 address: 'B' is not a valid bucket name", e.Message);
        e = Assert.Throws<ObjectStoreException>(() => ObjectStores.Open("s3://backups", "127.0.0.1:7480"));
        Assert.Equal("invalid S3 endpoint '127.0.0.1:7480': expected http://HOST[:PORT] or https://HOST[:PORT]", e.Message);
    }
}
