namespace Strata.Block;

/// <summary>
/// Shared and exclusive locks over byte ranges — QEMU's serialising requests, in small. A fleecing image reads
/// through to the source where it has nothing yet; copy-before-write fills it just before the source changes.
/// A read that has decided "read the source" must finish before the copy lands (exclusive waits for shared),
/// and a read that starts while the copy is being written must wait for it (shared waits for exclusive), or it
/// would see the source's new data.
/// </summary>
public sealed class RangeLock
{
    private readonly List<Holder> _held = [];

    private sealed class Holder(RangeLock owner, long start, long end, bool exclusive) : IDisposable
    {
        public readonly long Start = start, End = end;
        public readonly bool Exclusive = exclusive;

        public void Dispose()
        {
            lock (owner._held)
            {
                owner._held.Remove(this);
                Monitor.PulseAll(owner._held);
            }
        }
    }

    public IDisposable Shared(long offset, long length) => Acquire(offset, offset + length, exclusive: false);

    public IDisposable Exclusive(long offset, long length) => Acquire(offset, offset + length, exclusive: true);

    private Holder Acquire(long start, long end, bool exclusive)
    {
        lock (_held)
        {
            while (_held.Any(h => h.Start < end && start < h.End && (exclusive || h.Exclusive))) Monitor.Wait(_held);
            var holder = new Holder(this, start, end, exclusive);
            _held.Add(holder);
            return holder;
        }
    }
}
