namespace Strata.Block.Jobs;

/// <summary>A job whose work is one function (blockdev-create and other one-shot operations).</summary>
public sealed class DelegateJob(string id, string type, bool autoFinalize, bool autoDismiss, Func<CancellationToken, Task> work)
    : Job(id, type, autoFinalize, autoDismiss)
{
    protected internal override async Task RunAsync(CancellationToken cancellationToken)
    {
        SetTotal(1);
        await work(cancellationToken);
        AddProgress(1);
    }
}
