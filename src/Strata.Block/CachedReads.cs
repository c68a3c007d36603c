namespace Strata.Block;

/// <summary>
/// Reads that must not wait for a disk: every host read is served from the page cache (preadv2 with RWF_NOWAIT)
/// and anything that could block instead — a metadata table not in memory, a cold page, a node whose reads go
/// elsewhere (NBD, a filter), O_DIRECT, a fault-injection or test hook, a read serialised against copy-before-write,
/// any write — gives up before it has changed anything. A server's request reader uses it to answer a read at once
/// on its own thread, which costs no hand-off to a block I/O thread; when it gives up, the read goes to one as
/// before and starts over. Metadata caches only fill on the blocking path, so nothing is left half done.
/// </summary>
public static class CachedReads
{
    [ThreadStatic] private static int t_depth;

    /// <summary>True on a thread inside <see cref="TryRun"/>.</summary>
    public static bool Active => t_depth > 0;

    /// <summary>Runs <paramref name="read"/> cached-only; false when it gave up (the caller redoes it the normal way).
    /// Any other exception passes through.</summary>
    public static bool TryRun<TOwner, TState>(TOwner owner, TState state, Action<TOwner, TState> read)
    {
        t_depth++;
        try
        {
            read(owner, state);
            return true;
        }
        catch (WouldWaitException)
        {
            return false;
        }
        finally
        {
            t_depth--;
        }
    }

    /// <summary>Throws when a cached-only read meets something that could block.</summary>
    internal static void ThrowIfActive()
    {
        if (t_depth > 0) throw new WouldWaitException();
    }

    internal static Exception WouldWait() => new WouldWaitException();

    /// <summary>Not a host error (no IOException): nothing on the way treats it as a failure of the image.</summary>
    private sealed class WouldWaitException : Exception
    {
        public WouldWaitException() : base("a cached-only read would have waited") { }
    }
}
