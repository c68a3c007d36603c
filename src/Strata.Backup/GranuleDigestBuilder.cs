using System.Security.Cryptography;
using Strata.Formats.Backup;

namespace Strata.Backup;

/// <summary>
/// Builds a point's granule digests from the point's own layer, fed in order from offset 0 to the disk's end as
/// data, zero and unallocated ranges (how <see cref="ImageDigest.TopLayer"/> walks a backup file). A granule the layer
/// covers whole is hashed (the zero digest, without hashing, when it is all zero ranges); a granule it leaves
/// unallocated keeps the parent point's digest — carried over, so an incremental re-hashes only what it copied. With
/// no parent (a full) unallocated reads as zeros. A granule partly in the layer and partly below it (possible only
/// when granules are larger than the file's clusters) is left for the caller to hash from the whole chain
/// (<see cref="NeedsChain"/>).
/// </summary>
public sealed class GranuleDigestBuilder
{
    private readonly GranuleDigests _result;
    private readonly GranuleDigests? _parent;
    private readonly Dictionary<int, byte[]> _zeroDigests = [];
    private readonly List<int> _needsChain = [];
    private readonly IncrementalHash _partial = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
    private static readonly byte[] Zeros = new byte[1 << 16];

    /// <summary>Where the next range must start.</summary>
    private long _pos;
    /// <summary>What the granule under construction has had so far (when a range ended inside it).</summary>
    private bool _partialOpen, _partialData, _partialUnallocated, _partialLayer;

    public GranuleDigestBuilder(long diskSize, long granularity, GranuleDigests? parent)
    {
        if (parent is not null && (parent.DiskSize != diskSize || parent.Granularity != granularity))
            throw new ArgumentException($"the parent's digests cover {parent.DiskSize} bytes at {parent.Granularity}, not {diskSize} at {granularity}", nameof(parent));
        _result = new GranuleDigests(diskSize, granularity);
        _parent = parent;
    }

    /// <summary>Granules to hash from the whole chain before <see cref="Finish"/>.</summary>
    public IReadOnlyList<int> NeedsChain => _needsChain;

    public void Data(long offset, ReadOnlySpan<byte> data) => Feed(offset, data.Length, Kind.Data, data);

    /// <summary>Whether a data range is exactly the next granule, whole: then <see cref="WholeGranule"/> can take it
    /// by its SHA-256.</summary>
    public bool IsWholeGranule(long offset, long length)
    {
        if (_partialOpen || offset != _pos || offset >= _result.DiskSize || offset % _result.Granularity != 0) return false;
        return length == _result.LengthOf((int)(offset / _result.Granularity));
    }

    /// <summary>A data range that is exactly one whole granule (<see cref="IsWholeGranule"/>), given by the SHA-256 of
    /// its bytes that the caller computed for its own record: the granule's digest comes from it, unhashed again.</summary>
    public void WholeGranule(long offset, long length, ReadOnlySpan<byte> sha256)
    {
        if (!IsWholeGranule(offset, length)) throw new InvalidOperationException($"range {offset}+{length} is not the next whole granule (next: {_pos}, granules of {_result.Granularity})");
        _result.Set((int)(offset / _result.Granularity), GranuleDigests.FromSha256(sha256));
        _pos = offset + length;
    }

    public void Zero(long offset, long length) => Feed(offset, length, Kind.Zero, default);

    public void Unallocated(long offset, long length) => Feed(offset, length, Kind.Unallocated, default);

    private enum Kind { Data, Zero, Unallocated }

    private void Feed(long offset, long length, Kind kind, ReadOnlySpan<byte> data)
    {
        if (offset != _pos) throw new InvalidOperationException($"ranges must be fed in order: {offset} where {_pos} was next");
        if (offset + length > _result.DiskSize) throw new InvalidOperationException($"range {offset}+{length} is past the disk's end ({_result.DiskSize})");
        // Without a parent, unallocated reads as zeros.
        if (kind == Kind.Unallocated && _parent is null) kind = Kind.Zero;
        long g = _result.Granularity;
        long end = offset + length;
        Span<byte> digest = stackalloc byte[GranuleDigests.DigestSize];
        while (_pos < end)
        {
            int granule = (int)(_pos / g);
            long granuleStart = _result.OffsetOf(granule), granuleEnd = granuleStart + _result.LengthOf(granule);
            if (!_partialOpen && _pos == granuleStart && end >= granuleEnd)
            {
                // The granule is whole in this range: the fast paths.
                switch (kind)
                {
                    case Kind.Data:
                        GranuleDigests.Hash(data.Slice((int)(_pos - offset), (int)(granuleEnd - granuleStart)), digest);
                        _result.Set(granule, digest);
                        break;
                    case Kind.Zero: _result.Set(granule, ZeroDigest((int)(granuleEnd - granuleStart))); break;
                    case Kind.Unallocated: _result.Set(granule, _parent![granule]); break;
                }
                _pos = granuleEnd;
                continue;
            }
            // A piece of a granule: add it to the granule under construction.
            long pieceEnd = Math.Min(end, granuleEnd);
            _partialOpen = true;
            switch (kind)
            {
                case Kind.Data:
                    _partial.AppendData(data.Slice((int)(_pos - offset), (int)(pieceEnd - _pos)));
                    _partialData = _partialLayer = true;
                    break;
                case Kind.Zero:
                    for (long left = pieceEnd - _pos; left > 0; left -= Zeros.Length) _partial.AppendData(Zeros, 0, (int)Math.Min(left, Zeros.Length));
                    _partialLayer = true;
                    break;
                case Kind.Unallocated:
                    _partialUnallocated = true;
                    break;
            }
            _pos = pieceEnd;
            if (_pos == granuleEnd) CloseGranule(granule);
        }
    }

    private void CloseGranule(int granule)
    {
        var full = _partial.GetHashAndReset();
        if (_partialUnallocated && !_partialLayer) _result.Set(granule, _parent![granule]);
        else if (_partialUnallocated) _needsChain.Add(granule);
        else if (!_partialData) _result.Set(granule, ZeroDigest(_result.LengthOf(granule)));
        else _result.Set(granule, full.AsSpan(0, GranuleDigests.DigestSize));
        _partialOpen = _partialData = _partialUnallocated = _partialLayer = false;
    }

    private byte[] ZeroDigest(int length)
    {
        if (!_zeroDigests.TryGetValue(length, out var digest)) _zeroDigests[length] = digest = GranuleDigests.ZeroDigest(length);
        return digest;
    }

    /// <summary>The digests, once every range is fed; <paramref name="readChain"/> reads a granule through the whole
    /// chain (called only for <see cref="NeedsChain"/>).</summary>
    public GranuleDigests Finish(Action<long, Span<byte>>? readChain = null)
    {
        if (_pos != _result.DiskSize) throw new InvalidOperationException($"the ranges end at {_pos}, before the disk's end ({_result.DiskSize})");
        if (_needsChain.Count > 0)
        {
            if (readChain is null) throw new InvalidOperationException($"{_needsChain.Count} granule(s) need the chain below the layer");
            var buffer = new byte[_result.Granularity];
            foreach (int granule in _needsChain)
            {
                var span = buffer.AsSpan(0, _result.LengthOf(granule));
                readChain(_result.OffsetOf(granule), span);
                _result.Set(granule, GranuleDigests.Hash(span));
            }
        }
        _partial.Dispose();
        return _result;
    }
}
