using System.Buffers.Binary;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Formats;

public class Qcow2HeaderTests
{
    private static Qcow2Header Sample() => new()
    {
        Version = 3, ClusterBits = 16, Size = 64 << 20, L1Size = 1, L1TableOffset = 0x30000,
        RefcountTableOffset = 0x10000, RefcountTableClusters = 1, RefcountOrder = 4, HeaderLength = 112,
    };

    [Fact]
    public void RoundTripsEveryField()
    {
        var h = Sample() with
        {
            IncompatibleFeatures = Qcow2IncompatibleFeatures.CompressionType,
            CompressionType = Qcow2CompressionType.Zstd,
            AutoclearFeatures = Qcow2AutoclearFeatures.Bitmaps,
            CompatibleFeatures = Qcow2CompatibleFeatures.LazyRefcounts,
        };
        var bytes = new byte[112];
        h.Write(bytes);
        Assert.Equal(h, Qcow2Header.Parse(bytes));
    }

    [Fact]
    public void WritesTheLayoutQemuWrites()
    {
        var bytes = new byte[112];
        Sample().Write(bytes);
        Assert.Equal(0x514649FBu, BinaryPrimitives.ReadUInt32BigEndian(bytes));
        Assert.Equal(3u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(4)));
        Assert.Equal(16u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(20)));
        Assert.Equal(64UL << 20, BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(24)));
        Assert.Equal(0x30000UL, BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(40)));
        Assert.Equal(0x10000UL, BinaryPrimitives.ReadUInt64BigEndian(bytes.AsSpan(48)));
        Assert.Equal(4u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(96)));
        Assert.Equal(112u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(100)));
    }

    [Fact]
    public void ParsesVersion2WithImpliedFields()
    {
        var bytes = new byte[72];
        (Sample() with { Version = 2, HeaderLength = 72 }).Write(bytes);
        var h = Qcow2Header.Parse(bytes);
        Assert.Equal(2u, h.Version);
        Assert.Equal(4, h.RefcountOrder);
        Assert.Equal(72u, h.HeaderLength);
    }

    [Theory]
    // QEMU's limits: an L1 table of at most 32 MiB, a refcount table of at most 8 MiB.
    [InlineData(36, 0x400001, "Active L1 table too large")]
    [InlineData(56, 0x81, "Reference count table too large")]
    [InlineData(56, 0, "Image does not contain a reference count table")]
    [InlineData(0, 0x11, "not in qcow2 format")]
    [InlineData(4, 4, "version")]
    [InlineData(20, 8, "cluster size")]
    [InlineData(20, 22, "cluster size")]
    [InlineData(96, 7, "Reference count entry width")]
    [InlineData(100, 100, "header length")]
    // A disk needing more than 2^31 L1 entries (here 1 EiB): QEMU says so before judging the L1 size.
    [InlineData(24, 0x10000000, "Image is too big")]
    public void RejectsBadFields(int offset, uint value, string expected)
    {
        var bytes = new byte[112];
        Sample().Write(bytes);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(offset), value);
        var e = Assert.Throws<ImageFormatException>(() => Qcow2Header.Parse(bytes));
        Assert.Contains(expected, e.Message, StringComparison.OrdinalIgnoreCase);
    }

    [Fact]
    public void RejectsUnknownIncompatibleBits()
    {
        var bytes = new byte[112];
        Sample().Write(bytes);
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(72), 1UL << 20);
        var header = Qcow2Header.Parse(bytes);
        var e = Assert.Throws<ImageFormatException>(() => header.ThrowIfUnsupportedFeatures([]));
        Assert.Equal("Unsupported qcow2 feature(s): Unknown incompatible feature: 100000", e.Message);
    }

    /// <summary>The image's feature name table names what it can (in the table's order), the rest stays a mask.</summary>
    [Fact]
    public void NamesUnknownIncompatibleBitsFromTheImagesFeatureTable()
    {
        var bytes = new byte[112];
        Sample().Write(bytes);
        BinaryPrimitives.WriteUInt64BigEndian(bytes.AsSpan(72), (1UL << 61) | (1UL << 62) | (1UL << 63));
        var header = Qcow2Header.Parse(bytes);
        Qcow2FeatureName[] table = [new(0, 63, "test1"), new(1, 62, "compatible, not listed"), new(0, 61, "test3")];
        var e = Assert.Throws<ImageFormatException>(() => header.ThrowIfUnsupportedFeatures(table));
        Assert.Equal("Unsupported qcow2 feature(s): test1, test3, Unknown incompatible feature: 4000000000000000", e.Message);
    }

    [Fact]
    public void AcceptsQemusLargestTables()
    {
        var bytes = new byte[112];
        (Sample() with { Size = 128UL << 30, ClusterBits = 9, L1Size = 0x400000, RefcountTableOffset = 0x200, RefcountTableClusters = 0x4000 }).Write(bytes);
        var h = Qcow2Header.Parse(bytes);
        Assert.Equal(0x400000u, h.L1Size);
        Assert.Equal(8L << 20, h.RefcountTableClusters * h.ClusterSize);
    }

    [Fact]
    public void RejectsL1TooSmallForTheDisk()
    {
        var bytes = new byte[112];
        (Sample() with { Size = 1UL << 40 }).Write(bytes);
        Assert.Throws<ImageFormatException>(() => Qcow2Header.Parse(bytes));
    }

    [Fact]
    public void RejectsTruncatedHeaders()
    {
        var bytes = new byte[112];
        Sample().Write(bytes);
        Assert.Throws<ImageFormatException>(() => Qcow2Header.Parse(bytes.AsSpan(0, 50)));
        Assert.Throws<ImageFormatException>(() => Qcow2Header.Parse(bytes.AsSpan(0, 90)));
    }

    [Fact]
    public void CompressionTypeMustMatchItsFeatureBit()
    {
        var bytes = new byte[112];
        (Sample() with { CompressionType = Qcow2CompressionType.Zstd }).Write(bytes);
        Assert.Throws<ImageFormatException>(() => Qcow2Header.Parse(bytes));
    }

    [Fact]
    public void OnDiskEnumValuesAreFrozen()
    {
        Assert.Equal(0xe2792acau, (uint)Qcow2ExtensionType.BackingFormat);
        Assert.Equal(0x6803f857u, (uint)Qcow2ExtensionType.FeatureNameTable);
        Assert.Equal(0x23852875u, (uint)Qcow2ExtensionType.Bitmaps);
        Assert.Equal(0x44415441u, (uint)Qcow2ExtensionType.ExternalDataFile);
        Assert.Equal(1UL, (ulong)Qcow2IncompatibleFeatures.Dirty);
        Assert.Equal(16UL, (ulong)Qcow2IncompatibleFeatures.ExtendedL2);
        Assert.Equal(1UL, (ulong)Qcow2AutoclearFeatures.Bitmaps);
        Assert.Equal(1, (int)Qcow2CompressionType.Zstd);
    }
}

