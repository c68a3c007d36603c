using System.Security.Cryptography;
using Strata.Backup;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Backup;
using Strata.Tests.Block;

namespace Strata.Tests.Backup;

/// <summary>
/// Manifest formats 2 and 3: the file's digest is the SHA-256 of its 64 KiB blocks' SHA-256s, and (format 3) so is a
/// data piece's, of its own slices; a piece that is blocks of the file takes its digest and its granules' from those
/// blocks' hashes instead of being read again. Each is checked against the definition computed here the plain way;
/// verify reads formats 1 and 2 as before.
/// </summary>
public class FileDigestTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    /// <summary>The definition, the slow way: every 64 KiB slice of the bytes hashed, the hashes hashed.</summary>
    private static string Expected(byte[] content)
    {
        using var outer = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        for (int pos = 0; pos < content.Length; pos += 65536)
            outer.AppendData(SHA256.HashData(content.AsSpan(pos, Math.Min(65536, content.Length - pos))));
        return Convert.ToHexStringLower(outer.GetHashAndReset());
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(65536)]
    [InlineData(65537)]
    [InlineData(16 * 65536 + 100)]
    // Past the first window of 1024 blocks, ending inside a run of 16.
    [InlineData(1024 * 65536 + 17 * 65536 + 5)]
    public void AFilesDigestIsTheSha256OfItsBlocksSha256s(int length)
    {
        var content = new byte[length];
        new Random(length).NextBytes(content);
        string path = _dir["f"];
        File.WriteAllBytes(path, content);
        Assert.Equal(Expected(content), ImageDigest.FileBlockDigest(path));
        using var handle = File.OpenHandle(path);
        var (digest, kept) = ImageDigest.FileBlockDigest(handle, keepBlocks: 1030);
        Assert.Equal(Expected(content), digest);
        // The first 1 030 whole blocks (past the first window of 1 024); a last block cut short is never kept.
        Assert.Equal(Math.Min(1030, length / 65536) * 32, kept.Length);
        for (int b = 0; b * 32 < kept.Length; b++)
            Assert.Equal(SHA256.HashData(content.AsSpan(b * 65536, 65536)), kept.AsSpan(b * 32, 32).ToArray());
    }

    /// <summary>A qcow2 of 8 MiB over <paramref name="backing"/>, holding the given writes.</summary>
    private string Image(string name, string? backing, params (long Offset, int Length, byte Fill)[] writes)
    {
        string path = _dir[name];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 8 << 20, BackingFile = backing, BackingFormat = backing is null ? null : "qcow2" }).Dispose();
        using var image = ImageOpener.Open(path, "qcow2", readOnly: false);
        foreach (var (offset, length, fill) in writes)
        {
            if (fill == 0) image.WriteZeroes(offset, length, mayUnmap: false);
            else image.Write(offset, Enumerable.Repeat(fill, length).ToArray());
        }
        return path;
    }

    private static BackupManifest Blank(string file, bool inc) => new()
    {
        Id = "p", Disk = "vda", Time = DateTimeOffset.UnixEpoch, Level = inc ? "inc" : "full", File = file, Mode = "push", Source = "test",
        Node = "vda", Bitmap = "b", VirtualSize = 8 << 20, CopiedBytes = 0, FileSize = 0, Extents = [],
    };

    [Fact]
    public void APiecesDigestFromItsBlocksIsTheDigestOfItsBytes()
    {
        string full = Image("full.qcow2", null, (0, 4 << 20, 0x11));
        // One-cluster pieces (taken from their blocks), written out of order so that their host clusters are not in
        // guest order; a multi-cluster piece and a zero range (read and hashed as before).
        string inc = Image("inc.qcow2", "full.qcow2", (5L << 20, 65536, 0x21), (1L << 20, 65536, 0x22), (3L << 20, 65536, 0x23),
            (6L << 20, 3 * 65536, 0x24), (2L << 20, 65536, 0));
        var parent = new GranuleDigestBuilder(8 << 20, 65536, null);
        using (var f = ImageOpener.OpenSingle(full, "qcow2", readOnly: true)) ImageDigest.TopLayer(f, parent);
        var parentDigests = parent.Finish();

        var fromBlocks = new GranuleDigestBuilder(8 << 20, 65536, parentDigests);
        var described = ImageDigest.Describe(Blank("inc.qcow2", inc: true), inc, fromBlocks);
        var byReading = new GranuleDigestBuilder(8 << 20, 65536, parentDigests);
        List<ExtentDigest> read;
        using (var i = ImageOpener.OpenSingle(inc, "qcow2", readOnly: true)) read = ImageDigest.TopLayer(i, byReading);

        Assert.Equal(3, described.Format);
        Assert.Null(described.FileSha256);
        Assert.Equal(Expected(File.ReadAllBytes(inc)), described.FileDigest);
        Assert.Equal(read, described.Extents);
        Assert.Contains(described.Extents, e => e is { Offset: 5L << 20, Length: 65536, Kind: ExtentDigest.Data }
            && e.Sha256 == Expected(Enumerable.Repeat((byte)0x21, 65536).ToArray()));
        Assert.Contains(described.Extents, e => e is { Offset: 6L << 20, Length: 3 * 65536, Kind: ExtentDigest.Data }
            && e.Sha256 == Expected(Enumerable.Repeat((byte)0x24, 3 * 65536).ToArray()));
        Assert.Empty(fromBlocks.Finish().Differences(byReading.Finish()));
    }

    /// <summary>A full of random data (no two clusters alike) in pieces of several blocks, four MiB and shorter, and
    /// a last cluster cut short by the disk's end: the granules take their digests from the blocks' hashes, the
    /// pieces are hashed after the walk on every core, and both agree with the plain reading of the layer.</summary>
    [Fact]
    public void AFullsMultiBlockPiecesAgreeWithReadingTheLayer()
    {
        const long size = (10L << 20) + 4096 + 512;
        string path = _dir["full.qcow2"];
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size }).Dispose();
        var random = new Random(19);
        using (var image = ImageOpener.Open(path, "qcow2", readOnly: false))
        {
            // Out of guest order, so that host clusters and guest clusters do not line up throughout.
            foreach (var (offset, length) in new[] { (6L << 20, 1 << 20), (0L, 5 << 20), (8L << 20, (2 << 20) + 4096 + 512), (5L << 20, 65536) })
            {
                var bytes = new byte[length];
                random.NextBytes(bytes);
                image.Write(offset, bytes);
            }
            image.WriteZeroes(7L << 20, 3 * 65536, mayUnmap: false);
        }
        var fromBlocks = new GranuleDigestBuilder(size, 65536, null);
        var described = ImageDigest.Describe(Blank("full.qcow2", inc: false) with { VirtualSize = size }, path, fromBlocks);
        var byReading = new GranuleDigestBuilder(size, 65536, null);
        List<ExtentDigest> read;
        using (var f = ImageOpener.OpenSingle(path, "qcow2", readOnly: true)) read = ImageDigest.TopLayer(f, byReading);

        Assert.Equal(read, described.Extents);
        Assert.Contains(described.Extents, e => e is { Kind: ExtentDigest.Data, Length: 4 << 20 });
        using (var f = ImageOpener.OpenSingle(path, "qcow2", readOnly: true))
            foreach (var e in described.Extents.Where(e => e.Kind == ExtentDigest.Data))
            {
                var bytes = new byte[e.Length];
                f.Read(e.Offset, bytes);
                Assert.Equal(Expected(bytes), e.Sha256);
            }
        Assert.Equal(Expected(File.ReadAllBytes(path)), described.FileDigest);
        var granules = fromBlocks.Finish();
        Assert.Empty(granules.Differences(byReading.Finish()));
        // And both as the disk's bytes hash plainly, granule by granule.
        using (var f = ImageOpener.OpenSingle(path, "qcow2", readOnly: true))
            Assert.Empty(granules.Differences(ImageDigest.ChainGranules(f, 65536)));
    }

    [Fact]
    public void VerifyChecksFormats2And3ByTheFilesBlocksAndAFormat1FileByItsSha256()
    {
        var repo = Repository.Init(_dir["repo"]);
        Directory.CreateDirectory(repo.DiskDir("vda"));
        foreach (var (id, format) in new[] { ("new", 3), ("mid", 2), ("old", 1) })
        {
            string path = Path.Combine(repo.DiskDir("vda"), id + ".qcow2");
            File.Copy(Image(id + "-src.qcow2", null, (0, 65536, 0x31), (2L << 20, 2 * 65536, 0x32)), path);
            var m = ImageDigest.Describe(Blank(id + ".qcow2", inc: false) with { Id = id, Disk = "vda", Time = DateTimeOffset.UnixEpoch.AddHours(format) }, path);
            if (format < 3)
            {
                // As an earlier version wrote it: each piece's SHA-256 of its bytes and, in format 1, the whole file's.
                using (var image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true))
                    m = m with { Format = format, Extents = ImageDigest.TopLayer(image, format: format) };
                Assert.Contains(m.Extents, e => e is { Offset: 2L << 20, Kind: ExtentDigest.Data }
                    && e.Sha256 == Convert.ToHexStringLower(SHA256.HashData(Enumerable.Repeat((byte)0x32, 2 * 65536).ToArray())));
                if (format == 1) m = m with { FileDigest = null, FileSha256 = ImageDigest.FileSha256(path) };
            }
            repo.WriteManifest(m);
        }
        Assert.Empty(Verifier.Verify(repo));
        foreach (string id in new[] { "new", "mid", "old" })
        {
            // One byte of the second data cluster flipped (the file's clusters: header, L1, refcount table and block,
            // L2, then data).
            string path = Path.Combine(repo.DiskDir("vda"), id + ".qcow2");
            using (var image = ImageOpener.OpenSingle(path, "qcow2", readOnly: true))
            {
                long host = image.GetLayerStatus(2L << 20, 65536).HostOffset;
                Assert.True(host > 0);
                using var f = new FileStream(path, FileMode.Open, FileAccess.ReadWrite);
                f.Position = host + 100;
                f.WriteByte(0x99);
            }
        }
        var problems = Verifier.Verify(repo).GroupBy(p => p.Id!).ToDictionary(g => g.Key, g => g.Select(p => p.What).ToList());
        Assert.Equal("new.qcow2 does not match its digest (changed or damaged since it was written)", problems["new"][0]);
        Assert.Equal("mid.qcow2 does not match its digest (changed or damaged since it was written)", problems["mid"][0]);
        Assert.Equal("old.qcow2 does not match its SHA-256 (changed or damaged since it was written)", problems["old"][0]);
        Assert.All(problems.Values, p => Assert.Contains(p, w => w.StartsWith($"range {2L << 20}+131072 (data) differs from the manifest")));
    }

    [Fact]
    public void VerifyLeavesAManifestOfANewerFormatAloneAndSaysSo()
    {
        var repo = Repository.Init(_dir["repo"]);
        Directory.CreateDirectory(repo.DiskDir("vda"));
        string path = Path.Combine(repo.DiskDir("vda"), "p.qcow2");
        File.Copy(Image("p-src.qcow2", null, (0, 65536, 0x41)), path);
        repo.WriteManifest(ImageDigest.Describe(Blank("p.qcow2", inc: false), path) with { Format = ImageDigest.ManifestFormat + 1 });
        var problem = Assert.Single(Verifier.Verify(repo));
        Assert.Contains($"format {ImageDigest.ManifestFormat + 1}, newer than this strata reads", problem.What);
    }
}
