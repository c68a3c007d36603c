using System.Collections.Concurrent;

namespace Strata.Block;

/// <summary>
/// The secrets a command line defined (<c>--object secret,id=ID,…</c>), by id: what an image's
/// <c>encrypt.key-secret=ID</c> refers to. Process-wide, as QEMU's object tree is.
/// </summary>
public static class Secrets
{
    private static readonly ConcurrentDictionary<string, byte[]> s_byId = new(StringComparer.Ordinal);

    public static void Define(string id, byte[] value) => s_byId[id] = value;

    /// <summary>The secret's bytes; QEMU's message when no secret has that id.</summary>
    public static byte[] Get(string id) =>
        s_byId.TryGetValue(id, out var value) ? value : throw new BlockException($"No secret with id '{id}'");
}
