using System.Numerics;
using System.Security.Cryptography;

namespace Strata.Block.Bitmaps;

/// <summary>
/// A bitmap of <see cref="Length"/> bits organised in levels: level 0 holds the bits in 64-bit words (in pages
/// allocated on first use), and each level above has one bit per word of the level below, set when that word
/// is non-zero. Searching skips empty regions through the upper levels, so finding, counting and clearing cost
/// in proportion to the set bits, not to the length. The population count is kept on every change.
/// All members are thread-safe (one lock per bitmap; callers iterate with <see cref="NextSet"/>).
/// </summary>
public sealed class HierarchicalBitmap
{
    private const int PageWordsBits = 9;              // 512 words = 4 KiB = 32768 bits per page
    private const int PageWords = 1 << PageWordsBits;

    private readonly object _lock = new();
    private readonly PagedWords _level0;              // the bits
    private readonly PagedWords[] _upper;             // summary levels; the last has one word
    private readonly long _words;
    private long _count;

    public long Length { get; }

    public HierarchicalBitmap(long length)
    {
        if (length < 0) throw new ArgumentOutOfRangeException(nameof(length));
        Length = length;
        _words = (length + 63) >> 6;
        _level0 = new PagedWords(_words);
        var upper = new List<PagedWords>();
        long below = _words;
        do
        {
            long words = Math.Max(1, (below + 63) >> 6);
            upper.Add(new PagedWords(words));
            below = words;
        } while (below > 1);
        _upper = upper.ToArray();
    }

    /// <summary>Number of set bits.</summary>
    public long Count => Interlocked.Read(ref _count);

    /// <summary>Approximate bytes of memory the bitmap uses.</summary>
    public long MemoryBytes
    {
        get
        {
            lock (_lock) return 64 + _level0.MemoryBytes + _upper.Sum(u => u.MemoryBytes);
        }
    }

    /// <summary>An array of 64-bit words stored in pages that exist only once they hold a non-zero word.</summary>
    private sealed class PagedWords
    {
        private readonly ulong[]?[] _pages;
        private readonly int _pageWords;

        public PagedWords(long length)
        {
            Length = length;
            _pageWords = (int)Math.Min(PageWords, length);
            _pages = new ulong[]?[(length + PageWords - 1) >> PageWordsBits];
        }

        public long Length { get; }

        public ulong this[long index]
        {
            get
            {
                var page = _pages[index >> PageWordsBits];
                return page is null ? 0 : page[index & (PageWords - 1)];
            }
            set
            {
                var page = _pages[index >> PageWordsBits];
                if (page is null)
                {
                    if (value == 0) return;
                    page = _pages[index >> PageWordsBits] = new ulong[_pageWords];
                }
                page[index & (PageWords - 1)] = value;
            }
        }

        public ulong[]? Page(long pageIndex) => _pages[pageIndex];

        public long PageCount => _pages.Length;

        public void Clear() => Array.Clear(_pages);

        public long MemoryBytes => 24 + _pages.Length * 8L + _pages.Count(p => p is not null) * (24L + _pageWords * 8L);
    }

    private ulong Word(long index) => _level0[index];

    /// <summary>Sets the word; keeps the summary levels and the count right. Caller holds the lock.</summary>
    private void SetWord(long index, ulong value)
    {
        ulong old = _level0[index];
        if (old == value) return;
        _level0[index] = value;
        _count += BitOperations.PopCount(value) - BitOperations.PopCount(old);
        if ((old == 0) != (value == 0)) UpdateSummary(index, value != 0);
    }

    private void UpdateSummary(long index, bool nonZero)
    {
        for (int level = 0; level < _upper.Length; level++)
        {
            long word = index >> 6;
            ulong bit = 1UL << (int)(index & 63);
            var words = _upper[level];
            ulong before = words[word];
            ulong after = nonZero ? before | bit : before & ~bit;
            words[word] = after;
            // Only a word that changed between zero and non-zero changes the level above.
            if ((before == 0) == (after == 0)) return;
            index = word;
        }
    }

    public bool Get(long bit)
    {
        CheckBit(bit);
        lock (_lock) return (Word(bit >> 6) & (1UL << (int)(bit & 63))) != 0;
    }

    /// <summary>Sets bits [start, start+count).</summary>
    public void SetRange(long start, long count) => Update(start, count, set: true);

    /// <summary>Clears bits [start, start+count).</summary>
    public void ResetRange(long start, long count) => Update(start, count, set: false);

