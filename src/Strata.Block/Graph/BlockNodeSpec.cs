namespace Strata.Block.Graph;

/// <summary>The definition of a node to add (what blockdev-add and --blockdev carry, already validated).</summary>
public sealed record BlockNodeSpec
{
    public required string Driver { get; init; }
    public string? NodeName { get; init; }
    public bool ReadOnly { get; init; }
    /// <summary>file driver: the path.</summary>
    public string? Filename { get; init; }
    /// <summary>null-co read-zeroes=on.</summary>
    public bool ReadZeroes { get; init; }
    /// <summary>cache.direct=on: the file is opened with O_DIRECT.</summary>
    public bool CacheDirect { get; init; }
    /// <summary>cache.no-flush=on: flushes are not passed to the host.</summary>
    public bool CacheNoFlush { get; init; }
    /// <summary>qcow2/raw: the child, either an existing node's name or an inline definition.</summary>
    public string? FileNodeName { get; init; }
    public BlockNodeSpec? FileInline { get; init; }
    /// <summary>qcow2 crash-safe-bitmaps=on|off; null: the graph's default.</summary>
    public bool? CrashSafeBitmaps { get; init; }
    /// <summary>qcow2: the external data file, an existing node's name or an inline definition (neither: the file
    /// the image's header names, opened as a new file node).</summary>
    public string? DataFileNodeName { get; init; }
    public BlockNodeSpec? DataFileInline { get; init; }
    /// <summary>qcow2: false for "backing": null (do not open the backing chain).</summary>
    public bool OpenBacking { get; init; } = true;
    /// <summary>throttle: the group whose rate applies.</summary>
    public string? ThrottleGroup { get; init; }
    /// <summary>copy-before-write: the target node, and the bitmap (node, name) limiting what is kept.</summary>
    public string? TargetNodeName { get; init; }
    public (string Node, string Name)? CbwBitmap { get; init; }
    /// <summary>copy-before-write on-cbw-error=break-snapshot.</summary>
    public bool CbwBreakSnapshot { get; init; }
    /// <summary>copy-before-write cbw-timeout, seconds (0: none).</summary>
    public uint CbwTimeout { get; init; }
    /// <summary>qcow2: "backing": NODE — an existing node serves as the backing image (fleecing overlays).</summary>
    public string? BackingNodeName { get; init; }
    /// <summary>The "discard" option: true for unmap/on.</summary>
    public bool DiscardUnmap { get; init; }
    /// <summary>nbd: where the export lives (a unix socket path, or host and port) and its name.</summary>
    public string? NbdSocketPath { get; init; }
    public string? NbdHost { get; init; }
    public int NbdPort { get; init; }
    public string NbdExport { get; init; } = "";
    /// <summary>blkdebug: the fault injector put on the image file.</summary>
    public Blkdebug? Faults { get; init; }
    /// <summary>null-co: the size.</summary>
    public long Size { get; init; } = 1L << 30;
    /// <summary>file nodes: take QEMU's image locks (locking=auto or on).</summary>
    public bool Locking { get; init; } = true;
}
