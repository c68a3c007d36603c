using System.Buffers.Binary;
using System.Text;
using Strata.Block.Bitmaps;
using Strata.Formats.Qcow2;

namespace Strata.Block.Qcow2;

/// <summary>
/// Persistent dirty bitmaps (the qcow2 bitmaps extension). On open they are loaded; a read-write open marks
/// every entry <c>in_use</c> on disk before any write, so a crash leaves them inconsistent rather than stale.
/// On close (or an explicit <see cref="StoreBitmaps"/>) their data, tables and a new directory are written to
/// new clusters, the header is switched to them, and only then are the old clusters freed.
/// </summary>
public sealed partial class Qcow2Image
{
    /// <summary>Where each loaded (or last stored) bitmap lives in the file, to free it after the next store.</summary>
    private sealed record StoredBitmap(BitmapDirectoryEntry Entry, List<long> DataClusters);

    private readonly Dictionary<string, StoredBitmap> _storedBitmaps = new(StringComparer.Ordinal);
    private (long Offset, long Size) _bitmapDirectory;
    /// <summary>True while the directory on disk says in_use for every bitmap (set before the first change).</summary>
    private bool _bitmapsMarkedInUse;
    private bool _bitmapsChanged;
    /// <summary>Problems found while loading the bitmaps; the image data stays readable.</summary>
    public IReadOnlyList<string> BitmapLoadErrors => _bitmapLoadErrors;
    private readonly List<string> _bitmapLoadErrors = new();

    private void InitBitmaps()
    {
        Bitmaps = new BitmapSet(Size, BitmapSet.DefaultGranularityFor((int)_clusterSize))
        {
            PersistenceCheck = CanStoreBitmap,
            Changed = () =>
            {
                _bitmapsChanged = true;
                ScheduleCheckpoint();
            },
        };
        var ext = _extras.Find(Qcow2ExtensionType.Bitmaps);
        if (ext is null)
        {
            if ((_header.AutoclearFeatures & Qcow2AutoclearFeatures.Bitmaps) != 0)
                _bitmapLoadErrors.Add("autoclear bit 'bitmaps' is set but there is no bitmaps extension");
            return;
        }
        if ((_header.AutoclearFeatures & Qcow2AutoclearFeatures.Bitmaps) == 0)
        {
            // A program that does not know bitmaps wrote the image: every bitmap in it is stale. QEMU hides them
            // and drops the extension on the next read-write open (leaking its clusters); so do we.
            if (_writable) RemoveBitmapsExtension();
            return;
        }
        try
        {
            var bx = BitmapsExtension.Parse(ext.Data);
            if (bx.DirectorySize == 0 || bx.DirectorySize > BitmapsExtension.MaxDirectorySize || bx.DirectoryOffset % (ulong)_clusterSize != 0 ||
                bx.DirectoryOffset == 0 || bx.DirectoryOffset + bx.DirectorySize > (ulong)_file.Length)
                throw new ImageFormatException("Bitmap directory lies outside the image or has an invalid size");
            var dir = new byte[bx.DirectorySize];
            _file.Read((long)bx.DirectoryOffset, dir);
            var entries = BitmapDirectoryEntry.ParseDirectory(dir, bx.NbBitmaps, _clusterSize, (long)_header.Size);
            _bitmapDirectory = ((long)bx.DirectoryOffset, (long)bx.DirectorySize);
            _overlap.SetBitmapDirectory(_bitmapDirectory.Offset, _bitmapDirectory.Size);
            var intents = ValidIntentRecord(bx.DirectoryOffset);
            foreach (var e in entries) LoadBitmap(e, trustInUse: intents is not null);
            if (intents is not null) ApplyIntents(intents);
            // As QEMU does on a read-write open: every bitmap is in_use on disk until it is stored again. Crash-safe
            // tracking leaves that to its first checkpoint, which writes in_use entries and the record in one header
            // switch: marking them in place first would open a window where a crash loses the bitmaps.
            if (_writable && !_crashSafeRequested) MarkBitmapsInUse();
        }
        catch (BitmapConstraintException e)
        {
            throw new BlockException(e.Message);
        }
        catch (ImageFormatException e)
        {
            // The data stays readable; the bitmaps are not usable. Writing could lose them, so refuse it.
            _bitmapLoadErrors.Add(e.Message);
            foreach (var b in Bitmaps.All.ToList()) Bitmaps.RemoveLoaded(b);
            _storedBitmaps.Clear();
            if (_writable) throw new BlockException($"Could not load the bitmaps: {e.Message}");
        }
    }

