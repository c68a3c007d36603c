using Strata.Backup;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Backup;
using Strata.Tests.Block;

namespace Strata.Tests.Backup;

/// <summary>Granule digests of points in a repository, offline: built at commit as a run builds them, carried through
/// prune, checked by verify, and compared with a disk by the differential copier.</summary>
public class PointDigestsTests : IDisposable
{
    private const int G = 65536;
    private const long Size = 8 << 20;
    private readonly TempDir _dir = new();
    private readonly Repository _repo;
    private static readonly DateTimeOffset T0 = new(2026, 11, 1, 12, 0, 0, TimeSpan.Zero);

    public PointDigestsTests() => _repo = Repository.Init(_dir["repo"]);

    public void Dispose() => _dir.Dispose();

    private string PointPath(string id) => Path.Combine(_repo.DiskDir("vda"), id + ".qcow2");

    /// <summary>A committed point of "vda" holding <paramref name="writes"/> (offset, byte; 0 writes zeros) in 64 KiB
    /// runs, its digests built from its layer over its parent's, as <see cref="BackupRunner"/> commits one.</summary>
    private BackupManifest Point(string id, BackupManifest? parent, int hours, params (long Offset, byte Fill)[] writes)
    {
        Directory.CreateDirectory(_repo.DiskDir("vda"));
        string path = PointPath(id);
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = Size, BackingFile = parent?.File, BackingFormat = parent is null ? null : "qcow2" }).Dispose();
        using (var image = ImageOpener.Open(path, "qcow2", readOnly: false))
            foreach (var (offset, fill) in writes)
            {
                if (fill == 0) image.WriteZeroes(offset, G, mayUnmap: false);
                else image.Write(offset, Enumerable.Repeat(fill, G).ToArray());
            }
        var parentDigests = parent is null ? null : _repo.ReadDigests(parent).Digests;
        // Over a parent without digests the layer is not enough: hashed from the chain, as a differential would.
        var builder = parent is not null && parentDigests is null ? null : new GranuleDigestBuilder(Size, G, parentDigests);
        var m = ImageDigest.Describe(new BackupManifest
        {
            Id = id, Disk = "vda", Time = T0.AddHours(hours), Level = parent is null ? "full" : "inc", Parent = parent?.Id, File = id + ".qcow2",
            Mode = "push", Source = "test", Node = "vda", Bitmap = "b-" + id, VirtualSize = Size,
            CopiedBytes = 0, FileSize = 0, FileSha256 = "", Extents = [],
        }, path, builder);
        GranuleDigests digests;
        if (builder is not null) digests = ImageDigest.FinishGranules(builder, path);
        else
            using (var chain = ImageOpener.Open(path, "qcow2", readOnly: true)) digests = ImageDigest.ChainGranules(chain, G);
        return _repo.CommitPoint(m, digests);
    }

    private sealed class Silent : IBackupProgress
    {
        public void Message(string text) { }
        public void Start(string disk, long total) { }
        public void Advance(string disk, long done) { }
        public void Finish(string disk) { }
    }

    [Fact]
    public void ACommitThatCannotMakeTheFileDurableLeavesNoPointAndPutsTheFileBackUnderItsPartialName()
    {
        Directory.CreateDirectory(_repo.DiskDir("vda"));
        string partial = PointPath("p0") + Repository.PartialSuffix;
        Qcow2Image.Create(partial, new Qcow2CreateOptions { Size = Size }).Dispose();
        var held = File.OpenHandle(partial, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
        held.Dispose();   // the descriptor the fsync goes through is gone: the fsync fails
        var facts = new PointFacts("p0", "vda", T0, Incremental: false, Parent: null, "p0.qcow2", "push", "test", "vda", "b-p0", Size, Note: null);
        Assert.ThrowsAny<Exception>(() => PointCommit.Commit(_repo, new Silent(), facts, partial, PointPath("p0"), null, null, syncThrough: held));
        Assert.True(File.Exists(partial));
        Assert.False(File.Exists(PointPath("p0")));
        Assert.Empty(_repo.Points("vda"));
        Assert.Contains(partial, _repo.CleanLeftovers().Select(f => Path.Combine(_repo.DiskDir("vda"), Path.GetFileName(f))));
    }

    [Fact]
    public void ACommitThroughAHeldDescriptorMakesAPoint()
    {
        Directory.CreateDirectory(_repo.DiskDir("vda"));
        string partial = PointPath("p0") + Repository.PartialSuffix;
        Qcow2Image.Create(partial, new Qcow2CreateOptions { Size = Size }).Dispose();
        using var held = File.OpenHandle(partial, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite | FileShare.Delete);
        using (var image = ImageOpener.Open(partial, "qcow2", readOnly: false)) image.Write(0, Enumerable.Repeat((byte)7, G).ToArray());
        var facts = new PointFacts("p0", "vda", T0, Incremental: false, Parent: null, "p0.qcow2", "push", "test", "vda", "b-p0", Size, Note: null);
        var m = PointCommit.Commit(_repo, new Silent(), facts, partial, PointPath("p0"), null, null, syncThrough: held);
        Assert.Equal("p0", _repo.Points("vda").Single().Id);
        Assert.Equal(G, m.CopiedBytes);
        Assert.Empty(Verifier.Verify(_repo));
    }

    /// <summary>The point's digests hashed from scratch, reading its whole chain.</summary>
    private GranuleDigests FromChain(BackupManifest p)
    {
        using var chain = ImageOpener.Open(_repo.FilePath(p), "qcow2", readOnly: true);
        return ImageDigest.ChainGranules(chain, G);
    }

    private BackupManifest[] Chain() =>
    [
        Point("p0", null, 0, (0, 1), (G, 2), (2 << 20, 3)),
        Point("p1", _repo.Find("vda", "latest"), 1, (G, 0), (3 << 20, 4)),
        Point("p2", _repo.Find("vda", "latest"), 2, (0, 5), (7 << 20, 6)),
    ];

    [Fact]
    public void EveryPointsDigestsAreThoseOfTheDiskAsThePointReads()
    {
        foreach (var p in Chain())
        {
            var (stored, problem) = _repo.ReadDigests(p);
            Assert.Null(problem);
            Assert.Empty(stored!.Differences(FromChain(p)));
            Assert.Equal(40 + (Size / G) * 16, new FileInfo(Path.Combine(_repo.DiskDir("vda"), p.Id + ".digests")).Length);
        }
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void VerifyReportsADamagedDigestsFile()
    {
        var points = Chain();
        string file = Path.Combine(_repo.DiskDir("vda"), "p1.digests");
        var bytes = File.ReadAllBytes(file);
        bytes[^1] ^= 0x40;
        File.WriteAllBytes(file, bytes);
        var problem = Assert.Single(Verifier.Verify(_repo));
        Assert.Equal("p1", problem.Id);
        Assert.Contains("p1.digests does not match its SHA-256", problem.What);
        Assert.Null(_repo.ReadDigests(points[1]).Digests);
    }

    [Fact]
    public void VerifyReportsDigestsThatDisagreeWithTheData()
    {
        // A digests file that matches its manifest but not the point's data (written wrong, not damaged after).
        var points = Chain();
        var wrong = _repo.ReadDigests(points[2]).Digests!.Clone();
        wrong.Set(3 * 16, new byte[16]);
        _repo.CommitPoint(points[2], wrong);
        var problem = Assert.Single(Verifier.Verify(_repo));
        Assert.Equal("p2", problem.Id);
        Assert.Equal($"its digests file p2.digests disagrees with the point's data in 1 granule(s), the first at offset {3 * 16 * G}", problem.What);
    }

    [Fact]
    public void VerifyChecksAPointOverAParentWithoutDigests()
    {
        // A chain begun before digests were recorded: the old point has none, the new one's (as a differential by
        // read-back records them) are checked all the same.
        var p0 = Point("p0", null, 0, (0, 1), (G, 2));
        File.Delete(Path.Combine(_repo.DiskDir("vda"), "p0.digests"));
        _repo.WriteManifest(p0 = p0 with { Digests = null });
        var p1 = Point("p1", p0, 1, (0, 9));
        Assert.Empty(_repo.ReadDigests(p1).Digests!.Differences(FromChain(p1)));
        Assert.Empty(Verifier.Verify(_repo));
        var wrong = _repo.ReadDigests(p1).Digests!.Clone();
        wrong.Set(1, new byte[16]);
        _repo.CommitPoint(p1, wrong);
        Assert.Contains("disagrees with the point's data in 1 granule(s), the first at offset 65536", Assert.Single(Verifier.Verify(_repo)).What);
    }

    [Fact]
    public void PruneDeletesTheRemovedPointsDigestsAndKeepsTheSuccessorsValid()
    {
        var points = Chain();
        var before = FromChain(points[1]);
        Pruner.Prune(_repo, new RetentionPolicy(2, 0, 0, 0));
        Assert.Equal(["p1.digests", "p1.json", "p1.qcow2", "p2.digests", "p2.json", "p2.qcow2"],
            Directory.EnumerateFiles(_repo.DiskDir("vda")).Select(Path.GetFileName).Order(StringComparer.Ordinal));
        var p1 = _repo.Find("vda", "p1");
        Assert.Equal("full", p1.Level);
        Assert.Empty(_repo.ReadDigests(p1).Digests!.Differences(before));
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void DigestsFilesNoManifestNamesAreLeftovers()
    {
        Chain();
        File.WriteAllBytes(Path.Combine(_repo.DiskDir("vda"), "p3.digests"), GranuleDigestsFile.Serialize(new GranuleDigests(Size, G)));
        File.WriteAllBytes(Path.Combine(_repo.DiskDir("vda"), "p3.digests.tmp"), [1]);
        Assert.Equal([Path.Combine("vda", "p3.digests"), Path.Combine("vda", "p3.digests.tmp")], _repo.CleanLeftovers().Order(StringComparer.Ordinal));
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void TheDifferentialCopierWritesOnlyWhatDiffersFromTheDigestsAndNeverOpensTheLastPoint()
    {
        var p0 = Point("p0", null, 0, (0, 1), (G, 2), (2 << 20, 3));
        // The disk since: one granule rewritten, one zeroed, one written where there was a hole.
        string diskPath = _dir["disk.qcow2"];
        File.Copy(PointPath("p0"), diskPath);
        using (var disk = ImageOpener.Open(diskPath, "qcow2", readOnly: false))
        {
            disk.Write(G, Enumerable.Repeat((byte)7, G).ToArray());
            disk.WriteZeroes(2 << 20, G, mayUnmap: false);
            disk.Write(5 << 20, Enumerable.Repeat((byte)8, G).ToArray());
        }
        // The last point made unreadable as a qcow2: a copier that opened it would fail.
        File.Move(PointPath("p0"), _dir["p0.aside"]);
        File.WriteAllBytes(PointPath("p0"), []);
        string target = PointPath("p1");
        Qcow2Image.Create(target, new Qcow2CreateOptions { Size = Size, BackingFile = "p0.qcow2", BackingFormat = "qcow2" }).Dispose();
        (long Copied, GranuleDigests Digests) result;
        using (var disk = ImageOpener.Open(diskPath, "qcow2", readOnly: true))
        using (var t = ImageOpener.Open(target, "qcow2", readOnly: false, openBacking: false))
            result = new DifferentialCopier(disk).CopyDifferences(t, _repo.ReadDigests(p0).Digests!, (_, _) => { });
        Assert.Equal(2 * G, result.Copied);
        File.Move(_dir["p0.aside"], PointPath("p0"), overwrite: true);

        using var restored = ImageOpener.Open(target, "qcow2", readOnly: true);
        using var now = ImageOpener.Open(diskPath, "qcow2", readOnly: true);
        Assert.Equal(Read(now), Read(restored));
        Assert.Empty(result.Digests.Differences(ImageDigest.ChainGranules(now, G)));
        using var layer = ImageOpener.OpenSingle(target, "qcow2", readOnly: true);
        Assert.Equal(
            [new ExtentDigest(G, G, ExtentDigest.Data, null), new ExtentDigest(2 << 20, G, ExtentDigest.Zero, null), new ExtentDigest(5 << 20, G, ExtentDigest.Data, null)],
            ImageDigest.TopLayer(layer).Select(e => e with { Sha256 = null }));

        // Read back the old way, the same granules differ and the same digests come out.
        string target2 = _dir["p1b.qcow2"];
        File.Copy(PointPath("p0"), _dir["p0.qcow2"]);
        Qcow2Image.Create(target2, new Qcow2CreateOptions { Size = Size, BackingFile = "p0.qcow2", BackingFormat = "qcow2" }).Dispose();
        using var last = ImageOpener.Open(PointPath("p0"), "qcow2", readOnly: true);
        using (var t2 = ImageOpener.Open(target2, "qcow2", readOnly: false))
        {
            var readBack = new DifferentialCopier(now).CopyDifferences(t2, last, G, (_, _) => { });
            Assert.Equal(2 * G, readBack.Copied);
            Assert.Empty(readBack.Digests.Differences(result.Digests));
            Assert.Equal(Read(now), Read(t2));
        }
    }

    private static byte[] Read(BlockImage image)
    {
        var data = new byte[image.Size];
        image.Read(0, data);
        return data;
    }
}