    private void Update(long start, long count, bool set)
    {
        if (count <= 0) return;
        CheckRange(start, count);
        long end = start + count;
        lock (_lock)
        {
            long first = start >> 6, last = (end - 1) >> 6;
            long word = first;
            while (word <= last)
            {
                if (!set)
                {
                    // Skip words that are already clear: cost follows the set bits.
                    long next = NextNonZeroWord(word);
                    if (next < 0 || next > last) return;
                    word = next;
                }
                ulong mask = ulong.MaxValue;
                if (word == first) mask &= ulong.MaxValue << (int)(start & 63);
                if (word == last && (end & 63) != 0) mask &= ulong.MaxValue >> (64 - (int)(end & 63));
                ulong old = Word(word);
                SetWord(word, set ? old | mask : old & ~mask);
                word++;
            }
        }
    }

    /// <summary>Clears every bit.</summary>
    public void Clear()
    {
        lock (_lock)
        {
            _level0.Clear();
            foreach (var u in _upper) u.Clear();
            _count = 0;
        }
    }

    /// <summary>First word index ≥ <paramref name="from"/> that is non-zero, or -1. Caller holds the lock.</summary>
    private long NextNonZeroWord(long from) => NextSetIn(0, from);

    /// <summary>First set bit ≥ <paramref name="from"/> of summary level <paramref name="level"/>, whose bit j says
    /// that word j of the level below is non-zero (level 0 summarises the bitmap's own words). Caller holds the lock.</summary>
    private long NextSetIn(int level, long from)
    {
        var words = _upper[level];
        long limit = level == 0 ? _words : _upper[level - 1].Length;
        if (from >= limit) return -1;
        long word = from >> 6;
        ulong w = words[word] & (ulong.MaxValue << (int)(from & 63));
        if (w != 0) return (word << 6) + BitOperations.TrailingZeroCount(w);
        if (level + 1 >= _upper.Length)
        {
            for (long i = word + 1; i < words.Length; i++)
                if (words[i] != 0) return (i << 6) + BitOperations.TrailingZeroCount(words[i]);
            return -1;
        }
        long next = NextSetIn(level + 1, word + 1);
        return next < 0 ? -1 : (next << 6) + BitOperations.TrailingZeroCount(words[next]);
    }

    /// <summary>First set bit ≥ <paramref name="from"/>, or -1.</summary>
    public long NextSet(long from)
    {
        if (from >= Length) return -1;
        if (from < 0) from = 0;
        lock (_lock)
        {
            long word = from >> 6;
            ulong w = Word(word) & (ulong.MaxValue << (int)(from & 63));
            if (w == 0)
            {
                word = NextNonZeroWord(word + 1);
                if (word < 0) return -1;
                w = Word(word);
            }
            long bit = (word << 6) + BitOperations.TrailingZeroCount(w);
            return bit < Length ? bit : -1;
        }
    }

    /// <summary>First clear bit ≥ <paramref name="from"/>, or -1 when every bit from there on is set.</summary>
    public long NextClear(long from) => NextClear(from, Length);

    /// <summary>The first clear bit in [from, limit), or -1: a caller that only cares up to <paramref name="limit"/>
    /// does not pay for scanning a long set run past it.</summary>
    public long NextClear(long from, long limit)
    {
        if (from >= Length) return -1;
        if (from < 0) from = 0;
        long lastWord = Math.Min(_words, ((Math.Min(limit, Length) - 1) >> 6) + 1);
        lock (_lock)
        {
            for (long word = from >> 6; word < lastWord; word++)
            {
                ulong w = ~Word(word);
                if (word == from >> 6) w &= ulong.MaxValue << (int)(from & 63);
                if (w == 0) continue;
                long bit = (word << 6) + BitOperations.TrailingZeroCount(w);
                return bit < Length ? bit : -1;
            }
            return -1;
        }
    }

    /// <summary>Runs of set bits inside [start, end), as (first bit, count).</summary>
    public IEnumerable<(long Start, long Count)> SetRuns(long start = 0, long end = -1)
    {
        if (end < 0 || end > Length) end = Length;
        long pos = start;
        while (pos < end)
        {
            long s = NextSet(pos);
            if (s < 0 || s >= end) yield break;
            long e = NextClear(s, end);
            if (e < 0 || e > end) e = end;
            yield return (s, e - s);
            pos = e;
        }
    }

    /// <summary>this |= other (same length).</summary>
    public void Merge(HierarchicalBitmap other)
    {
        if (other.Length != Length) throw new ArgumentException("bitmaps differ in length");
        if (ReferenceEquals(other, this)) return;
        // Lock in a fixed order so two merges in opposite directions cannot deadlock.
        var (a, b) = LockOrder(this, other);
        lock (a._lock)
        lock (b._lock)
        {
            for (long word = other.NextNonZeroWord(0); word >= 0; word = other.NextNonZeroWord(word + 1))
                SetWord(word, Word(word) | other.Word(word));
        }
    }

