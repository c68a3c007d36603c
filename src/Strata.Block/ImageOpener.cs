using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Block;

/// <summary>A backing chain that cannot be opened (loop, too deep, a layer missing); reported as it is.</summary>
public sealed class BackingChainException(string message) : BlockException(message);

/// <summary>How an opener takes QEMU's image locks (see <see cref="FileLocks"/>).</summary>
public enum ImageLocking
{
    /// <summary>No locks: the library's own files, or locking=off.</summary>
    Off,
    /// <summary>The locks qemu-img takes: a qcow2 layer keeps writers and resizers off; a raw one only reads
    /// (or writes) and shares everything.</summary>
    Normal,
    /// <summary>Like <see cref="Normal"/>, and a raw top must not change either (qemu-img convert's sources).</summary>
    Stable,
    /// <summary>Like <see cref="Normal"/> writable, and the size may change (qemu-img resize).</summary>
    Resize,
    /// <summary>-U: read while others may do anything.</summary>
    ForceShare,
    /// <summary>Only what format drivers claim for themselves: qcow2 layers lock, raw layers take nothing (a
    /// daemon's backing chain below a node nobody uses yet, as qemu-storage-daemon opens it).</summary>
    FormatOnly,
}

/// <summary>Opens images by format (probed or given) together with their whole backing chain.</summary>
public static class ImageOpener
{
    /// <summary>QEMU refuses chains deeper than this; so do we.</summary>
    public const int MaxChainDepth = 1000;

    /// <summary>Guesses the format from the first bytes: qcow2 by its magic, anything else is raw.</summary>
    public static string ProbeFormat(string path)
    {
        using var f = HostFile.Open(path, readOnly: true);
        Span<byte> head = stackalloc byte[8];
        f.Read(0, head);
        return Qcow2Header.HasMagic(head) ? "qcow2" : "raw";
    }

    /// <summary>Opens <paramref name="path"/> and its backing chain (backing files always read-only).</summary>
    public static BlockImage Open(string path, string? format = null, bool readOnly = true, bool openBacking = true,
        ImageLocking locking = ImageLocking.Off)
    {
        if (locking == ImageLocking.ForceShare && !readOnly) throw new BlockException("force-share=on can only be used with read-only images");
        var seen = new HashSet<string>(StringComparer.Ordinal);
        return OpenLayer(path, format, readOnly, openBacking, seen, 0, locking);
    }

    /// <summary>The claim an opener takes on a layer's file.</summary>
    public static LockClaim ClaimFor(string format, bool readOnly, ImageLocking locking, bool isBacking = false) => locking switch
    {
        ImageLocking.Off => LockClaim.None,
        ImageLocking.ForceShare => LockClaim.SharedRead,
        _ when format == "qcow2" => LockClaim.Qcow2(readOnly),
        ImageLocking.FormatOnly => LockClaim.None,
        // A backing file is read; others may still write it (QEMU shares that, so that a commit can).
        _ when isBacking => new(BlockPermissions.ConsistentRead, BlockPermissions.None),
        ImageLocking.Stable => new(BlockPermissions.ConsistentRead, BlockPermissions.Write),
        ImageLocking.Resize => new(BlockPermissions.ConsistentRead | BlockPermissions.Write | BlockPermissions.Resize, BlockPermissions.None),
        _ => new(BlockPermissions.ConsistentRead | (readOnly ? 0 : BlockPermissions.Write), BlockPermissions.None),
    };

    private static BlockImage OpenLayer(string path, string? format, bool readOnly, bool openBacking, HashSet<string> seen, int depth,
        ImageLocking locking)
    {
        if (depth > MaxChainDepth)
            throw new BackingChainException($"Backing chain of '{path}' is deeper than {MaxChainDepth} images");
        if (!seen.Add(Path.GetFullPath(path)))
            throw new BackingChainException($"Backing file '{path}' creates an infinite loop.");
        BlockImage image = OpenSingle(path, format, readOnly, locking, isBacking: depth > 0);
        if (!openBacking || image.BackingFileName is not { } backing) return image;
        try
        {
            string backingPath = ResolveBackingPath(path, backing);
            var backingImage = OpenLayer(backingPath, image.BackingFormat, readOnly: true, openBacking: true, seen, depth + 1,
                locking == ImageLocking.Stable ? ImageLocking.Normal : locking);
            image.ReplaceBacking(backingImage);
            return image;
        }
        catch (BackingChainException)
        {
            image.Dispose();
            throw;
        }
        catch (BlockException e)
        {
            image.Dispose();
            throw new BackingChainException($"Could not open backing file: {e.Message}");
        }
    }

    /// <summary>Opens one image without its backing chain; errors read "Could not open 'PATH': reason" as in QEMU.</summary>
    public static BlockImage OpenSingle(string path, string? format, bool readOnly, ImageLocking locking = ImageLocking.Off, bool isBacking = false)
    {
        try
        {
            format ??= ProbeFormat(path);
            var file = HostFile.Open(path, readOnly);
            try
            {
                // Locked before the format driver reads or marks anything: a qcow2 opened writable sets in-use flags.
                if (format is "raw" or "qcow2") file.SetLockClaim(ClaimFor(format, readOnly, locking, isBacking));
                return format switch
                {
                    "raw" => new RawImage(file),
                    "qcow2" => Qcow2Image.Open(file),
                    _ => throw new BlockException($"Unknown driver '{format}'"),
                };
            }
            catch
            {
                file.Dispose();
                throw;
            }
        }
        catch (ImageFormatException e)
        {
            throw new BlockException($"Could not open '{path}': {e.Message}");
        }
        catch (BlockException e) when (e is not Bitmaps.BitmapException)
        {
            throw new BlockException($"Could not open '{path}': {e.Message}");
        }
    }

    /// <summary>A relative backing name is relative to the folder of the image that names it.</summary>
    public static string ResolveBackingPath(string imagePath, string backing)
    {
        if (Path.IsPathRooted(backing)) return backing;
        string dir = Path.GetDirectoryName(imagePath) ?? "";
        return dir.Length == 0 ? backing : Path.Combine(dir, backing);
    }

    /// <summary>The layers of a chain from the top (depth 0) down.</summary>
    public static IReadOnlyList<BlockImage> Layers(BlockImage top)
    {
        var list = new List<BlockImage>();
        for (var i = top; i is not null; i = i.Backing) list.Add(i);
        return list;
    }
}
