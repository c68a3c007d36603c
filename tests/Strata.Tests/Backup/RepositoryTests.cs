using Strata.Backup;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Tests.Block;

namespace Strata.Tests.Backup;

/// <summary>The repository, manifests and prune's merge, offline: chains built here with the qcow2 driver.</summary>
public class RepositoryTests : IDisposable
{
    private readonly TempDir _dir = new();
    private readonly Repository _repo;
    private static readonly DateTimeOffset T0 = new(2026, 11, 1, 12, 0, 0, TimeSpan.Zero);

    public RepositoryTests() => _repo = Repository.Init(_dir["repo"]);

    public void Dispose() => _dir.Dispose();

    /// <summary>A committed point of disk "vda" whose file holds <paramref name="writes"/> (offset, byte) in 64 KiB runs.</summary>
    private BackupManifest Point(string id, BackupManifest? parent, int hours, params (long Offset, byte Fill)[] writes)
    {
        Directory.CreateDirectory(_repo.DiskDir("vda"));
        string path = Path.Combine(_repo.DiskDir("vda"), id + ".qcow2");
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = 8 << 20, BackingFile = parent?.File, BackingFormat = parent is null ? null : "qcow2" }).Dispose();
        using (var image = ImageOpener.Open(path, "qcow2", readOnly: false))
            foreach (var (offset, fill) in writes)
            {
                if (fill == 0) image.WriteZeroes(offset, 65536, mayUnmap: false);
                else image.Write(offset, Enumerable.Repeat(fill, 65536).ToArray());
            }
        var m = ImageDigest.Describe(new BackupManifest
        {
            Id = id, Disk = "vda", Time = T0.AddHours(hours), Level = parent is null ? "full" : "inc", Parent = parent?.Id, File = id + ".qcow2",
            Mode = "push", Source = "test", Node = "vda", Bitmap = "b-" + id, VirtualSize = 8 << 20,
            CopiedBytes = 0, FileSize = 0, FileSha256 = "", Extents = [],
        }, path);
        _repo.WriteManifest(m);
        return m;
    }

    private byte[] Read(BackupManifest point)
    {
        using var image = ImageOpener.Open(_repo.FilePath(point), "qcow2", readOnly: true);
        var data = new byte[image.Size];
        image.Read(0, data);
        return data;
    }

    [Fact]
    public void ManifestsRecordTheFilesOwnDataAndZeroRanges()
    {
        var full = Point("p0", null, 0, (0, 0x11), (65536, 0x12));
        var inc = Point("p1", full, 1, (65536, 0), (1 << 20, 0x13));
        Assert.Equal([new ExtentDigest(0, 131072, ExtentDigest.Data, full.Extents[0].Sha256)], full.Extents);
        Assert.Equal(2, inc.Extents.Count);
        Assert.Equal(new ExtentDigest(65536, 65536, ExtentDigest.Zero, null), inc.Extents[0]);
        Assert.Equal(65536, inc.CopiedBytes);
        var back = BackupManifest.Parse(File.ReadAllBytes(Path.Combine(_repo.DiskDir("vda"), "p1.json")));
        Assert.Equal(inc.Extents, back.Extents);
        Assert.Equal(inc with { Extents = back.Extents }, back);
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void AManifestReadBackIsWrittenAgainByteForByte()
    {
        var full = Point("p0", null, 0, (0, 0x11), (1 << 20, 0x12));
        byte[] written = File.ReadAllBytes(Path.Combine(_repo.DiskDir("vda"), "p0.json"));
        var back = BackupManifest.Parse(written);
        Assert.Equal(written, back.Serialize());
        Assert.Equal(full.Extents, back.Extents);
    }

    [Fact]
    public void AManifestReadWithItsExtentsDeferredIsTheManifestReadWhole()
    {
        var full = Point("p0", null, 0, (0, 0x11), (65536, 0), (1 << 20, 0x12));
        var inc = Point("p1", full, 1, (65536, 0x13), (3 << 20, 0));
        // A note with every character the bracket matching must step over: quotes, escapes, brackets.
        var noted = inc with { Id = "p2", Time = T0.AddHours(2), Note = "full because \"a]b[\" \\] [[ \u00e9" };
        _repo.WriteManifest(noted);
        foreach (string id in new[] { "p0", "p1", "p2" })
        {
            byte[] written = File.ReadAllBytes(Path.Combine(_repo.DiskDir("vda"), id + ".json"));
            var whole = BackupManifest.Parse(written);
            var deferred = BackupManifest.ParseDeferringExtents(written);
            Assert.IsType<DeferredExtents>(deferred.Extents);
            Assert.Equal(whole with { Extents = deferred.Extents }, deferred);
            Assert.Equal(whole.Extents, deferred.Extents);
            Assert.Equal(written, deferred.Serialize());
        }
        Assert.Equal(noted.Note, _repo.Points("vda")[2].Note);
        Assert.All(_repo.Points("vda"), p => Assert.IsType<DeferredExtents>(p.Extents));
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void AManifestWithItsMembersInAnotherOrderIsReadTheSame()
    {
        var full = Point("p0", null, 0, (0, 0x11), (2 << 20, 0x12));
        var node = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllBytes(Path.Combine(_repo.DiskDir("vda"), "p0.json")))!.AsObject();
        // The extents first, then a member after them that the header must still get.
        var extents = node["extents"]!.DeepClone();
        node.Remove("extents");
        string note = "after ] the extents";
        var reordered = new System.Text.Json.Nodes.JsonObject { ["extents"] = extents };
        foreach (var (k, v) in node) reordered[k] = v?.DeepClone();
        reordered["note"] = note;
        byte[] json = System.Text.Encoding.UTF8.GetBytes(reordered.ToJsonString());
        var deferred = BackupManifest.ParseDeferringExtents(json);
        Assert.IsType<DeferredExtents>(deferred.Extents);
        Assert.Equal(full with { Note = note, Extents = deferred.Extents }, deferred);
        Assert.Equal(full.Extents, deferred.Extents);
    }

    [Fact]
    public void AManifestWithADamagedExtentListIsStillListedAndVerifyNamesTheDamage()
    {
        var full = Point("p0", null, 0, (0, 0x11));
        var inc = Point("p1", full, 1, (65536, 0x13));
        string path = Path.Combine(_repo.DiskDir("vda"), "p1.json");
        string text = File.ReadAllText(path);
        Assert.Contains("\"kind\": \"data\"", text);
        // Still balanced brackets, no longer JSON inside them.
        File.WriteAllText(path, text.Replace("\"kind\": \"data\"", "\"kind\": data"));
        var points = _repo.Points("vda");
        Assert.Equal(["p0", "p1"], points.Select(p => p.Id));
        Assert.Equal(inc.Bitmap, points[1].Bitmap);
        var e = Assert.Throws<UnreadableExtentsException>(() => points[1].Extents.Count);
        Assert.Contains("vda@p1", e.Message);
        var problem = Assert.Single(Verifier.Verify(_repo));
        Assert.Equal("p1", problem.Id);
        Assert.StartsWith("its manifest's extent list is unreadable: ", problem.What);
    }

    [Fact]
    public void AManifestCutShortIsUnreadableAsBefore()
    {
        Point("p0", null, 0, (0, 0x11));
        string path = Path.Combine(_repo.DiskDir("vda"), "p0.json");
        byte[] written = File.ReadAllBytes(path);
        File.WriteAllBytes(path, written[..(written.Length / 2)]);
        var e = Assert.Throws<BackupException>(() => _repo.Points("vda"));
        Assert.Contains("is unreadable", e.Message);
    }

    [Theory]
    [InlineData("[]", 0, 2)]
    [InlineData("x [1, [2], 3] y", 2, 13)]
    [InlineData("[\"]\", \"[\", \"\\\"]\\\\\"]", 0, 19)]
    [InlineData("[\"unterminated]", 0, -1)]
    [InlineData("[[1]", 0, -1)]
    [InlineData("[\"cut short by an escape\\", 0, -1)]
    public void ABracketIsMatchedOutsideStringsOnly(string json, int open, int end) =>
        Assert.Equal(end, BackupManifest.MatchingBracket(System.Text.Encoding.UTF8.GetBytes(json), open));

    [Fact]
    public void PointsAreFoundByIdTimeOrLatest()
    {
        var a = Point("a", null, 0, (0, 1));
        var b = Point("b", a, 5, (0, 2));
        Assert.Equal("b", _repo.Find("vda", "latest").Id);
        Assert.Equal("a", _repo.Find("vda", "a").Id);
        Assert.Equal("a", _repo.Find("vda", T0.AddHours(4).ToString("O")).Id);
        Assert.Equal("b", _repo.Find("vda", T0.AddHours(5).ToString("O")).Id);
        Assert.Equal(BackupExitCodes.Usage, Assert.Throws<BackupException>(() => _repo.Find("vda", T0.AddHours(-1).ToString("O"))).ExitCode);
        Assert.Equal(BackupExitCodes.Usage, Assert.Throws<BackupException>(() => _repo.Find("vdz", "latest")).ExitCode);
        Assert.Equal(["a", "b"], _repo.ChainOf(b).Select(p => p.Id));
    }

    [Fact]
    public void NewIdsAreUniqueWithinTheRepository()
    {
        var now = new DateTimeOffset(2026, 11, 27, 7, 0, 0, TimeSpan.Zero);
        string first = _repo.NewId(now);
        Assert.Equal("20261127T070000Z", first);
        var point = Point(first, null, 0, (0, 1));
        Assert.Equal("20261127T070000Z-2", _repo.NewId(now));
        // Taken on another disk (its manifest), or by a backup file without a manifest on a third.
        _repo.WriteManifest(point with { Id = "20261127T070000Z-2", Disk = "vdb" });
        Directory.CreateDirectory(_repo.DiskDir("vdc"));
        File.WriteAllBytes(Path.Combine(_repo.DiskDir("vdc"), "20261127T070000Z-3.qcow2"), []);
        Assert.Equal("20261127T070000Z-4", _repo.NewId(now));
    }

    [Fact]
    public void TheLockIsExclusiveAndReleasedOnDispose()
    {
        using (_repo.Lock())
            Assert.Equal(BackupExitCodes.Locked, Assert.Throws<BackupException>(() => Repository.Open(_repo.Root).Lock()).ExitCode);
        Repository.Open(_repo.Root).Lock().Dispose();
    }

    [Fact]
    public void WhileLockedThePointsAreReadOnceAndTheHoldersOwnWritesAreSeen()
    {
        var p0 = Point("p0", null, 0, (0, 1));
        string dir = _repo.DiskDir("vda");
        using (_repo.Lock())
        {
            Assert.Single(_repo.Points("vda"));
            // Nobody else writes while the lock is held: a manifest appearing behind the holder's back is not re-read…
            File.Copy(Path.Combine(dir, "p0.json"), Path.Combine(dir, "elsewhere.json"));
            Assert.Single(_repo.Points("vda"));
            File.Delete(Path.Combine(dir, "elsewhere.json"));
            // …but the holder's own commits and deletions are.
            var p1 = _repo.CommitPoint(p0 with { Id = "p1", Time = T0.AddHours(1), Parent = "p0", Level = "inc" }, digests: null);
            Assert.Equal(["p0", "p1"], _repo.Points("vda").Select(p => p.Id));
            _repo.DeletePoint(p1);
            Assert.Equal(["p0"], _repo.Points("vda").Select(p => p.Id));
        }
        // Without the lock every call reads the folder.
        File.Copy(Path.Combine(dir, "p0.json"), Path.Combine(dir, "elsewhere.json"));
        Assert.Equal(2, _repo.Points("vda").Count);
    }

    [Fact]
    public void APointsDigestsAndManifestAreCommittedTogetherWithNoTemporariesLeft()
    {
        var p0 = Point("p0", null, 0, (0, 1), (65536, 2));
        var digests = new Strata.Formats.Backup.GranuleDigests(8 << 20, 65536);
        digests.Set(1, Strata.Formats.Backup.GranuleDigests.Hash(Enumerable.Repeat((byte)2, 65536).ToArray()));
        var committed = _repo.CommitPoint(p0, digests);
        Assert.Equal("p0.digests", committed.Digests!.File);
        Assert.Equal(committed.Digests, _repo.Find("vda", "p0").Digests);
        var (read, problem) = _repo.ReadDigests(_repo.Find("vda", "p0"));
        Assert.Null(problem);
        Assert.Empty(read!.Differences(digests));
        Assert.DoesNotContain(Directory.EnumerateFiles(_repo.DiskDir("vda")), f => f.EndsWith(".tmp", StringComparison.Ordinal));
    }

    /// <summary>The manifest and digests are written while the backup file's own fsync still runs (and fsynced: not seen
    /// here), and renamed into place only once it is done: until then the point does not exist.</summary>
    [Fact]
    public async Task APointIsRenamedIntoPlaceOnlyOnceItsFileIsDurable()
    {
        var p0 = Point("p0", null, 0, (0, 1));
        var p1 = p0 with { Id = "p1", Time = T0.AddHours(1), Parent = "p0", Level = "inc" };
        var digests = new Strata.Formats.Backup.GranuleDigests(8 << 20, 65536);
        string dir = _repo.DiskDir("vda");
        var fileSync = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var commit = Task.Run(() => _repo.CommitPoint(p1, digests, fileDurable: fileSync.Task));
        var deadline = DateTime.UtcNow.AddSeconds(10);
        while (!(File.Exists(Path.Combine(dir, "p1.json.tmp")) && File.Exists(Path.Combine(dir, "p1.digests.tmp"))) && DateTime.UtcNow < deadline)
            Thread.Sleep(5);
        Assert.True(File.Exists(Path.Combine(dir, "p1.json.tmp")), "the manifest was not written beside the file's fsync");
        Thread.Sleep(100);
        Assert.False(commit.IsCompleted);
        Assert.False(File.Exists(Path.Combine(dir, "p1.json")));
        Assert.Equal(["p0"], Repository.Open(_dir["repo"]).Points("vda").Select(p => p.Id));
        fileSync.SetResult();
        Assert.Equal("p1.digests", (await commit).Digests!.File);
        Assert.Equal(["p0", "p1"], Repository.Open(_dir["repo"]).Points("vda").Select(p => p.Id));
        Assert.DoesNotContain(Directory.EnumerateFiles(dir), f => f.EndsWith(".tmp", StringComparison.Ordinal));
    }

    /// <summary>A backup file whose fsync failed never gets its manifest: the failure comes out as itself and no
    /// temporary is left behind.</summary>
    [Fact]
    public void AFailedFileFsyncCommitsNothingAndLeavesNoTemporaries()
    {
        var p0 = Point("p0", null, 0, (0, 1));
        var p1 = p0 with { Id = "p1", Time = T0.AddHours(1), Parent = "p0", Level = "inc" };
        var failed = Task.FromException(new IOException("cannot make 'p1.qcow2' durable: Input/output error"));
        var e = Assert.Throws<IOException>(() => _repo.CommitPoint(p1, new Strata.Formats.Backup.GranuleDigests(8 << 20, 65536), fileDurable: failed));
        Assert.Contains("Input/output error", e.Message);
        Assert.Equal(["p0.json", "p0.qcow2"], Directory.EnumerateFiles(_repo.DiskDir("vda")).Select(Path.GetFileName).Order());
        Assert.Equal(["p0"], _repo.Points("vda").Select(p => p.Id));
    }

    /// <summary>A run kept out by the lock names the holder's pid. The holder writes it over the last holder's in place
    /// (no truncation), and the refused run reads it past the exclusive flock that .NET's own file reading waits for.</summary>
    [Fact]
    public void ALockTakenByAnotherRunIsRefusedWithTheHoldersPid()
    {
        string lockFile = Path.Combine(_dir["repo"], "lock");
        File.WriteAllText(lockFile, "4194304999999\n");
        using (_repo.Lock())
        {
            var refused = Assert.Throws<BackupException>(() => Repository.Open(_dir["repo"]).Lock());
            Assert.Contains($"locked by another run (pid {Environment.ProcessId})", refused.Message);
            Assert.Equal(BackupExitCodes.Locked, refused.ExitCode);
        }
        Assert.Equal(Environment.ProcessId.ToString(), File.ReadAllLines(lockFile)[0].Trim());
        using (Repository.Open(_dir["repo"]).Lock()) { }
    }

    [Fact]
    public void LeftoversOfAnInterruptedRunAreRemovedAndNeverListed()
    {
        Point("p0", null, 0, (0, 1));
        File.WriteAllText(Path.Combine(_repo.DiskDir("vda"), "p1.qcow2.partial"), "x");
        File.WriteAllText(Path.Combine(_repo.DiskDir("vda"), ".fleece-p1.qcow2"), "x");
        Assert.Single(_repo.Points("vda"));
        Assert.Equal(2, _repo.CleanLeftovers().Count);
        Assert.Equal(["p0.json", "p0.qcow2"], Directory.EnumerateFiles(_repo.DiskDir("vda")).Select(Path.GetFileName).Order());
    }

    [Fact]
    public void PruneFoldsRemovedPointsForwardAndEveryKeptPointReadsTheSame()
    {
        var p0 = Point("p0", null, 0, (0, 1), (65536, 2), (2 << 20, 3));
        var p1 = Point("p1", p0, 1, (65536, 0), (3 << 20, 4));
        var p2 = Point("p2", p1, 2, (0, 5));
        var p3 = Point("p3", p2, 3, (4 << 20, 6));
        var before = new[] { p2, p3 }.ToDictionary(p => p.Id, Read);
        var removed = Pruner.Prune(_repo, new RetentionPolicy(2, 0, 0, 0));
        Assert.Equal(["p0", "p1"], removed.Select(p => p.Id));
        var left = _repo.Points("vda");
        Assert.Equal(["p2", "p3"], left.Select(p => p.Id));
        Assert.Equal("full", left[0].Level);
        Assert.Null(left[0].Parent);
        foreach (var p in left) Assert.Equal(before[p.Id], Read(p));
        using (var image = ImageOpener.OpenSingle(_repo.FilePath(left[0]), "qcow2", readOnly: true)) Assert.Null(image.BackingFileName);
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void ADamagedPruneJournalIsReportedAndTheLockIsNotLeftHeld()
    {
        File.WriteAllText(Path.Combine(_repo.Root, "prune.journal"), "[{\"id\":");
        var e = Assert.Throws<BackupException>(() => _repo.Lock());
        Assert.Contains("the journal of an interrupted prune) is damaged", e.Message);
        File.Delete(Path.Combine(_repo.Root, "prune.journal"));
        Repository.Open(_repo.Root).Lock().Dispose();
    }

    [Fact]
    public void APruneInterruptedAfterItsJournalIsFinishedByTheNextLock()
    {
        var p0 = Point("p0", null, 0, (0, 1), (65536, 2));
        var p1 = Point("p1", p0, 1, (65536, 3));
        var p2 = Point("p2", p1, 2, (131072, 4));
        var expect = Read(p2);
        // The journal is written, then the process dies before the merge touches anything.
        _repo.BeginMerge(p1, p2);
        using (_repo.Lock()) { }
        Assert.Equal(["p0", "p2"], _repo.Points("vda").Select(p => p.Id));
        Assert.Equal(expect, Read(_repo.Find("vda", "p2")));
        Assert.Empty(Verifier.Verify(_repo));
        // Running the same journal again (died after the merge, before the journal went) changes nothing.
        _repo.BeginMerge(p1, p2);
        using (_repo.Lock()) { }
        Assert.Equal(["p0", "p2"], _repo.Points("vda").Select(p => p.Id));
        Assert.Equal(expect, Read(_repo.Find("vda", "p2")));
        Assert.Empty(Verifier.Verify(_repo));
    }

    [Fact]
    public void RestoreWritesRawAndQcow2AndNeverOverwrites()
    {
        var p0 = Point("p0", null, 0, (0, 1));
        var p1 = Point("p1", p0, 1, (0, 0), (65536, 9));
        Restorer.Restore(_repo, p1, _dir["r.raw"], "raw");
        Assert.Equal(Read(p1), File.ReadAllBytes(_dir["r.raw"]));
        Restorer.Restore(_repo, p1, _dir["r.qcow2"], "qcow2");
        using (var q = ImageOpener.Open(_dir["r.qcow2"], "qcow2", readOnly: true))
        {
            var data = new byte[q.Size];
            q.Read(0, data);
            Assert.Equal(Read(p1), data);
        }
        Assert.Equal(BackupExitCodes.Usage, Assert.Throws<BackupException>(() => Restorer.Restore(_repo, p1, _dir["r.raw"], "raw")).ExitCode);
    }

    [Fact]
    public void TheMarkerFileHoldsFormatTagAndCreationAndOpensAgain()
    {
        using var marker = System.Text.Json.JsonDocument.Parse(File.ReadAllBytes(Path.Combine(_repo.Root, Repository.MarkerFile)));
        Assert.Equal(1, marker.RootElement.GetProperty("format").GetInt32());
        Assert.Equal(_repo.Tag, marker.RootElement.GetProperty("tag").GetString());
        Assert.True(DateTimeOffset.UtcNow - marker.RootElement.GetProperty("created").GetDateTimeOffset() < TimeSpan.FromHours(1));
        Assert.Equal(_repo.Tag, Repository.Open(_repo.Root).Tag);
    }

    [Theory]
    [InlineData("""{"format": 1}""")]
    [InlineData("""{"format": 1, "tag": 5}""")]
    [InlineData("not json")]
    public void AMarkerWithoutATagIsReportedDamaged(string content)
    {
        File.WriteAllText(Path.Combine(_repo.Root, Repository.MarkerFile), content);
        var e = Assert.Throws<BackupException>(() => Repository.Open(_repo.Root));
        Assert.Contains("is damaged", e.Message);
    }
}
