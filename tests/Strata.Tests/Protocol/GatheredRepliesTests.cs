using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Protocol;
using Strata.Protocol.Nbd;
using Strata.Tests.Block;

namespace Strata.Tests.Protocol;

/// <summary>Replies sent as gathered writes: the bytes and their order are what the pipe would carry, read data is
/// sent from the request's own buffer, and a read whose reply is more pieces than one sendmsg takes comes back
/// whole over a real socket.</summary>
public class GatheredRepliesTests
{
    /// <summary>Takes <paramref name="atOnce"/> bytes of each send at once, the rest as the asynchronous send.</summary>
    /// <summary>A reply header of <paramref name="length"/> bytes, each <paramref name="fill"/>, built in place.</summary>
    private static void Header(GatheredReplies batch, int length, byte fill)
    {
        batch.GetSpan(length).Fill(fill);
        batch.Advance(length);
    }

    private sealed class CapturingWriter(long atOnce = 0) : IGatheredWriter
    {
        public readonly List<byte> Bytes = new();
        public readonly List<ArraySegment<byte>> Segments = new();
        public int AsyncWrites;

        public long TrySend(IList<ArraySegment<byte>> buffers)
        {
            long left = atOnce;
            foreach (var b in buffers)
            {
                if (left == 0) break;
                var taken = b.Slice(0, (int)Math.Min(left, b.Count));
                Segments.Add(taken);
                Bytes.AddRange(taken);
                left -= taken.Count;
            }
            return atOnce - left;
        }

        /// <summary>Completes an asynchronous send (sends complete at once until this is set).</summary>
        public TaskCompletionSource? SendWaitsFor;

        public async ValueTask WriteAsync(IList<ArraySegment<byte>> buffers)
        {
            AsyncWrites++;
            if (SendWaitsFor is not null) await SendWaitsFor.Task;
            foreach (var b in buffers)
            {
                Segments.Add(b);
                Bytes.AddRange(b);
            }
        }
    }

    [Theory]
    [InlineData(1, 1)]     // one byte now, the rest later
    [InlineData(13, 1)]    // exactly the first header piece
    [InlineData(20, 1)]    // part way into the data
    [InlineData(63, 1)]    // ends exactly where the data ends
    [InlineData(1000, 0)]  // all of it at once: no asynchronous send
    public async Task WhatTheConnectionDoesNotTakeAtOnceFollowsInOrder(long atOnce, int asyncWrites)
    {
        var writer = new CapturingWriter(atOnce) { SendWaitsFor = new TaskCompletionSource() };
        var batch = new GatheredReplies(writer);
        var data = new byte[50];
        new Random(5).NextBytes(data);
        Header(batch, 13, 1);
        batch.AddData(data, 0, 50);
        Header(batch, 7, 2);
        var send = batch.SendAsync();
        Assert.Equal(asyncWrites == 0, send.IsCompletedSuccessfully); // the caller waits only for what was not taken
        writer.SendWaitsFor.SetResult();
        await send;

        var expected = Enumerable.Repeat((byte)1, 13).Concat(data).Concat(Enumerable.Repeat((byte)2, 7)).ToList();
        Assert.Equal(expected, writer.Bytes);
        Assert.Equal(asyncWrites, writer.AsyncWrites);
    }

    [Fact]
    public async Task HeadersAndDataGoOutInOrderAndDataIsNotCopied()
    {
        var writer = new CapturingWriter();
        var batch = new GatheredReplies(writer);
        var data = new byte[100];
        new Random(3).NextBytes(data);
        Header(batch, 3, 1);
        batch.AddData(data, 10, 50);
        // A header larger than the buffer holds: it grows, and the earlier header bytes stay where they were named.
        Header(batch, 40 << 10, 2);
        Header(batch, 2, 3);
        batch.AddData(data, 0, 0);
        await batch.SendAsync();

        var expected = new List<byte> { 1, 1, 1 };
        expected.AddRange(data.AsSpan(10, 50).ToArray());
        expected.AddRange(Enumerable.Repeat((byte)2, 40 << 10));
        expected.AddRange([3, 3]);
        Assert.Equal(expected, writer.Bytes);
        Assert.Equal(3, writer.Segments.Count); // the empty data piece is left out; adjacent header bytes are one piece
        Assert.Same(data, writer.Segments[1].Array);
        Assert.Equal(10, writer.Segments[1].Offset);

        batch.Clear();
        writer.Bytes.Clear();
        Header(batch, 1, 9);
        await batch.SendAsync();
        Assert.Equal([9], writer.Bytes);
    }

