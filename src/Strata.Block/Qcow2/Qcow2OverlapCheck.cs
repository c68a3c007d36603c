namespace Strata.Block.Qcow2;

/// <summary>The kinds of qcow2 metadata a write must not land on, in the order QEMU tests them (the first one a
/// write overlaps is the one it names).</summary>
public enum Qcow2MetadataKind
{
    None = 0,
    Header,
    ActiveL1,
    RefcountTable,
    SnapshotTable,
    InactiveL1,
    ActiveL2,
    RefcountBlock,
    BitmapDirectory,
}

/// <summary>
/// Where the image's metadata lives in the host file, kept up to date by the driver as it allocates and moves
/// tables, so that every write to the file can be refused before it lands on metadata — QEMU's default
/// <c>overlap-check=cached</c>: header, active L1, refcount table, snapshot table, inactive L1 tables, active
/// L2 tables, refcount blocks and the bitmap directory. A write is tested against a handful of fixed ranges and,
/// for the per-cluster tables, one hash look-up per cluster it covers (or per table, when there are fewer tables),
/// so the cost does not grow with the image. Not thread-safe: the driver calls it under its lock.
/// </summary>
public sealed class Qcow2OverlapCheck
{
    private readonly long _clusterSize;
    private readonly int _clusterBits;
    private (long Offset, long Length) _l1;
    private (long Offset, long Length) _refcountTable;
    private (long Offset, long Length) _snapshotTable;
    private (long Offset, long Length) _bitmapDirectory;
    private List<(long Offset, long Length)> _inactiveL1 = new();
    /// <summary>Host cluster → how many L1 entries point at it (a corrupt image may repeat one).</summary>
    private readonly Dictionary<long, int> _l2Clusters = new();
    private readonly Dictionary<long, int> _refcountBlockClusters = new();

    public Qcow2OverlapCheck(int clusterBits)
    {
        _clusterBits = clusterBits;
        _clusterSize = 1L << clusterBits;
    }

    /// <summary>QEMU's name of a kind, as its corruption messages print it.</summary>
    public static string Describe(Qcow2MetadataKind kind) => kind switch
    {
        Qcow2MetadataKind.Header => "qcow2_header",
        Qcow2MetadataKind.ActiveL1 => "active L1 table",
        Qcow2MetadataKind.RefcountTable => "refcount table",
        Qcow2MetadataKind.SnapshotTable => "snapshot table",
        Qcow2MetadataKind.InactiveL1 => "inactive L1 table",
        Qcow2MetadataKind.ActiveL2 => "active L2 table",
        Qcow2MetadataKind.RefcountBlock => "refcount block",
        Qcow2MetadataKind.BitmapDirectory => "bitmap directory",
        _ => "nothing",
    };

    public void SetActiveL1(long offset, long length) => _l1 = (offset, length);
    public void SetRefcountTable(long offset, long length) => _refcountTable = (offset, length);
    public void SetSnapshotTable(long offset, long length) => _snapshotTable = (offset, length);
    public void SetBitmapDirectory(long offset, long length) => _bitmapDirectory = (offset, length);
    public void SetInactiveL1Tables(IEnumerable<(long Offset, long Length)> tables) => _inactiveL1 = tables.ToList();

    public void AddL2Table(long offset) => Add(_l2Clusters, offset);
    public void RemoveL2Table(long offset) => Remove(_l2Clusters, offset);
    public void AddRefcountBlock(long offset) => Add(_refcountBlockClusters, offset);
    public void RemoveRefcountBlock(long offset) => Remove(_refcountBlockClusters, offset);

    public void ClearL2Tables() => _l2Clusters.Clear();
    public void ClearRefcountBlocks() => _refcountBlockClusters.Clear();

    private void Add(Dictionary<long, int> set, long offset)
    {
        if (offset <= 0) return;
        long cluster = offset >> _clusterBits;
        set[cluster] = set.GetValueOrDefault(cluster) + 1;
    }

    private void Remove(Dictionary<long, int> set, long offset)
    {
        long cluster = offset >> _clusterBits;
        if (!set.TryGetValue(cluster, out int n)) return;
        if (n <= 1) set.Remove(cluster);
        else set[cluster] = n - 1;
    }

    /// <summary>The first kind of metadata (in QEMU's order) that a write of <paramref name="length"/> bytes at
    /// <paramref name="offset"/> would overwrite, leaving out <paramref name="ignore"/> (the structure being
    /// written itself); <see cref="Qcow2MetadataKind.None"/> when the write is safe. As QEMU, the header counts
    /// for any write that starts in cluster 0, and the other tests widen the write to whole clusters.</summary>
    public Qcow2MetadataKind Find(long offset, long length, Qcow2MetadataKind ignore = Qcow2MetadataKind.None)
    {
        if (length <= 0) return Qcow2MetadataKind.None;
        if (ignore != Qcow2MetadataKind.Header && offset < _clusterSize) return Qcow2MetadataKind.Header;
        long start = offset & ~(_clusterSize - 1);
        long end = (offset + length + _clusterSize - 1) & ~(_clusterSize - 1);
        bool Hits((long Offset, long Length) r) => r.Length > 0 && r.Offset < end && start < r.Offset + r.Length;

        if (ignore != Qcow2MetadataKind.ActiveL1 && Hits(_l1)) return Qcow2MetadataKind.ActiveL1;
        if (ignore != Qcow2MetadataKind.RefcountTable && Hits(_refcountTable)) return Qcow2MetadataKind.RefcountTable;
        if (ignore != Qcow2MetadataKind.SnapshotTable && Hits(_snapshotTable)) return Qcow2MetadataKind.SnapshotTable;
        if (ignore != Qcow2MetadataKind.InactiveL1)
            foreach (var t in _inactiveL1)
                if (Hits(t)) return Qcow2MetadataKind.InactiveL1;
        if (ignore != Qcow2MetadataKind.ActiveL2 && HitsClusters(_l2Clusters, start, end)) return Qcow2MetadataKind.ActiveL2;
        if (ignore != Qcow2MetadataKind.RefcountBlock && HitsClusters(_refcountBlockClusters, start, end)) return Qcow2MetadataKind.RefcountBlock;
        if (ignore != Qcow2MetadataKind.BitmapDirectory && Hits(_bitmapDirectory)) return Qcow2MetadataKind.BitmapDirectory;
        return Qcow2MetadataKind.None;
    }

    private bool HitsClusters(Dictionary<long, int> set, long start, long end)
    {
        if (set.Count == 0) return false;
        long first = start >> _clusterBits, last = (end >> _clusterBits) - 1;
        if (last - first + 1 <= set.Count)
        {
            for (long c = first; c <= last; c++)
                if (set.ContainsKey(c)) return true;
            return false;
        }
        foreach (var c in set.Keys)
            if (c >= first && c <= last) return true;
        return false;
    }
}
