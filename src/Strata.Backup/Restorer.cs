using Strata.Block;
using Strata.Block.Operations;
using Strata.Block.Qcow2;

namespace Strata.Backup;

/// <summary>Restores one point of one disk into a new qcow2 or raw file: the chain read as one disk.</summary>
public static class Restorer
{
    public static void Restore(Repository repo, BackupManifest point, string to, string format, Action<long, long>? progress = null)
    {
        if (format is not ("qcow2" or "raw")) throw new BackupException($"unknown output format '{format}'", "use -O qcow2 or -O raw", BackupExitCodes.Usage);
        if (File.Exists(to)) throw new BackupException($"'{to}' already exists", "restore into a new file; a restore never overwrites", BackupExitCodes.Usage);
        repo.ChainOf(point); // a broken chain fails here with a clear message, before anything is written
        using var source = ImageOpener.Open(repo.FilePath(point), "qcow2", readOnly: true);
        string partial = to + Repository.PartialSuffix;
        try
        {
            using (BlockImage target = format == "qcow2" ? Qcow2Image.Create(partial, new Qcow2CreateOptions { Size = source.Size }) : RawImage.Create(partial, source.Size))
            {
                ImageConverter.Convert([source], target, new ConvertOptions { Progress = progress });
                target.Flush();
            }
            File.Move(partial, to);
        }
        finally
        {
            File.Delete(partial);
        }
    }
}