    /// <param name="trustInUse">A valid write-intent record covers this image: an in_use entry's bits are those of
    /// the last checkpoint, to be completed with the record's regions, not garbage.</param>
    private void LoadBitmap(BitmapDirectoryEntry e, bool trustInUse)
    {
        var bitmap = new DirtyBitmap(e.Name, e.Granularity, Size, enabled: (e.Flags & BitmapFlags.Auto) != 0)
        {
            Persistent = true,
            ReadOnly = !_writable,
            Inconsistent = (e.Flags & BitmapFlags.InUse) != 0 && !trustInUse,
        };
        var dataClusters = new List<long>();
        if (!bitmap.Inconsistent)
        {
            long tableBytes = e.TableSize * 8L;
            if ((long)e.TableOffset + tableBytes > _file.Length)
                throw new ImageFormatException($"Bitmap '{e.Name}': bitmap table lies past the end of the file");
            var table = new byte[tableBytes];
            _file.Read((long)e.TableOffset, table);
            long dataBytes = (bitmap.Bits.Length + 7) / 8;
            if (e.TableSize < (dataBytes + _clusterSize - 1) / _clusterSize)
                throw new ImageFormatException($"Bitmap '{e.Name}': bitmap table is too small for the disk");
            var cluster = new byte[_clusterSize];
            var ones = new byte[_clusterSize];
            Array.Fill(ones, (byte)0xff);
            for (int i = 0; i < e.TableSize; i++)
            {
                ulong te = BinaryPrimitives.ReadUInt64BigEndian(table.AsSpan(i * 8));
                if ((te & BitmapDirectoryEntry.TableEntryReservedMask) != 0)
                    throw new ImageFormatException($"Bitmap '{e.Name}': bitmap table entry {i} has reserved bits set");
                long offset = (long)(te & Qcow2Entry.OffsetMask);
                long at = (long)i * _clusterSize;
                int length = (int)Math.Clamp(dataBytes - at, 0, _clusterSize);
                if (offset == 0)
                {
                    if ((te & 1) != 0 && length > 0) bitmap.Bits.OrBytes(at, ones.AsSpan(0, length));
                    continue;
                }
                if ((te & 1) != 0) throw new ImageFormatException($"Bitmap '{e.Name}': bitmap table entry {i} is invalid");
                if (offset % _clusterSize != 0 || offset + _clusterSize > _file.Length)
                    throw new ImageFormatException($"Bitmap '{e.Name}': bitmap data cluster {i} lies past the end of the file or is unaligned");
                dataClusters.Add(offset);
                if (length == 0) continue;
                _file.Read(offset, cluster.AsSpan(0, length));
                bitmap.Bits.OrBytes(at, cluster.AsSpan(0, length));
            }
        }
        Bitmaps.AddLoaded(bitmap);
        _storedBitmaps[e.Name] = new StoredBitmap(e, dataClusters);
    }

    private string? CanStoreBitmap(string name, long granularity)
    {
        string node = Path.GetFileName(_file.Path);
        if (_header.Version < 3) return $"Can't make bitmap '{name}' persistent in '{node}': Cannot store dirty bitmaps in qcow2 v2 files";
        if (Encoding.UTF8.GetByteCount(name) > DirtyBitmap.MaxNameBytes)
            return $"Can't make bitmap '{name}' persistent in '{node}': Name length exceeds maximum (1023 characters)";
        long tableSize = BitmapDirectoryEntry.RequiredTableSize(Size, granularity, _clusterSize);
        if (tableSize > BitmapDirectoryEntry.MaxTableSize || tableSize * _clusterSize > BitmapDirectoryEntry.MaxBitmapBytes)
            return $"Can't make bitmap '{name}' persistent in '{node}': Too much space will be occupied by the bitmap. Use larger granularity";
        if (Bitmaps.All.Count(b => b.Persistent) >= BitmapsExtension.MaxBitmaps)
            return $"Can't make bitmap '{name}' persistent in '{node}': Too many persistent bitmaps";
        if (!_writable) return $"Can't make bitmap '{name}' persistent in '{node}': image is read-only";
        return null;
    }

    /// <summary>Before the first change to guest data (or to the bitmaps) of a read-write image: write in_use into
    /// every directory entry, so a crash cannot leave bitmaps that look valid but miss writes. Caller holds the lock.</summary>
    private void MarkBitmapsInUse()
    {
        if (_bitmapsMarkedInUse || !_writable || _storedBitmaps.Count == 0) return;
        _bitmapsMarkedInUse = true;
        long pos = _bitmapDirectory.Offset;
        var flagBytes = new byte[4];
        foreach (var stored in OrderedStoredEntries())
        {
            BinaryPrimitives.WriteUInt32BigEndian(flagBytes, (uint)(stored.Entry.Flags | BitmapFlags.InUse));
            CheckHostWrite(pos + 12, flagBytes.Length, Qcow2MetadataKind.BitmapDirectory);
            _file.Write(pos + 12, flagBytes);
            pos += stored.Entry.EncodedSize;
        }
        _file.Flush();
    }