    private static (HierarchicalBitmap, HierarchicalBitmap) LockOrder(HierarchicalBitmap x, HierarchicalBitmap y) =>
        System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(x) <= System.Runtime.CompilerServices.RuntimeHelpers.GetHashCode(y) ? (x, y) : (y, x);

    /// <summary>A copy of the bits.</summary>
    public HierarchicalBitmap Clone()
    {
        var copy = new HierarchicalBitmap(Length);
        copy.Merge(this);
        return copy;
    }

    /// <summary>Bytes of the serialised form: whole 64-bit words, little-endian (what QEMU hashes).</summary>
    public long SerializedWordBytes => _words * 8;

    /// <summary>Copies serialised bytes [offset, offset+dest.Length) — bit i at byte i/8, mask 1 &lt;&lt; (i%8).
    /// Bytes past the last word read as zero.</summary>
    public void CopyBytes(long offset, Span<byte> dest)
    {
        dest.Clear();
        lock (_lock)
        {
            long firstWord = offset >> 3;
            long lastWord = Math.Min(_words, (offset + dest.Length + 7) >> 3);
            for (long word = NextNonZeroWord(firstWord); word >= 0 && word < lastWord; word = NextNonZeroWord(word + 1))
            {
                // Copy the run of words in this page at once (little-endian words are the serialised bytes).
                var page = _level0.Page(word >> PageWordsBits)!;
                int start = (int)(word & (PageWords - 1));
                int end = (int)Math.Min(PageWords, lastWord - (word - start));
                var bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(page.AsSpan(start, end - start));
                long at = word * 8 - offset;
                int skip = at < 0 ? (int)-at : 0;
                int take = (int)Math.Min(bytes.Length - skip, dest.Length - Math.Max(at, 0));
                if (take > 0)
                {
                    if (!BitConverter.IsLittleEndian) throw new PlatformNotSupportedException("big-endian hosts");
                    bytes.Slice(skip, take).CopyTo(dest[(int)Math.Max(at, 0)..]);
                }
                word += end - start - 1;
            }
        }
    }

    /// <summary>ORs serialised bytes at byte <paramref name="offset"/> into the bitmap (bits past Length ignored).</summary>
    public void OrBytes(long offset, ReadOnlySpan<byte> source)
    {
        lock (_lock)
        {
            Span<byte> tmp = stackalloc byte[8];
            long firstWord = offset >> 3;
            long lastWord = Math.Min(_words - 1, (offset + source.Length - 1) >> 3);
            for (long word = firstWord; word <= lastWord; word++)
            {
                tmp.Clear();
                bool any = false;
                for (int k = 0; k < 8; k++)
                {
                    long at = word * 8 + k - offset;
                    if (at >= 0 && at < source.Length && source[(int)at] != 0) { tmp[k] = source[(int)at]; any = true; }
                }
                if (!any) continue;
                ulong v = System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(tmp);
                if (word == _words - 1 && (Length & 63) != 0) v &= ulong.MaxValue >> (64 - (int)(Length & 63));
                SetWord(word, Word(word) | v);
            }
        }
    }

    /// <summary>SHA-256 of the serialised words, as QEMU's x-debug-block-dirty-bitmap-sha256 prints it.</summary>
    public string Sha256()
    {
        using var hash = IncrementalHash.CreateHash(HashAlgorithmName.SHA256);
        var zeroPage = new byte[PageWords * 8];
        var buf = new byte[PageWords * 8];
        lock (_lock)
        {
            for (long p = 0; p < _level0.PageCount; p++)
            {
                long words = Math.Min(PageWords, _words - (p << PageWordsBits));
                var page = _level0.Page(p);
                if (page is null)
                {
                    hash.AppendData(zeroPage, 0, (int)words * 8);
                    continue;
                }
                for (int i = 0; i < words; i++) System.Buffers.Binary.BinaryPrimitives.WriteUInt64LittleEndian(buf.AsSpan(i * 8), page[i]);
                hash.AppendData(buf, 0, (int)words * 8);
            }
        }
        return Convert.ToHexStringLower(hash.GetHashAndReset());
    }

    private void CheckBit(long bit)
    {
        if (bit < 0 || bit >= Length) throw new ArgumentOutOfRangeException(nameof(bit));
    }

    private void CheckRange(long start, long count)
    {
        if (start < 0 || count < 0 || start > Length - count) throw new ArgumentOutOfRangeException(nameof(start), $"bits [{start}, +{count}) outside 0..{Length}");
    }
}
