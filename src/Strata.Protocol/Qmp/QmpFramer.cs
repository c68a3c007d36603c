using System.Buffers;

namespace Strata.Protocol.Qmp;

/// <summary>Why the framer gave up on the input.</summary>
public enum FrameError { None, TooLarge, TooDeep }

/// <summary>
/// Splits a QMP byte stream into JSON texts without waiting for newlines: it tracks nesting and strings, so
/// objects sent back to back are separated, and a value split across reads is completed by the next one.
/// A control character other than TAB/CR/LF resets the parser (QMP's recovery rule).
/// Pure: no I/O, no allocation except the returned frame.
/// </summary>
public sealed class QmpFramer
{
    public const int DefaultMaxMessage = 16 << 20;
    public const int DefaultMaxDepth = 1024;

    private readonly int _maxMessage;
    private readonly int _maxDepth;

    public QmpFramer(int maxMessage = DefaultMaxMessage, int maxDepth = DefaultMaxDepth)
    {
        _maxMessage = maxMessage;
        _maxDepth = maxDepth;
    }

    /// <summary>
    /// Looks for one complete JSON value at the start of <paramref name="buffer"/> (leading whitespace skipped).
    /// Returns true with the value's bytes and the position after it; false when more data is needed
    /// (<paramref name="consumed"/> then says how much leading junk can be dropped).
    /// </summary>
    public bool TryReadFrame(ReadOnlySequence<byte> buffer, out ReadOnlySequence<byte> frame, out SequencePosition consumed, out FrameError error)
    {
        frame = default;
        error = FrameError.None;
        var reader = new SequenceReader<byte>(buffer);
        // Skip whitespace and recovery control characters before a value.
        while (reader.TryPeek(out byte b) && (b is (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n' || b < 0x20 || b == 0xff))
            reader.Advance(1);
        consumed = reader.Position;
        if (reader.End) return false;
        var start = reader.Position;
        long startOffset = reader.Consumed;
        int depth = 0;
        bool inString = false, escape = false;
        byte quote = 0;
        bool scalar = false;
        while (reader.TryRead(out byte c))
        {
            if (reader.Consumed - startOffset > _maxMessage)
            {
                error = FrameError.TooLarge;
                consumed = reader.Position;
                return false;
            }
            if (c < 0x20 && c is not ((byte)'\t' or (byte)'\r' or (byte)'\n'))
            {
                // Recovery (QMP's rule; JSON strings cannot hold raw control characters either): drop everything
                // up to and including the control character and start again.
                consumed = reader.Position;
                return TryReadFrame(buffer.Slice(consumed), out frame, out consumed, out error);
            }
            if (inString)
            {
                if (escape) escape = false;
                else if (c == '\\') escape = true;
                else if (c == quote) inString = false;
                continue;
            }
            switch (c)
            {
                case (byte)'"':
                case (byte)'\'':
                    inString = true;
                    quote = c;
                    break;
                case (byte)'{':
                case (byte)'[':
                    if (scalar) return Emit(ref reader, start, buffer, out frame, out consumed, back: 1);
                    if (++depth > _maxDepth)
                    {
                        error = FrameError.TooDeep;
                        consumed = reader.Position;
                        return false;
                    }
                    break;
                case (byte)'}':
                case (byte)']':
                    if (scalar) return Emit(ref reader, start, buffer, out frame, out consumed, back: 1);
                    depth--;
                    if (depth <= 0) return Emit(ref reader, start, buffer, out frame, out consumed, back: 0);
                    break;
                case (byte)' ' or (byte)'\t' or (byte)'\r' or (byte)'\n':
                    if (depth == 0 && scalar) return Emit(ref reader, start, buffer, out frame, out consumed, back: 1);
                    break;
                default:
                    if (depth == 0) scalar = true; // a bare value at top level: frame it so it gets an error reply
                    break;
            }
        }
        return false;
    }

    private static bool Emit(ref SequenceReader<byte> reader, SequencePosition start, ReadOnlySequence<byte> buffer,
        out ReadOnlySequence<byte> frame, out SequencePosition consumed, int back)
    {
        if (back > 0) reader.Rewind(back);
        frame = buffer.Slice(start, reader.Position);
        consumed = reader.Position;
        return true;
    }
}
