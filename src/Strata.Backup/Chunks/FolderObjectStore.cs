using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;

namespace Strata.Backup.Chunks;

/// <summary>
/// An object store on a local folder: a key is a path under the root. A create-only put writes a hidden temporary
/// file, fsyncs it and links it into place with link(2), which fails when the name exists, so two writers racing for
/// one key get exactly one winner and a reader never sees half an object. (.NET's no-overwrite File.Move checks for
/// the destination and then renames over it: racing writers all "won", the contract tests showed.) Every put ends
/// with an fsync of the object's folder, so a put that returned survives a power cut.
/// </summary>
public sealed partial class FolderObjectStore : IObjectStore
{
    private const string TempMarker = ".tmp-";
    private const int EEXIST = 17;

    public FolderObjectStore(string root)
    {
        Root = Path.GetFullPath(root);
    }

    public string Root { get; }
    public string Location => Root;

    private string PathOf(string key)
    {
        if (key.Length == 0 || key.StartsWith('/') || key.Split('/').Any(part => part is "" or "." or ".."))
            throw new ArgumentException($"bad object key '{key}'", nameof(key));
        return Path.Combine(Root, key);
    }

    private static string WriteTemp(string path, ReadOnlySpan<byte> data)
    {
        Directory.CreateDirectory(Path.GetDirectoryName(path)!);
        string tmp = Path.Combine(Path.GetDirectoryName(path)!, TempMarker + Guid.NewGuid().ToString("N"));
        using (var fs = new FileStream(tmp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
        {
            fs.Write(data);
            fs.Flush(flushToDisk: true);
        }
        return tmp;
    }

    public Task<bool> PutIfAbsentAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default)
    {
        string path = PathOf(key);
        if (File.Exists(path)) return Task.FromResult(false);
        string tmp = WriteTemp(path, data.Span);
        try
        {
            if (link(tmp, path) == 0)
            {
                // The new name itself: a point's index is its commit, and the chunks it names come before it.
                Durability.SyncDirectory(Path.GetDirectoryName(path)!);
                return Task.FromResult(true);
            }
            int errno = Marshal.GetLastPInvokeError();
            if (errno == EEXIST) return Task.FromResult(false);
            throw new IOException($"cannot create {path}: {Marshal.GetPInvokeErrorMessage(errno)}");
        }
        finally
        {
            File.Delete(tmp);
        }
    }

    public Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default)
    {
        string path = PathOf(key);
        File.Move(WriteTemp(path, data.Span), path, overwrite: true);
        Durability.SyncDirectory(Path.GetDirectoryName(path)!);
        return Task.CompletedTask;
    }

    public async Task<byte[]?> GetAsync(string key, CancellationToken cancel = default)
    {
        try
        {
            return await File.ReadAllBytesAsync(PathOf(key), cancel);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            return null;
        }
    }

    public Task<StoredObject?> HeadAsync(string key, CancellationToken cancel = default)
    {
        var info = new FileInfo(PathOf(key));
        return Task.FromResult(info.Exists ? new StoredObject(key, info.Length, info.LastWriteTimeUtc) : null);
    }

    public async IAsyncEnumerable<StoredObject> ListAsync(string prefix, [EnumeratorCancellation] CancellationToken cancel = default)
    {
        // The folder holding the prefix's last complete segment bounds the walk.
        int slash = prefix.LastIndexOf('/');
        string start = slash < 0 ? Root : Path.Combine(Root, prefix[..slash]);
        if (!Directory.Exists(start)) yield break;
        var found = new List<StoredObject>();
        foreach (var file in new DirectoryInfo(start).EnumerateFiles("*", SearchOption.AllDirectories))
        {
            if (file.Name.StartsWith(TempMarker, StringComparison.Ordinal)) continue;
            string key = Path.GetRelativePath(Root, file.FullName).Replace(Path.DirectorySeparatorChar, '/');
            if (!key.StartsWith(prefix, StringComparison.Ordinal)) continue;
            try
            {
                found.Add(new StoredObject(key, file.Length, file.LastWriteTimeUtc));
            }
            catch (FileNotFoundException)
            {
                // Deleted between the folder read and its stat (a lease released meanwhile): as in an S3 listing
                // taken a moment later, it is simply not there.
            }
        }
        found.Sort((a, b) => string.CompareOrdinal(a.Key, b.Key));
        foreach (var o in found)
        {
            cancel.ThrowIfCancellationRequested();
            yield return o;
        }
        await Task.CompletedTask;
    }

    public Task DeleteAsync(string key, CancellationToken cancel = default)
    {
        try
        {
            File.Delete(PathOf(key));
        }
        catch (DirectoryNotFoundException)
        {
            // File.Delete tolerates a missing file but not a missing folder: neither leaves anything to delete.
        }
        return Task.CompletedTask;
    }

    public void Dispose() { }

    [LibraryImport("libc", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int link(string existing, string newName);
}
