using Strata.Block.Bitmaps;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Formats.Qcow2;

namespace Strata.Block;

/// <summary>ImageInfo as QEMU reports it (qemu-img info --output=json, and "image" in query-named-block-nodes).</summary>
public static class ImageInfo
{
    public static QDict Build(BlockImage image, string displayName, bool withBackingImage = false)
    {
        var d = new QDict();
        d.Add("filename", displayName);
        d.Add("format", image.FormatName);
        d.Add("dirty-flag", image is Qcow2Image q0 && (q0.Header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) != 0);
        d.Add("actual-size", ActualSize(image));
        d.Add("virtual-size", image.Size);
        if (image.ClusterSize > 0) d.Add("cluster-size", image.ClusterSize);
        if (image.BackingFileName is { } bf)
        {
            string full = ImageOpener.ResolveBackingPath(displayName, bf);
            d.Add("backing-filename", bf);
            d.Add("full-backing-filename", full);
            if (image.BackingFormat is { } bfmt) d.Add("backing-filename-format", bfmt);
            if (withBackingImage && image.Backing is { } backing) d.Add("backing-image", Build(backing, full, true));
        }
        else if (withBackingImage && image.FilteredChild is { } child)
        {
            // A filter shows the node below it as its backing image, under the same file name.
            d.Add("backing-image", Build(child, displayName, true));
        }
        if (image is Qcow2Image { Snapshots.Count: > 0 } qs) d.Add("snapshots", SnapshotInfos(qs.Snapshots));
        if (image is Qcow2Image q)
        {
            var data = new QDict();
            var h = q.Header;
            if (h.Version >= 3)
            {
                data.Add("compat", "1.1");
                data.Add("lazy-refcounts", (h.CompatibleFeatures & Qcow2CompatibleFeatures.LazyRefcounts) != 0);
                data.Add("corrupt", (h.IncompatibleFeatures & Qcow2IncompatibleFeatures.Corrupt) != 0);
                data.Add("refcount-bits", h.RefcountBits);
                data.Add("compression-type", h.CompressionType == Qcow2CompressionType.Zstd ? "zstd" : "zlib");
                if (q.DataFileName is { } dataFile) data.Add("data-file", dataFile);
                if (q.HasExternalDataFile) data.Add("data-file-raw", q.DataFileRaw);
                data.Add("extended-l2", (h.IncompatibleFeatures & Qcow2IncompatibleFeatures.ExtendedL2) != 0);
                var persistent = q.Bitmaps.All.Where(b => b.Persistent && q.IsStoredBitmap(b.Name!)).Reverse().ToList();
                if (persistent.Count > 0)
                    data.Add("bitmaps", persistent.Select(b => new QDict()
                        .Add("name", b.Name)
                        .Add("granularity", b.Granularity)
                        .Add("flags", FlagNames(b, q.ReadOnly))).ToList());
            }
            else
            {
                data.Add("compat", "0.10");
                data.Add("refcount-bits", h.RefcountBits);
                data.Add("compression-type", "zlib");
            }
            if (q.EncryptionFormat is not null) data.Add("encrypt", EncryptionInfo(q));
            d.Add("format-specific", new QDict().Add("type", "qcow2").Add("data", data));
            if (q.EncryptionFormat is not null) d.Add("encrypted", true);
        }
        return d;
    }

    /// <summary>QCryptoBlockInfo: the format, and for LUKS its cipher, hash, uuid and key slots.</summary>
    private static QDict EncryptionInfo(Qcow2Image image)
    {
        var info = new QDict().Add("format", image.EncryptionFormat);
        if (image.Luks is not { } luks) return info;
        string mode = luks.CipherMode;
        int dash = mode.IndexOf('-');
        info.Add("cipher-alg", Strata.Formats.Crypto.Luks.CipherAlg(luks))
            .Add("cipher-mode", dash < 0 ? mode : mode[..dash])
            .Add("ivgen-alg", dash < 0 ? "plain64" : mode[(dash + 1)..])
            .Add("hash-alg", luks.HashSpec)
            .Add("payload-offset", (long)luks.PayloadOffsetSectors * 512)
            .Add("master-key-iters", (long)luks.MasterKeyDigestIterations)
            .Add("uuid", luks.Uuid)
            .Add("slots", luks.KeySlots.Select(slot =>
            {
                var d = new QDict().Add("active", slot.Active);
                if (slot.Active) d.Add("iters", (long)slot.Iterations).Add("stripes", (long)slot.Stripes);
                return (object?)d.Add("key-offset", (long)slot.KeyMaterialOffsetSectors * 512);
            }).ToList());
        return info;
    }

    /// <summary>The flags the image file holds for a bitmap: in-use (set on disk while open read-write, or left by
    /// a crash) and auto (enabled).</summary>
    private static List<string> FlagNames(DirtyBitmap b, bool readOnlyImage)
    {
        var flags = new List<string>();
        if (b.Inconsistent || !readOnlyImage) flags.Add("in-use");
        if (b.Enabled || (b.Successor?.Enabled ?? false)) flags.Add("auto");
        return flags;
    }

    /// <summary>SnapshotInfo list: icount only where the entry records one.</summary>
    private static List<object?> SnapshotInfos(IReadOnlyList<Qcow2Snapshot> snapshots) =>
        snapshots.Select(sn =>
        {
            var d = new QDict()
                .Add("id", sn.Id)
                .Add("name", sn.Name)
                .Add("vm-state-size", (long)sn.VmStateSize)
                .Add("date-sec", (long)sn.DateSeconds)
                .Add("date-nsec", (long)sn.DateNanoseconds)
                .Add("vm-clock-sec", (long)(sn.VmClockNanoseconds / 1_000_000_000))
                .Add("vm-clock-nsec", (long)(sn.VmClockNanoseconds % 1_000_000_000));
            if (sn.Icount != ulong.MaxValue) d.Add("icount", (long)sn.Icount);
            return (object?)d;
        }).ToList();

    public static long ActualSize(BlockImage image) => image switch
    {
        // An open external data file counts too, as QEMU sums a node's storage children (qemu-img info leaves it closed).
        Qcow2Image q => q.File.AllocatedBytes + (q.DataFile?.AllocatedBytes ?? 0),
        RawImage r => r.File.AllocatedBytes,
        _ when image.FilteredChild is { } child => ActualSize(child),
        _ => 0,
    };

    /// <summary>The BlockDirtyInfo list of query-named-block-nodes.</summary>
    public static List<object?> DirtyBitmaps(BitmapSet set, bool crashSafe = false)
    {
        var list = new List<object?>();
        foreach (var b in set.Listed)
        {
            var d = new QDict();
            if (b.Name is not null) d.Add("name", b.Name);
            d.Add("recording", b.Recording);
            d.Add("persistent", b.Persistent);
            d.Add("busy", b.Busy);
            d.Add("granularity", b.Granularity);
            d.Add("count", b.CountBytes);
            if (b.Inconsistent) d.Add("inconsistent", true);
            // Strata's own member, only where it holds: the persistent bitmap survives a crash as a superset of the
            // truth (QEMU's would load inconsistent).
            if (crashSafe && b.Persistent) d.Add("crash-safe", true);
            list.Add(d);
        }
        return list;
    }
}
