namespace Strata.Block;

/// <summary>The raw format: guest offset = host offset. Holes in a sparse file are reported as zero.</summary>
public sealed class RawImage : BlockImage
{
    private readonly HostFile _file;
    private readonly string _formatName;
    private readonly bool _ownsFile;
    private long _size;

    /// <summary>A raw image over <paramref name="file"/>; <paramref name="formatName"/> is "file" for a daemon's
    /// protocol node.</summary>
    public RawImage(HostFile file, string formatName = "raw", bool ownsFile = true)
    {
        _file = file;
        _formatName = formatName;
        _ownsFile = ownsFile;
        _size = (file.Length + 511) & ~511L; // QEMU sees whole sectors
        Bitmaps = new Bitmaps.BitmapSet(_size, Strata.Block.Bitmaps.BitmapSet.DefaultGranularityFor(0))
        {
            PersistenceCheck = (_, _) => $"Can't store persistent bitmaps to {Path.GetFileName(file.Path)}: Operation not supported",
        };
    }

    public HostFile File => _file;
    public override string FormatName => _formatName;
    public override bool ServesCachedReads => _file.ServesNoWaitReads;
    /// <summary>The file's length in whole sectors; it follows the file (a "file" node under a qcow2 that grows).</summary>
    public override long Size => Math.Max(Interlocked.Read(ref _size), (_file.Length + 511) & ~511L);
    private volatile bool _switchedToReadOnly;

    public override bool ReadOnly => _file.ReadOnly || _switchedToReadOnly;

    public override void SwitchToReadOnly()
    {
        if (ReadOnly) return;
        Flush();
        _switchedToReadOnly = true;
    }
    public override string FileName => _file.Path;

    public static RawImage Create(string path, long size)
    {
        var f = HostFile.Create(path);
        f.SetLength(size);
        return new RawImage(f);
    }

    protected override void DriverRead(long offset, Span<byte> buffer)
    {
        _file.DataEvent(false, offset, buffer.Length);
        _file.Read(offset, buffer);
    }

    protected override void DriverWrite(long offset, ReadOnlySpan<byte> data)
    {
        _file.DataEvent(true, offset, data.Length);
        _file.Write(offset, data);
    }

    protected override void DriverWriteZeroes(long offset, long length, bool mayUnmap)
    {
        if (mayUnmap && _file.PunchHole(offset, length)) return;
        var zeros = new byte[(int)Math.Min(length, 1 << 20)];
        for (long pos = 0; pos < length; pos += zeros.Length)
            _file.Write(offset + pos, zeros.AsSpan(0, (int)Math.Min(zeros.Length, length - pos)));
    }

    protected override void DriverDiscard(long offset, long length) => DriverWriteZeroes(offset, length, mayUnmap: true);

    protected override void DriverFlush() => _file.Flush();

    public override LayerExtent GetLayerStatus(long offset, long maxLength)
    {
        CheckRange(offset, 0);
        long end = Math.Min(Size, offset + maxLength);
        if (offset >= end) return new LayerExtent(offset, 0, LayerState.Data, offset);
        long data = _file.SeekData(offset);
        if (data < 0 && offset < _file.Length)
        {
            // SEEK_DATA unsupported: everything is data.
            if (_file.SeekHole(offset) < 0) return new LayerExtent(offset, end - offset, LayerState.Data, offset);
        }
        if (data < 0 || data >= end)
            return new LayerExtent(offset, end - offset, LayerState.Zero, offset);
        if (data > offset)
            return new LayerExtent(offset, data - offset, LayerState.Zero, offset);
        long hole = _file.SeekHole(offset);
        if (hole < 0 || hole > end) hole = end;
        return new LayerExtent(offset, hole > offset ? hole - offset : end - offset, LayerState.Data, offset);
    }

    public override void Resize(long newSize)
    {
        CheckWritable();
        _file.SetLength(newSize);
        Interlocked.Exchange(ref _size, newSize);
        Bitmaps.Resized(newSize);
    }

    public override void Dispose()
    {
        base.Dispose();
        if (_ownsFile) _file.Dispose();
    }
}
