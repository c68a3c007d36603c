using System.Buffers;
using System.IO.Pipelines;
using System.Text;

namespace Strata.Protocol.Qmp;

/// <summary>The line is longer than the reader accepts: the peer is broken or hostile, the connection unusable.</summary>
public sealed class QmpLineTooLongException(int limit)
    : IOException($"QMP server sent a line longer than {limit} bytes (the limit a QMP server puts on its own input); connection closed")
{
    public int Limit { get; } = limit;
}

/// <summary>
/// Reads a QMP peer's messages, one per line (QEMU ends each with CRLF), from a pipe, never holding more than
/// <c>maxLine</c> bytes of one line: a server that never ends its line cannot make the client buffer without
/// bound. The limit is the one QMP servers put on their input (<see cref="QmpFramer.DefaultMaxMessage"/>).
/// </summary>
public sealed class QmpLineReader(PipeReader input, int maxLine = QmpFramer.DefaultMaxMessage)
{
    private static readonly UTF8Encoding Utf8 = new(false);

    /// <summary>The next line without its terminator, or null at the end of the stream (a last unterminated
    /// line is returned first). Throws <see cref="QmpLineTooLongException"/> past the limit.</summary>
    public async ValueTask<string?> ReadLineAsync(CancellationToken ct = default)
    {
        while (true)
        {
            var result = await input.ReadAsync(ct);
            var buffer = result.Buffer;
            var reader = new SequenceReader<byte>(buffer);
            if (reader.TryReadTo(out ReadOnlySequence<byte> line, (byte)'\n'))
            {
                if (line.Length > maxLine) throw new QmpLineTooLongException(maxLine);
                string text = Decode(line);
                input.AdvanceTo(reader.Position);
                return text;
            }
            if (buffer.Length > maxLine) throw new QmpLineTooLongException(maxLine);
            if (result.IsCompleted)
            {
                string? last = buffer.IsEmpty ? null : Decode(buffer);
                input.AdvanceTo(buffer.End);
                return last;
            }
            input.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    private static string Decode(ReadOnlySequence<byte> line)
    {
        string text = Utf8.GetString(line);
        return text.EndsWith('\r') ? text[..^1] : text;
    }
}
