using Strata.Block;
using Strata.Block.Graph;
using Strata.Block.Qcow2;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Commands;

/// <summary>What backup and mirror jobs share: the claim on their source node, and drive-*'s new target image.</summary>
internal static class JobNodes
{
    /// <summary>Takes a job's lock claim on its source; returns <paramref name="release"/> extended to give it back.
    /// When the claim is refused, <paramref name="release"/> runs at once (the target is let go) and the error stands.</summary>
    public static Action ClaimSource(BlockGraph graph, BlockNode source, LockClaim claim, Action release)
    {
        try
        {
            graph.AddUser(source, NodeUser.JobSource, claim);
        }
        catch
        {
            release();
            throw;
        }
        return () =>
        {
            graph.RemoveUser(source, NodeUser.JobSource, claim);
            release();
        };
    }

    /// <summary>drive-backup's target: created (absolute-paths) or opened (existing).</summary>
    public static BlockImage OpenDriveTarget(BlockNode source, string path, string sync, string? format, string mode)
    {
        if (mode == "existing")
            return ImageOpener.Open(path, format, readOnly: false, openBacking: true);
        format ??= source.Driver is "qcow2" ? "qcow2" : "raw";
        long size = source.Image.Size;
        if (format == "raw")
        {
            RawImage.Create(path, size).Dispose();
            return ImageOpener.Open(path, "raw", readOnly: false);
        }
        if (format != "qcow2") throw QmpException.Generic($"Unknown file format '{format}'");
        string? backing = null, backingFormat = null;
        if (sync == "top" && source.Image.BackingFileName is { } b)
        {
            backing = ImageOpener.ResolveBackingPath(source.FileName, b);
            backingFormat = source.Image.BackingFormat;
        }
        else if (sync == "none")
        {
            backing = Path.GetFullPath(source.FileName);
            backingFormat = source.Driver;
        }
        Qcow2Image.Create(path, new Qcow2CreateOptions { Size = size, BackingFile = backing, BackingFormat = backingFormat }).Dispose();
        return ImageOpener.Open(path, "qcow2", readOnly: false, openBacking: backing is not null);
    }
}
