using System.CommandLine;
using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Json;
using Strata.Formats.Qcow2;

namespace Strata.Cli.Img;

/// <summary>`img info`: qemu-img info's options and output.</summary>
internal static partial class ImgCommands
{
    private static Command InfoCommand(TextWriter stdout, TextWriter stderr)
    {
        var format = FormatOption();
        var output = OutputOption();
        var chain = new Option<bool>("--backing-chain") { Description = "show the whole backing chain" };
        var file = new Argument<string>("filename");
        var forceShare = ForceShareOption();
        var cmd = new Command("info", "Show information about an image") { format, output, chain, forceShare, file };
        cmd.SetAction(r => Run(stderr, () =>
        {
            string mode = OutputMode(r.GetValue(output)!);
            string? requested = r.GetValue(format);
            if (requested is not null and not ("qcow2" or "raw"))
                throw new BlockException($"Could not open '{r.GetValue(file)}': Unknown driver '{requested}'");
            // Like qemu-img, open each layer alone: info needs no backing file, and --backing-chain walks the names.
            var layers = new List<BlockImage>();
            var names = new List<string>();
            using var disposer = new LayerList(layers);
            string path = r.GetValue(file)!;
            string? layerFormat = r.GetValue(format);
            var seen = new HashSet<string>(StringComparer.Ordinal);
            while (true)
            {
                seen.Add(Path.GetFullPath(path));
                // Metadata only: Debian's qemu-img 7.2 does not open an external data file for info (CVE-2024-4467).
                var layer = OpenImageLayer(path, layerFormat, readOnly: true, ReadLocking(r.GetValue(forceShare)), isBacking: layers.Count > 0,
                    metadataOnly: true);
                layers.Add(layer);
                names.Add(DisplayName(path));
                if (!r.GetValue(chain) || layer.BackingFileName is not { } backing) break;
                string next = BackingPath(path, backing);
                if (seen.Contains(Path.GetFullPath(next))) throw new BlockException($"Backing file '{next}' creates an infinite loop.");
                path = next;
                layerFormat = layer.BackingFormat;
            }
            if (mode == "json")
            {
                var dicts = layers.Select((l, i) => InfoJson(l, names[i])).ToList();
                stdout.WriteLine(QemuJson.Pretty(r.GetValue(chain) ? dicts : dicts[0]));
            }
            else
            {
                for (int i = 0; i < layers.Count; i++)
                {
                    if (i > 0) stdout.WriteLine();
                    stdout.Write(InfoHuman(layers[i], names[i]));
                }
            }
            return 0;
        }));
        return cmd;
    }

    private static string DisplayName(BlockImage image, string? givenName) => givenName ?? image.FileName;

    internal static QDict InfoJson(BlockImage image, string? givenName) => ImageInfo.Build(image, DisplayName(image, givenName));

    private static long ActualSize(BlockImage image) => ImageInfo.ActualSize(image);

    internal static string InfoHuman(BlockImage image, string? givenName)
    {
        var sb = new System.Text.StringBuilder();
        string name = DisplayName(image, givenName);
        sb.Append($"image: {name}\n");
        sb.Append($"file format: {image.FormatName}\n");
        sb.Append($"virtual size: {SizeText.Human(image.Size)} ({image.Size} bytes)\n");
        sb.Append($"disk size: {SizeText.Human(ActualSize(image))}\n");
        if (image is Qcow2Image { EncryptionFormat: not null }) sb.Append("encrypted: yes\n");
        if (image.ClusterSize > 0) sb.Append($"cluster_size: {image.ClusterSize}\n");
        if (image.BackingFileName is { } bf)
        {
            string full = ImageOpener.ResolveBackingPath(name, bf);
            sb.Append(full == bf ? $"backing file: {bf}\n" : $"backing file: {bf} (actual path: {full})\n");
            if (image.BackingFormat is { } bfmt) sb.Append($"backing file format: {bfmt}\n");
        }
        if (image is Qcow2Image q)
        {
            var h = q.Header;
            if ((h.IncompatibleFeatures & Qcow2IncompatibleFeatures.Dirty) != 0) sb.Append("cleanly shut down: no\n");
            sb.Append(SnapshotListText(image));
            sb.Append("Format specific information:\n");
            var specific = (QDict)InfoJson(image, givenName)["format-specific"]!;
            QemuHumanDump.Write(sb, (QDict)specific["data"]!, 1);
        }
        return sb.ToString();
    }
}
