namespace Strata.Interop.Tests.Infra;

/// <summary>What the backup manager's tests check of a repository.</summary>
public static class RepositoryAsserts
{
    /// <summary>`strata backup restore` of DISK@ID reads back byte for byte as <paramref name="copy"/>, the disk as
    /// it was at that point (restored beside the copy, then removed).</summary>
    public static void AssertRestores(string repo, string disk, string id, string copy)
    {
        string to = Path.Combine(Path.GetDirectoryName(copy)!, $"restored-{disk}-{id}.raw");
        Tools.StrataCmd("backup", "restore", "--at", id, "--disk", disk, "--to", to, repo).Ok();
        Assert.True(File.ReadAllBytes(to).AsSpan().SequenceEqual(File.ReadAllBytes(copy)), $"{disk}@{id} does not restore to the disk as it was");
        File.Delete(to);
    }
}
