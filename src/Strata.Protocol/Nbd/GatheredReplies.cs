namespace Strata.Protocol.Nbd;

/// <summary>
/// One batch of NBD replies for a single gathered write: the headers (and the small replies) packed into one buffer,
/// read data referenced where it lies, in the requests' own buffers — so a read's bytes are never copied in user
/// space between the image read and the socket. The caller keeps those buffers until <see cref="SendAsync"/> is
/// done, then <see cref="Clear"/>s the batch.
/// </summary>
internal sealed class GatheredReplies(IGatheredWriter writer)
{
    /// <summary>Pieces per write: Linux takes at most 1024 in one sendmsg (IOV_MAX).</summary>
    private const int MaxPieces = 512;

    private byte[] _headers = new byte[16 << 10];
    private int _used;
    /// <summary>Start of the header bytes that are not yet a piece.</summary>
    private int _open;
    /// <summary>In order; Array null: a range of the header buffer (which may still be replaced when it grows).</summary>
    private readonly List<(byte[]? Array, int Start, int Length)> _pieces = new();
    private readonly List<ArraySegment<byte>> _segments = new();

    /// <summary>The next reply may not fit in one write: send first.</summary>
    public bool Full => _pieces.Count >= MaxPieces - 2;

    public Span<byte> GetSpan(int length)
    {
        if (_used + length > _headers.Length)
        {
            // Pieces name header ranges by offset, so a larger buffer holding the same bytes serves them as well.
            var larger = new byte[Math.Max(2 * _headers.Length, _used + length)];
            _headers.AsSpan(0, _used).CopyTo(larger);
            _headers = larger;
        }
        return _headers.AsSpan(_used, length);
    }

    public void Advance(int length) => _used += length;

    public void AddData(byte[] data, int start, int length)
    {
        CloseHeaderPiece();
        if (length > 0) _pieces.Add((data, start, length));
    }

    /// <summary>Sends the batch: as much as the connection takes at once from the calling thread, the rest
    /// asynchronously (the returned task is then not complete).</summary>
    public ValueTask SendAsync()
    {
        CloseHeaderPiece();
        _segments.Clear();
        long total = 0;
        foreach (var (array, start, length) in _pieces)
        {
            _segments.Add(new ArraySegment<byte>(array ?? _headers, start, length));
            total += length;
        }
        if (total == 0) return default;
        long sent = writer.TrySend(_segments);
        if (sent >= total) return default;
        DropSent(sent);
        return writer.WriteAsync(_segments);
    }

    /// <summary>Takes the first <paramref name="sent"/> bytes off the segments.</summary>
    private void DropSent(long sent)
    {
        int whole = 0;
        while (sent >= _segments[whole].Count)
        {
            sent -= _segments[whole].Count;
            whole++;
        }
        _segments.RemoveRange(0, whole);
        _segments[0] = _segments[0].Slice((int)sent);
    }

    public void Clear()
    {
        _pieces.Clear();
        _segments.Clear();
        _used = _open = 0;
    }

    private void CloseHeaderPiece()
    {
        if (_used == _open) return;
        _pieces.Add((null, _open, _used - _open));
        _open = _used;
    }
}
