namespace Strata.Daemon.Transactions;

/// <summary>
/// One action of a transaction, with QEMU's TransactionActionDrv's four steps. Every action prepares in order; if
/// one fails, those already prepared abort (newest first) and the failure is the command's; otherwise all commit in
/// order. Every prepared action is cleaned at the end either way.
/// </summary>
internal abstract class TransactionAction
{
    /// <summary>Checks the action and does what later actions must already see; throws to fail the transaction.</summary>
    public abstract void Prepare();

    /// <summary>Makes the action final, once every action prepared.</summary>
    public virtual void Commit() { }

    /// <summary>Undoes what <see cref="Prepare"/> did, when a later action failed.</summary>
    public virtual void Abort() { }

    /// <summary>Lets go of whatever the action held for the transaction's duration.</summary>
    public virtual void Clean() { }
}

/// <summary>"abort": fails the transaction on purpose (for testing the others' abort paths).</summary>
internal sealed class AbortAction : TransactionAction
{
    public override void Prepare() => throw Protocol.Qmp.QmpException.Generic("Transaction aborted using Abort action");
}