public class Qcow2HeaderExtensionTests
{
    [Fact]
    public void OverlayLayoutMatchesQemu()
    {
        // Checked layout of a qemu-img overlay: backing format at 112, feature table at 128, end at 520, name at 528.
        var header = new Qcow2Header { ClusterBits = 16, Size = 1 << 20, L1Size = 1, L1TableOffset = 0x30000, RefcountTableOffset = 0x10000, RefcountTableClusters = 1 };
        var exts = new[]
        {
            new Qcow2HeaderExtension(Qcow2ExtensionType.BackingFormat, "qcow2"u8.ToArray()),
            new Qcow2HeaderExtension(Qcow2ExtensionType.FeatureNameTable, Qcow2FeatureName.EncodeTable(Qcow2FeatureName.Standard)),
        };
        var (bytes, h) = Qcow2HeaderExtensionCodec.Build(header, exts, "base.qcow2");
        Assert.Equal(0xe2792acau, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(112)));
        Assert.Equal(0x6803f857u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(128)));
        Assert.Equal(384u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(132)));
        Assert.Equal(0u, BinaryPrimitives.ReadUInt32BigEndian(bytes.AsSpan(520)));
        Assert.Equal(528UL, h.BackingFileOffset);
        Assert.Equal(10u, h.BackingFileSize);

        var parsed = Qcow2HeaderExtensionCodec.Parse(Qcow2Header.Parse(bytes), bytes);
        Assert.Equal("base.qcow2", parsed.BackingFile);
        Assert.Equal("qcow2", parsed.BackingFormat);
        var names = Qcow2FeatureName.DecodeTable(parsed.Find(Qcow2ExtensionType.FeatureNameTable)!.Data);
        Assert.Equal(Qcow2FeatureName.Standard, names);
    }

    [Fact]
    public void KeepsUnknownExtensionsVerbatim()
    {
        var header = new Qcow2Header { ClusterBits = 12, Size = 4096, L1Size = 1, L1TableOffset = 0x3000, RefcountTableOffset = 0x1000, RefcountTableClusters = 1 };
        var unknown = new Qcow2HeaderExtension((Qcow2ExtensionType)0x12345678, [1, 2, 3]);
        var (bytes, h) = Qcow2HeaderExtensionCodec.Build(header, [unknown], null);
        var parsed = Qcow2HeaderExtensionCodec.Parse(h, bytes);
        Assert.Equal(new byte[] { 1, 2, 3 }, parsed.Find((Qcow2ExtensionType)0x12345678)!.Data);
    }

    [Fact]
    public void ARepeatedBackingFormatIsNotAnErrorAndTheLastOneWins()
    {
        // QEMU reads the extensions in order and keeps the last backing format; unknown repeats are all kept.
        var header = new Qcow2Header { ClusterBits = 16, Size = 1 << 20, L1Size = 1, L1TableOffset = 0x30000, RefcountTableOffset = 0x10000, RefcountTableClusters = 1 };
        var unknown = (Qcow2ExtensionType)0x12345678;
        var exts = new[]
        {
            new Qcow2HeaderExtension(Qcow2ExtensionType.BackingFormat, "raw"u8.ToArray()),
            new Qcow2HeaderExtension(unknown, [1]),
            new Qcow2HeaderExtension(Qcow2ExtensionType.BackingFormat, "qcow2"u8.ToArray()),
            new Qcow2HeaderExtension(unknown, [2]),
        };
        var (bytes, h) = Qcow2HeaderExtensionCodec.Build(header, exts, "base.qcow2");
        var parsed = Qcow2HeaderExtensionCodec.Parse(h, bytes);
        Assert.Equal("qcow2", parsed.BackingFormat);
        Assert.Single(parsed.Extensions, e => e.Type == Qcow2ExtensionType.BackingFormat);
        Assert.Equal(2, parsed.Extensions.Count(e => e.Type == unknown));
    }

    [Fact]
    public void RejectsExtensionsThatOverrunTheCluster()
    {
        var header = new Qcow2Header { ClusterBits = 9, Size = 512, L1Size = 1, L1TableOffset = 0x600, RefcountTableOffset = 0x200, RefcountTableClusters = 1 };
        var bytes = new byte[512];
        header.Write(bytes);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(112), 0x12345678);
        BinaryPrimitives.WriteUInt32BigEndian(bytes.AsSpan(116), 5000);
        Assert.Throws<ImageFormatException>(() => Qcow2HeaderExtensionCodec.Parse(Qcow2Header.Parse(bytes), bytes));
    }
}

