using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Version 2 images and lazy refcounts. Strata always writes refcounts before the tables that need them, so with
/// lazy_refcounts it only keeps the dirty bit as QEMU does: set before the first change, cleared on a clean close,
/// and an image left dirty (by a crash, or by QEMU) has its refcounts repaired when opened for writing.
/// </summary>
public sealed partial class Qcow2Image
{
    private bool _dirtyBitSet;

    /// <summary>What compat=0.10 cannot have, with qemu-img's messages.</summary>
    private static void CheckVersionOptions(Qcow2CreateOptions options)
    {
        if (options.Version is not (2 or 3)) throw new BlockException($"Unsupported qcow2 version {options.Version}");
        if (options.Version >= 3) return;
        const string Use = "(use version=v3 or greater)";
        if (options.LazyRefcounts)
            throw new BlockException($"Lazy refcounts only supported with compatibility level 1.1 and above {Use}");
        if (options.RefcountBits != 16)
            throw new BlockException($"Different refcount widths than 16 bits require compatibility level 1.1 or above {Use}");
        if (options.CompressionType != Qcow2CompressionType.Deflate)
            throw new BlockException($"Non-zlib compression type is only supported with compatibility level 1.1 and above {Use}");
    }

    /// <summary>With lazy refcounts, the image is marked dirty on disk before its first change. Caller holds the lock.</summary>
    private void MarkDirtyForLazyRefcounts()
    {
        if (_dirtyBitSet || (_header.CompatibleFeatures & Qcow2CompatibleFeatures.LazyRefcounts) == 0) return;
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures | Qcow2IncompatibleFeatures.Dirty };
        WriteHeaderFields();
        _file.Flush();
        _dirtyBitSet = true;
    }

    /// <summary>Clears the dirty bit once all metadata is on disk. Caller holds the lock.</summary>
    private void MarkClean()
    {
        if ((_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) == 0) return;
        _file.Flush();
        _header = _header with { IncompatibleFeatures = _header.IncompatibleFeatures & ~Qcow2IncompatibleFeatures.Dirty };
        WriteHeaderFields();
        _file.Flush();
        _dirtyBitSet = false;
    }

    /// <summary>An image opened for writing with the dirty bit set may have refcounts that lag behind its tables:
    /// they are recounted and repaired before anything is allocated, as QEMU does on open.</summary>
    private void RepairIfDirty()
    {
        if (!_writable || (_header.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) == 0) return;
        var report = Check(RepairMode.All);
        if (report.Corruptions > report.CorruptionsFixed || report.CheckErrors > 0)
            throw new BlockException("qcow2: Could not repair dirty image: the image has errors check -r all cannot fix");
        lock (_lock) MarkClean();
    }

    /// <summary>Zeroing where version 2 has no zero flag and a backing file shows through: real zeros are written.</summary>
    private void WriteZeroBuffers(long offset, long length)
    {
        var zeros = new byte[Math.Min(length, 1L << 20)];
        while (length > 0)
        {
            int piece = (int)Math.Min(length, zeros.Length);
            DriverWrite(offset, zeros.AsSpan(0, piece));
            offset += piece;
            length -= piece;
        }
    }
}
