using System.Security.Cryptography;
using System.Text.Json;
using Strata.Formats.Backup;

namespace Strata.Interop.Tests.Infra;

/// <summary>What the backup manager's tests check of a repository.</summary>
public static class RepositoryAsserts
{
    /// <summary>`strata backup restore` of DISK@ID reads back byte for byte as <paramref name="copy"/>, the disk as
    /// it was at that point (restored beside the copy, then removed), and the point's granule digests are those of
    /// the copy.</summary>
    public static void AssertRestores(string repo, string disk, string id, string copy)
    {
        string to = Path.Combine(Path.GetDirectoryName(copy)!, $"restored-{disk}-{id}.raw");
        Tools.StrataCmd("backup", "restore", "--at", id, "--disk", disk, "--to", to, repo).Ok();
        Assert.True(File.ReadAllBytes(to).AsSpan().SequenceEqual(File.ReadAllBytes(copy)), $"{disk}@{id} does not restore to the disk as it was");
        File.Delete(to);
        AssertDigests(repo, disk, id, copy);
    }

    /// <summary>The manifest of DISK@ID names a digests file whose SHA-256 it records, and that file holds the
    /// SHA-256 (cut to 16 bytes) of every 64 KiB granule of <paramref name="copy"/>, hashed here.</summary>
    public static void AssertDigests(string repo, string disk, string id, string copy)
    {
        using var manifest = JsonDocument.Parse(File.ReadAllBytes(Path.Combine(repo, disk, id + ".json")));
        Assert.True(manifest.RootElement.TryGetProperty("digests", out var reference), $"{disk}@{id} records no digests");
        byte[] file = File.ReadAllBytes(Path.Combine(repo, disk, reference.GetProperty("file").GetString()!));
        Assert.Equal(reference.GetProperty("sha256").GetString(), Convert.ToHexStringLower(SHA256.HashData(file)));
        var digests = GranuleDigestsFile.Parse(file);
        byte[] data = File.ReadAllBytes(copy);
        Assert.Equal(data.Length, digests.DiskSize);
        Assert.Equal(65536, digests.Granularity);
        Assert.Equal(65536, reference.GetProperty("granularity").GetInt64());
        for (int i = 0; i < digests.Count; i++)
        {
            var granule = data.AsSpan(i * 65536, (int)Math.Min(65536, data.Length - i * 65536L));
            Assert.True(SHA256.HashData(granule).AsSpan(0, 16).SequenceEqual(digests[i]), $"{disk}@{id}: the digest of granule {i} is not that of the disk");
        }
    }
}