public class Qcow2EntryTests
{
    [Theory]
    [InlineData(0UL, L2EntryKind.Unallocated)]
    [InlineData(1UL, L2EntryKind.ZeroUnallocated)]
    [InlineData(0x8000000000050001UL, L2EntryKind.ZeroAllocated)]
    [InlineData(0x8000000000050000UL, L2EntryKind.Normal)]
    [InlineData(0x4000000000050000UL, L2EntryKind.Compressed)]
    public void ClassifiesL2Entries(ulong entry, L2EntryKind kind) => Assert.Equal(kind, Qcow2Entry.Classify(entry));

    /// <summary>In an external data file host offset 0 is guest cluster 0's real place; COPIED tells it from an
    /// unallocated entry (as QEMU's qcow2_get_cluster_type does). Without a data file the same entry is unallocated.</summary>
    [Theory]
    [InlineData(0x8000000000000000UL, true, L2EntryKind.Normal)]
    [InlineData(0x8000000000000000UL, false, L2EntryKind.Unallocated)]
    [InlineData(0UL, true, L2EntryKind.Unallocated)]
    [InlineData(0x8000000000000001UL, true, L2EntryKind.ZeroUnallocated)]
    [InlineData(0x8000000000050000UL, true, L2EntryKind.Normal)]
    public void ClassifiesL2EntriesOfExternalDataFiles(ulong entry, bool externalData, L2EntryKind kind) =>
        Assert.Equal(kind, Qcow2Entry.Classify(entry, externalData));

    [Theory]
    [InlineData(9, 0x12345L, 300)]
    [InlineData(16, 0x50123L, 40000)]
    [InlineData(21, 0x7654321L, 2000000)]
    public void CompressedDescriptorsRoundTrip(int clusterBits, long host, int length)
    {
        ulong e = Qcow2Entry.EncodeCompressed(host, length, clusterBits);
        var (h, sectors) = Qcow2Entry.DecodeCompressed(e, clusterBits);
        Assert.Equal(host, h);
        int readable = Qcow2Entry.CompressedReadLength(h, sectors);
        Assert.True(readable >= length, "the descriptor covers the data");
        Assert.True(readable < length + 512, "and ends in the sector of its last byte");
    }

    [Theory]
    [InlineData(0)]
    [InlineData(1)]
    [InlineData(2)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(5)]
    [InlineData(6)]
    public void RefcountsOfEveryWidthRoundTrip(int order)
    {
        var block = new byte[512];
        long entries = 512 * 8 / (1 << order);
        var rng = new Random(order);
        var model = new ulong[entries];
        for (int i = 0; i < 2000; i++)
        {
            long idx = rng.NextInt64(entries);
            ulong v = (ulong)rng.NextInt64() & RefcountCodec.MaxValue(order);
            model[idx] = v;
            RefcountCodec.Set(block, idx, order, v);
        }
        for (long i = 0; i < entries; i++) Assert.Equal(model[i], RefcountCodec.Get(block, i, order));
    }
}
