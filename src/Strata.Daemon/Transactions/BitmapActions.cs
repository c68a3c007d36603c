using System.Text.Json.Nodes;
using Strata.Block.Bitmaps;
using Strata.Daemon.Commands;
using Strata.Protocol.Qmp;

namespace Strata.Daemon.Transactions;

/// <summary>block-dirty-bitmap-add: added at prepare (later actions can use it), removed again on abort.</summary>
internal sealed class BitmapAddAction(QmpCommand add, BitmapSet set, JsonObject data) : TransactionAction
{
    public override void Prepare() => add.Run(data);

    public override void Abort()
    {
        try { set.Remove(ArgSchema.Str(data, "name")); } catch (BitmapException) { }
    }
}

/// <summary>block-dirty-bitmap-remove: checked at prepare, removed at commit (later actions still see it).</summary>
internal sealed class BitmapRemoveAction(BitmapSet set, JsonObject data) : TransactionAction
{
    private DirtyBitmap? _bitmap;

    public override void Prepare()
    {
        var b = set.Get(ArgSchema.Str(data, "name"));
        if (b.Busy || b.Successor is not null) throw QmpException.Generic($"Bitmap '{b.Name}' is currently in use by another operation and cannot be used");
        if (b.ReadOnly) throw QmpException.Generic($"Bitmap '{b.Name}' is readonly and cannot be modified");
        _bitmap = b;
    }

    public override void Commit() => set.Remove(_bitmap!.Name!);
}

/// <summary>block-dirty-bitmap-clear and -merge: the target's bits change at prepare; abort puts back the bits it
/// had before.</summary>
internal sealed class BitmapContentAction(QmpCommand command, BitmapSet set, JsonObject data) : TransactionAction
{
    private DirtyBitmap? _target;
    private HierarchicalBitmap? _saved;

    public override void Prepare()
    {
        var target = set.Get(ArgSchema.Str(data, command.Name == "block-dirty-bitmap-clear" ? "name" : "target"));
        var saved = target.Bits.Clone();
        command.Run(data);
        (_target, _saved) = (target, saved);
    }

    public override void Abort()
    {
        _target!.Bits.Clear();
        _target.Bits.Merge(_saved!);
    }
}

/// <summary>block-dirty-bitmap-enable and -disable: recording switches at prepare; abort switches it back.</summary>
internal sealed class BitmapRecordingAction(QmpCommand command, BitmapSet set, JsonObject data) : TransactionAction
{
    private DirtyBitmap? _bitmap;
    private bool _wasEnabled;

    public override void Prepare()
    {
        var b = set.Get(ArgSchema.Str(data, "name"));
        bool was = b.Enabled;
        command.Run(data);
        (_bitmap, _wasEnabled) = (b, was);
    }

    public override void Abort()
    {
        if (_wasEnabled) set.Enable(_bitmap!.Name!);
        else set.Disable(_bitmap!.Name!);
    }
}