    [Fact]
    public async Task AReadOfThousandsOfDataAndHoleChunksComesBackWholeOverASocket()
    {
        using var dir = new TempDir();
        const int cluster = 512;
        using (var image = Qcow2Image.Create(dir["d.qcow2"], new Qcow2CreateOptions { Size = 4 << 20, ClusterSize = cluster }))
        {
            // Every other cluster written: a structured read of the whole disk is 8192 chunks, data and hole.
            var fill = new byte[cluster];
            for (long c = 0; c < (4 << 20) / cluster; c += 2)
            {
                fill.AsSpan().Fill((byte)(1 + c % 250));
                image.Write(c * cluster, fill);
            }
        }
        using var opened = Qcow2Image.Open(HostFile.Open(dir["d.qcow2"], readOnly: true));
        await using var server = NbdServer.ListenUnix(dir["s.nbd"]);
        server.AddExport(new NbdExport("e", "e", null, opened, writable: false, [], allocationDepth: false));
        server.Start();
        await using var client = await NbdClient.ConnectUnixAsync(dir["s.nbd"], "e");

        var whole = new byte[4 << 20];
        var again = new byte[1 << 20];
        // Several in flight, so that replies share a batch.
        await Task.WhenAll(client.ReadAsync(0, whole), client.ReadAsync(1 << 20, again));
        for (long c = 0; c < (4 << 20) / cluster; c++)
        {
            byte want = c % 2 == 0 ? (byte)(1 + c % 250) : (byte)0;
            Assert.True(whole.AsSpan((int)(c * cluster), cluster).IndexOfAnyExcept(want) < 0, $"cluster {c}");
        }
        Assert.True(again.AsSpan().SequenceEqual(whole.AsSpan(1 << 20, 1 << 20)));
    }

    /// <summary>More reply data in flight than the socket's send buffer holds: the threads that answer send what the
    /// socket takes and leave the rest to an asynchronous send; every reply still arrives whole and in one piece.</summary>
    [Fact]
    public async Task MoreReplyDataThanTheSendBufferHoldsComesBackIntact()
    {
        using var dir = new TempDir();
        const int size = 16 << 20;
        var content = new byte[size];
        new Random(11).NextBytes(content);
        using (var image = Qcow2Image.Create(dir["d.qcow2"], new Qcow2CreateOptions { Size = size }))
            image.Write(0, content);
        using var opened = Qcow2Image.Open(HostFile.Open(dir["d.qcow2"], readOnly: true));
        await using var server = NbdServer.ListenUnix(dir["s.nbd"]);
        server.AddExport(new NbdExport("e", "e", null, opened, writable: false, [], allocationDepth: false));
        server.Start();
        await using var client = await NbdClient.ConnectUnixAsync(dir["s.nbd"], "e");

        var random = new Random(12);
        for (int round = 0; round < 4; round++)
        {
            // 48 reads of up to 1 MiB at odd offsets: up to 48 MiB due at once, against a 4 MiB send buffer.
            var reads = Enumerable.Range(0, 48).Select(_ =>
            {
                int length = random.Next(1, 1 << 20);
                long offset = random.NextInt64(0, size - length);
                return (Offset: offset, Buffer: new byte[length]);
            }).ToList();
            await Task.WhenAll(reads.Select(r => client.ReadAsync(r.Offset, r.Buffer)));
            foreach (var (offset, buffer) in reads)
                Assert.True(buffer.AsSpan().SequenceEqual(content.AsSpan((int)offset, buffer.Length)), $"read at {offset} of {buffer.Length}");
        }
    }
}