    /// <summary>Stored entries in directory order (the order they were loaded or written).</summary>
    private IEnumerable<StoredBitmap> OrderedStoredEntries() => _storedBitmaps.Values;

    public override void SwitchToReadOnly()
    {
        if (!_writable) return;
        Flush();
        lock (_lock)
        {
            StoreBitmapsLocked();
            _file.Flush();
            _writable = false;
            foreach (var b in Bitmaps.All.Where(b => b.Persistent)) b.ReadOnly = true;
        }
    }

    public override void StoreBitmaps()
    {
        if (!_writable) return;
        lock (_lock) StoreBitmapsLocked();
    }

    /// <summary>Writes every persistent bitmap (data, tables, directory), switches the header to them with in_use
    /// clear (and without the write-intent record: the image is QEMU's own again), then frees the previous copies.
    /// Caller holds the lock.</summary>
    private void StoreBitmapsLocked()
    {
        if (!_bitmapsChanged && !_bitmapsMarkedInUse && !IntentRecordOnDisk) return;
        var persistent = Bitmaps.SnapshotPersistent(_ => { });
        if (persistent.Count == 0 && _storedBitmaps.Count == 0 && _extras.Find(Qcow2ExtensionType.Bitmaps) is null && !IntentRecordOnDisk) return;
        WriteBitmapsLocked(persistent, inUse: false, (exts, dirOffset) => WhileNoIntentWrite(() =>
        {
            _header = _header with
            {
                AutoclearFeatures = (dirOffset != 0
                    ? _header.AutoclearFeatures | Qcow2AutoclearFeatures.Bitmaps
                    : _header.AutoclearFeatures & ~Qcow2AutoclearFeatures.Bitmaps) & ~WriteIntentRecord.ValidBit,
            };
            RewriteHeaderExtensions(exts);
        }));
        _bitmapsMarkedInUse = false;
    }

    /// <summary>
    /// Writes the bitmaps of <paramref name="bitmaps"/> (data, tables, directory) to new clusters, makes them
    /// durable, lets <paramref name="switchHeader"/> write the header that names them (given the header extensions
    /// without the old bitmaps extension and with the new one, and the new directory's offset, 0 when there is no bitmap), then frees the
    /// previous copies. <paramref name="inUse"/> stores every entry in_use, as a checkpoint of crash-safe tracking
    /// does: QEMU must still see them as inconsistent after a crash. Caller holds the lock.
    /// </summary>
    private void WriteBitmapsLocked(IReadOnlyList<PersistentBitmapSnapshot> bitmaps, bool inUse, Action<List<Qcow2HeaderExtension>, long> switchHeader)
    {
        WriteBackMetadata();

        var newStored = new Dictionary<string, StoredBitmap>(StringComparer.Ordinal);
        var entries = new List<BitmapDirectoryEntry>();
        var buffer = new byte[_clusterSize];
        foreach (var b in bitmaps)
        {
            if (b.Bits is null)
            {
                // Its bits were never loaded: keep the old entry (still in_use) and its clusters.
                if (_storedBitmaps.TryGetValue(b.Name, out var kept))
                {
                    entries.Add(kept.Entry);
                    newStored[b.Name] = kept;
                }
                continue;
            }
            long dataBytes = (b.Bits.Length + 7) / 8;
            long tableSize = Math.Max(1, (dataBytes + _clusterSize - 1) / _clusterSize);
            var table = new byte[tableSize * 8];
            var clusters = new List<long>();
            for (long i = 0; i < tableSize; i++)
            {
                int length = (int)Math.Clamp(dataBytes - i * _clusterSize, 0, _clusterSize);
                Array.Clear(buffer);
                b.Bits.CopyBytes(i * _clusterSize, buffer.AsSpan(0, length));
                if (buffer.AsSpan().IndexOfAnyExcept((byte)0) < 0) continue; // an all-zero cluster is entry 0
                long host = AllocateClusters(1);
                CheckHostWrite(host, _clusterSize);
                _file.Write(host, buffer);
                clusters.Add(host);
                BinaryPrimitives.WriteUInt64BigEndian(table.AsSpan((int)(i * 8)), (ulong)host);
            }
            long tableClusters = (table.Length + _clusterSize - 1) / _clusterSize;
            long tableOffset = AllocateClusters(tableClusters);
            // Only the table's own bytes are written, as QEMU does: a table at the end of the file leaves the file
            // ending there (qemu-img measure of the file as raw sees the same length).
            CheckHostWrite(tableOffset, tableClusters * _clusterSize);
            _file.Write(tableOffset, table);
            var flags = (b.Recording ? BitmapFlags.Auto : BitmapFlags.None) | (inUse ? BitmapFlags.InUse : BitmapFlags.None);
            var entry = new BitmapDirectoryEntry((ulong)tableOffset, (uint)tableSize, flags,
                BitmapDirectoryEntry.DirtyTrackingType, (byte)System.Numerics.BitOperations.Log2((ulong)b.Granularity), b.Name, []);
            entries.Add(entry);
            newStored[b.Name] = new StoredBitmap(entry, clusters);
        }

        long dirOffset = 0, dirSize = 0;
        if (entries.Count > 0)
        {
            var dir = BitmapDirectoryEntry.EncodeDirectory(entries);
            dirSize = dir.Length;
            long dirClusters = (dirSize + _clusterSize - 1) / _clusterSize;
            dirOffset = AllocateClusters(dirClusters);
            CheckHostWrite(dirOffset, dirClusters * _clusterSize);
            _file.Write(dirOffset, dir);
        }
        // New data, tables and directory (and their refcounts) are durable before the header names them.
        WriteBackMetadata();

        var exts = _extras.Extensions.Where(e => e.Type != Qcow2ExtensionType.Bitmaps && e.Type != WriteIntentRecord.ExtensionType).ToList();
        if (entries.Count > 0)
            exts.Add(new Qcow2HeaderExtension(Qcow2ExtensionType.Bitmaps, new BitmapsExtension((uint)entries.Count, (ulong)dirSize, (ulong)dirOffset).Encode()));
        switchHeader(exts, dirOffset);

        // Nothing on disk points at the previous copies any more.
        var (oldDirOffset, oldDirSize) = _bitmapDirectory;
        if (oldDirOffset != 0) FreeRange(oldDirOffset, oldDirSize);
        foreach (var (name, old) in _storedBitmaps)
        {
            if (newStored.TryGetValue(name, out var now) && ReferenceEquals(now, old)) continue;
            FreeRange((long)old.Entry.TableOffset, old.Entry.TableSize * 8L);
            foreach (var c in old.DataClusters) FreeRange(c, _clusterSize);
        }
        _storedBitmaps.Clear();
        foreach (var (k, v) in newStored) _storedBitmaps[k] = v;
        _bitmapDirectory = (dirOffset, dirSize);
        _overlap.SetBitmapDirectory(dirOffset, dirSize);
        _bitmapsChanged = false;
        WriteBackMetadata();
    }

