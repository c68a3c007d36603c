namespace Strata.Block;

/// <summary>An I/O error injected or met on a host file (errno as QEMU names it in messages).</summary>
public sealed class BlockIOException(string message, int errno) : BlockException(message)
{
    public int Errno { get; } = errno;

    /// <summary>"read" or "write": which side of a job met the error (BLOCK_JOB_ERROR's operation).</summary>
    public string? Operation { get; set; }

    public static string Describe(int errno) => errno switch
    {
        1 => "Operation not permitted",
        5 => "Input/output error",
        12 => "Cannot allocate memory",
        13 => "Permission denied",
        27 => "File too large",
        30 => "Read-only file system",
        110 => "Connection timed out",
        122 => "Disk quota exceeded",
        22 => "Invalid argument",
        28 => "No space left on device",
        95 => "Operation not supported",
        _ => $"Unknown error {errno}",
    };
}

/// <summary>A blkdebug set-state rule: on <see cref="Event"/> in state <see cref="State"/>, go to <see cref="NewState"/>.</summary>
public sealed record BlkdebugStateRule(string Event, int State, int NewState);

/// <summary>A blkdebug inject-error rule: fail the request that triggers <see cref="Event"/> with <see cref="Errno"/>.</summary>
public sealed record BlkdebugErrorRule(string Event, int Errno, int? State, long? Sector, bool Once);

/// <summary>
/// QEMU's blkdebug, as a fault injector on a host file: events (read_aio, write_aio, flush_to_disk) move a small
/// state machine and trip error rules, so failure paths are tested the way QEMU's iotests test them.
/// </summary>
public sealed class Blkdebug(IEnumerable<BlkdebugStateRule> stateRules, IEnumerable<BlkdebugErrorRule> errorRules)
{
    private readonly object _lock = new();
    private readonly List<BlkdebugStateRule> _stateRules = stateRules.ToList();
    private readonly List<BlkdebugErrorRule> _errorRules = errorRules.ToList();
    private int _state = 1;

    public static readonly string[] KnownEvents = ["read_aio", "write_aio", "flush_to_disk"];

    /// <summary>Called before an I/O: throws the injected error if a rule matches, then applies state changes.</summary>
    public void Event(string name, long offset, long length)
    {
        lock (_lock)
        {
            int state = _state;

            BlkdebugErrorRule? hit = null;
            foreach (var r in _errorRules)
            {
                if (r.Event != name || (r.State is { } s && s != state)) continue;
                if (r.Sector is { } sector && (sector * 512 < offset || sector * 512 >= offset + Math.Max(length, 1))) continue;
                hit = r;
                break;
            }
            // State rules fire on the event too (QEMU applies them before the error check, with the old state).
            foreach (var r in _stateRules)
                if (r.Event == name && r.State == state) { _state = r.NewState; break; }
            if (hit is null) return;
            if (hit.Once) _errorRules.Remove(hit);
            throw new BlockIOException(BlockIOException.Describe(hit.Errno), hit.Errno);
        }
    }
}
