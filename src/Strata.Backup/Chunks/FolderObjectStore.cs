using System.Runtime.CompilerServices;

namespace Strata.Backup.Chunks;

/// <summary>
/// An object store on a local folder: a key is a path under the root. A create-only put writes a hidden temporary
/// file, fsyncs it and links it into place without replacing (.NET's no-overwrite move is link + unlink on Linux),
/// so two writers racing for one key get exactly one winner and a reader never sees half an object.
/// </summary>
public sealed class FolderObjectStore : IObjectStore
{
    private const string TempMarker = ".tmp-";

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
            File.Move(tmp, path, overwrite: false);
            return Task.FromResult(true);
        }
        catch (IOException) when (File.Exists(path))
        {
            File.Delete(tmp);
            return Task.FromResult(false);
        }
    }

    public Task PutAsync(string key, ReadOnlyMemory<byte> data, CancellationToken cancel = default)
    {
        string path = PathOf(key);
        File.Move(WriteTemp(path, data.Span), path, overwrite: true);
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
            if (key.StartsWith(prefix, StringComparison.Ordinal)) found.Add(new StoredObject(key, file.Length, file.LastWriteTimeUtc));
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
        File.Delete(PathOf(key));
        return Task.CompletedTask;
    }

    public void Dispose() { }
}
