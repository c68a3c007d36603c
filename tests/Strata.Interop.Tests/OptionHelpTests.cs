using Tools = Strata.Interop.Tests.Infra.Tools;

namespace Strata.Interop.Tests;

/// <summary>qemu-img's `-o help` (and `-o ?`, alone or among options): the option lists of create, convert and amend,
/// compared with the real qemu-img line for line; nothing is created.</summary>
public class OptionHelpTests : ScratchDirTest
{
    [Theory]
    [InlineData("create -f qcow2 -o help")]
    [InlineData("create -f qcow2 -o help NEW 1M")]
    [InlineData("create -f qcow2 -o cluster_size=4k,? NEW 1M")]
    [InlineData("create -f qcow2 -o help,cluster_size=4k NEW")]
    [InlineData("create -o help")]
    [InlineData("create -f raw -o help NEW 1M")]
    [InlineData("create -f qcow2 -u -o backing_file=NEW,,help -F qcow2 NEW 1M")]
    [InlineData("convert -O qcow2 -o help")]
    [InlineData("convert -O qcow2 -o help IMG")]
    [InlineData("convert -O qcow2 -o help IMG NEW")]
    [InlineData("amend -o help IMG")]
    [InlineData("amend -f raw -o help")]
    public void OptionHelpListsWhatQemuImgLists(string command)
    {
        string img = P("img.qcow2");
        Tools.QemuImg("create", "-q", "-f", "qcow2", img, "1M").Ok();
        var answers = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string created = P($"new-{tool}.qcow2");
            string[] args = command.Split(' ').Select(a => a.Replace("NEW", created).Replace("IMG", img)).ToArray();
            var r = tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args]);
            answers.Add($"exit {r.Exit}\n{r.Stdout}\n{r.Stderr.Replace("qemu-img:", "PROG:").Replace("strata img:", "PROG:")}".Replace(created, "NEW"));
            // Help creates nothing (the one command without help creates as qemu-img does).
            if (command.Contains("help") || command.Contains('?'))
                Assert.True(!File.Exists(created) || command.Contains(",,help"), $"{tool} created a file for: {command}");
        }
        Assert.Equal(answers[0], answers[1]);
    }

    /// <summary>A cluster size that is a number but not a usable size is the driver's to refuse, after the
    /// Formatting line; one that is no number at all is refused while the options are read.</summary>
    [Theory]
    [InlineData("4M")]
    [InlineData("3000")]
    [InlineData("abc")]
    [InlineData("4k")]
    public void ClusterSizesAreJudgedWhereQemuImgJudgesThem(string clusterSize)
    {
        var answers = new List<string>();
        foreach (var tool in new[] { "qemu", "strata" })
        {
            string img = P($"{tool}.qcow2");
            string[] args = ["create", "-f", "qcow2", "-o", $"cluster_size={clusterSize}", img, "1M"];
            var r = tool == "qemu" ? Tools.QemuImg(args) : Tools.StrataCmd(["img", .. args]);
            answers.Add($"exit {r.Exit}\n{r.Stdout}\n{r.Stderr.Replace("qemu-img:", "PROG:").Replace("strata img:", "PROG:")}".Replace(img, "IMG"));
        }
        Assert.Equal(answers[0], answers[1]);
    }
}
