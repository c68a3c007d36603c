using Strata.Block;
using Strata.Block.Qcow2;
using Strata.Formats.Qcow2;

namespace Strata.Tests.Block;

/// <summary>
/// A property-test loop over mutated real images (the corpus was written by qemu-img and qemu-io): flipped
/// bytes in the header, extensions and tables, truncation, absurd values. Opening, reading, mapping and
/// checking may fail only with the block layer's own errors — never another exception, hang or huge allocation.
/// </summary>
public class FuzzTests
{
    public static TheoryData<string> Corpus()
    {
        var data = new TheoryData<string>();
        foreach (var f in Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "Corpus"), "*.qcow2").Order())
            data.Add(Path.GetFileName(f));
        return data;
    }

    [Theory]
    [MemberData(nameof(Corpus))]
    public void CorpusImagesOpenCleanly(string name)
    {
        using var image = ImageOpener.Open(Path.Combine(AppContext.BaseDirectory, "Corpus", name), openBacking: false);
        Exercise(image);
        var report = ((Qcow2Image)image).Check(RepairMode.None);
        Assert.True(report.Corruptions == 0 && report.Leaks == 0, string.Join("\n", report.Messages));
    }

    [Theory]
    [MemberData(nameof(Corpus))]
    public void MutatedImagesFailOnlyWithClearErrors(string name)
    {
        var original = File.ReadAllBytes(Path.Combine(AppContext.BaseDirectory, "Corpus", name));
        int seed = int.TryParse(Environment.GetEnvironmentVariable("STRATA_FUZZ_SEED"), out int s) ? s : 1;
        var rng = new Random(seed * 31 + name.Length * 7 + name[0]);
        using var dir = new TempDir();
        string path = dir["fuzz.qcow2"];
        int opened = 0;
        int iterations = int.TryParse(Environment.GetEnvironmentVariable("STRATA_FUZZ_ITERATIONS"), out int n) ? n : 250;
        for (int iteration = 0; iteration < iterations; iteration++)
        {
            var bytes = Mutate(original, rng);
            File.WriteAllBytes(path, bytes);
            try
            {
                using var image = ImageOpener.Open(path, "qcow2", readOnly: true, openBacking: false);
                opened++;
                Exercise(image);
                ((Qcow2Image)image).Check(RepairMode.None);
            }
            catch (BlockException)
            {
            }
            catch (ImageFormatException)
            {
            }
        }
        Assert.True(opened > 0, "some mutations must leave an openable image, or the loop tests nothing past the header");
    }

    private static void Exercise(BlockImage image)
    {
        long limit = Math.Min(image.Size, 4 << 20);
        var buf = new byte[64 << 10];
        for (long off = 0; off < limit; off += buf.Length)
            image.Read(off, buf.AsSpan(0, (int)Math.Min(buf.Length, limit - off)));
        for (long off = 0; off < limit;)
        {
            var ext = image.GetLayerStatus(off, limit - off);
            Assert.True(ext.Length > 0);
            off += ext.Length;
        }
    }

    private static byte[] Mutate(byte[] original, Random rng)
    {
        var bytes = (byte[])original.Clone();
        int kind = rng.Next(5);
        int mutations = rng.Next(1, 6);
        for (int m = 0; m < mutations; m++)
        {
            int limit = kind switch
            {
                0 => Math.Min(bytes.Length, 120),   // fixed header fields
                1 => Math.Min(bytes.Length, 4096),  // header + extensions + early tables
                _ => bytes.Length,
            };
            int pos = rng.Next(limit);
            switch (rng.Next(4))
            {
                case 0: bytes[pos] ^= (byte)(1 << rng.Next(8)); break;
                case 1: bytes[pos] = (byte)rng.Next(256); break;
                case 2: bytes[pos] = 0xff; break;
                default: bytes[pos] = 0; break;
            }
        }
        if (kind == 4) Array.Resize(ref bytes, rng.Next(bytes.Length));
        return bytes;
    }
}