    private void FreeRange(long offset, long length)
    {
        for (long c = offset >> _clusterBits; c <= (offset + length - 1) >> _clusterBits; c++)
            AdjustRefcount(c, -1);
    }

    /// <summary>Drops a stale bitmaps extension (written by a program that did not know bitmaps).</summary>
    private void RemoveBitmapsExtension()
    {
        var exts = _extras.Extensions.Where(e => e.Type != Qcow2ExtensionType.Bitmaps).ToList();
        _header = _header with { AutoclearFeatures = _header.AutoclearFeatures & ~Qcow2AutoclearFeatures.Bitmaps };
        RewriteHeaderExtensions(exts);
    }

    /// <summary>Rewrites cluster 0: header, the given extensions, end marker and backing file name. While a
    /// write-intent record is valid on disk it is kept, current and last (its bytes are rewritten in place by first
    /// writes); otherwise it is dropped. Caller holds the lock (or is opening the image).</summary>
    private void RewriteHeaderExtensions(List<Qcow2HeaderExtension> exts)
    {
        exts = exts.Where(e => e.Type != WriteIntentRecord.ExtensionType).ToList();
        if (_intents is { } intents && IntentRecordOnDisk)
            intents.WhileQuiet(regions => WriteCluster0(exts, CurrentIntentRecord(regions)));
        else
            WriteCluster0(exts, null);
    }

    /// <summary>Writes cluster 0 with <paramref name="exts"/> and, when given, the write-intent record after them.</summary>
    private void WriteCluster0(List<Qcow2HeaderExtension> exts, WriteIntentRecord? record)
    {
        if (record is not null) exts = [.. exts, new Qcow2HeaderExtension(WriteIntentRecord.ExtensionType, record.Encode())];
        var (bytes, header) = Qcow2HeaderExtensionCodec.Build(_header, exts, _backingFile);
        var cluster0 = new byte[_clusterSize];
        bytes.CopyTo(cluster0, 0);
        _file.Write(0, cluster0);
        _file.Flush();
        _header = header;
        _headerRaw = bytes.AsSpan(0, header.WrittenLength).ToArray();
        _extras = new Qcow2HeaderExtras(exts, _backingFile);
        if (record is not null)
            _intentRecordOffset = header.WrittenLength + exts.Take(exts.Count - 1).Sum(e => e.EncodedLength) + 8;
    }
}
