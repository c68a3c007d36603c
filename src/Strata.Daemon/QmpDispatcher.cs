using System.Text.Json.Nodes;
using Strata.Block;
using Strata.Block.Jobs;
using Strata.Formats.Json;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>One QMP command: its argument members (checked before it runs), its return type for the schema, and
/// what it does.</summary>
public sealed record QmpCommand(string Name, IReadOnlyList<ArgSpec> Args, string Returns, Func<JsonObject, object?> Run)
{
    /// <summary>A command whose handler checks its own members (blockdev-add: a union on "driver").</summary>
    public bool ChecksOwnArgs => Args.Any(a => a.Name == "*");
}

/// <summary>
/// The command table and QEMU's main-loop rule: commands run one at a time, whichever session sent them. Errors
/// from the layers below become the QMP error classes QEMU would answer.
/// </summary>
public sealed class QmpDispatcher
{
    private readonly SemaphoreSlim _serial = new(1, 1);
    private readonly Dictionary<string, QmpCommand> _commands = new(StringComparer.Ordinal);

    public void Add(string name, ArgSpec[] args, string returns, Func<JsonObject, object?> run) => _commands[name] = new QmpCommand(name, args, returns, run);

    /// <summary>A registered command (transactions run the bitmap commands' own handlers).</summary>
    public QmpCommand this[string name] => _commands[name];

    /// <summary>Runs after each command that succeeded, before its reply (the daemon makes bitmap changes durable
    /// there, so a command that returned survives a crash).</summary>
    public Action? AfterCommand { get; set; }

    public IEnumerable<string> Names => _commands.Keys.Order(StringComparer.Ordinal);

    public async ValueTask<object?> ExecuteAsync(string command, JsonObject arguments, CancellationToken cancellationToken)
    {
        if (!_commands.TryGetValue(command, out var entry))
            throw new QmpException("CommandNotFound", $"The command {command} has not been found");
        await _serial.WaitAsync(cancellationToken);
        try
        {
            if (!entry.ChecksOwnArgs) ArgSchema.Validate(arguments, entry.Args);
            var result = entry.Run(arguments);
            AfterCommand?.Invoke();
            return result;
        }
        catch (JobException e) when (e.DeviceNotActive)
        {
            throw new QmpException("DeviceNotActive", e.Message);
        }
        catch (BlockException e)
        {
            throw QmpException.Generic(ImageLockedException.WithoutHint(e.Message));
        }
        catch (Formats.Qcow2.ImageFormatException e)
        {
            // A corrupt or unsupported image header: QEMU's open fails with the same GenericError.
            throw QmpException.Generic(e.Message);
        }
        finally
        {
            _serial.Release();
        }
    }

    /// <summary>Waits until no command runs and holds off the next one: for work outside a command (a mirror's
    /// switch-over, shutdown) that must change shared state only between two commands, as QEMU's main loop does.
    /// With a <paramref name="timeout"/>, gives up waiting after it; the result then says the lock was not taken.</summary>
    public async Task<BetweenCommands> BetweenCommandsAsync(TimeSpan? timeout = null)
    {
        bool entered = true;
        if (timeout is { } t) entered = await _serial.WaitAsync(t);
        else await _serial.WaitAsync();
        return new BetweenCommands(entered ? _serial : null);
    }

    /// <summary>Held while no command runs; disposing lets the next one in.</summary>
    public readonly struct BetweenCommands(SemaphoreSlim? held) : IDisposable
    {
        public void Dispose() => held?.Release();
    }

    /// <summary>query-qmp-schema: each command with its argument object, then the builtin types.</summary>
    public List<object?> Schema()
    {
        var list = new List<object?>();
        foreach (var (name, entry) in _commands.OrderBy(kv => kv.Key, StringComparer.Ordinal))
            list.AddRange(ArgSchema.SchemaEntries(name, entry.Args.Where(s => s.Name != "*").ToList(), entry.Returns));
        foreach (var builtin in new[] { "str", "int", "bool", "any" })
            list.Add(new QDict().Add("name", builtin).Add("meta-type", "builtin").Add("json-type", builtin switch { "str" => "string", "int" => "int", "bool" => "boolean", _ => "value" }));
        return list;
    }
}
