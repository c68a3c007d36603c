using System.Text.Json.Nodes;
using Strata.Formats.Json;

namespace Strata.Protocol.Qmp;

/// <summary>What a QMP session talks to: the command dispatcher and the event stream of a daemon.</summary>
public interface IQmpBackend
{
    /// <summary>The object query-version returns (also the greeting's "version").</summary>
    QDict Version { get; }

    /// <summary>Runs one command. Throws <see cref="QmpException"/> for an error reply. Commands run one at a
    /// time, like QEMU's main loop, whichever session sent them.</summary>
    ValueTask<object?> ExecuteAsync(string command, JsonObject arguments, CancellationToken cancellationToken);

    /// <summary>Called when a command failed with something other than <see cref="QmpException"/> (a bug, or an
    /// error nobody translated): the session answers GenericError and keeps serving; the backend may log it.</summary>
    void CommandFailed(string command, Exception error) { }

    /// <summary>Called once the reply to <paramref name="command"/> has been written (quit exits only then).</summary>
    void ReplySent(string command) { }

    /// <summary>Subscribes to events (each a complete {"event","data","timestamp"} dict).</summary>
    IDisposable SubscribeEvents(Func<QDict, ValueTask> onEvent);
}
