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
        123 => "No medium found",
        _ => $"Unknown error {errno}",
    };
}

/// <summary>A blkdebug set-state rule: on <see cref="Event"/> in state <see cref="State"/>, go to <see cref="NewState"/>.</summary>
public sealed record BlkdebugStateRule(string Event, int State, int NewState);

/// <summary>A blkdebug inject-error rule: fail the request that triggers <see cref="Event"/> with <see cref="Errno"/>.</summary>
public sealed record BlkdebugErrorRule(string Event, int Errno, int? State, long? Sector, bool Once);

/// <summary>
/// QEMU's blkdebug, as a fault injector on a host file: events (read_aio, write_aio, flush_to_disk from the host
/// file, and the qcow2 driver's own — l1_update, refblock_alloc, cluster_free, …) move a small state machine and arm
/// error rules that fail the host I/O after them, so failure paths are tested the way QEMU's iotests test them.
/// </summary>
public sealed class Blkdebug(IEnumerable<BlkdebugStateRule> stateRules, IEnumerable<BlkdebugErrorRule> errorRules)
{
    private readonly object _lock = new();
    private readonly List<BlkdebugStateRule> _stateRules = stateRules.ToList();
    private readonly List<BlkdebugErrorRule> _errorRules = errorRules.ToList();
    private int _state = 1;
    private volatile List<BlkdebugErrorRule> _active = [];

    /// <summary>No rules at all: the driver passes every request on unchanged.</summary>
    public bool IsEmpty => _stateRules.Count == 0 && _errorRules.Count == 0;

    public static readonly string[] KnownEvents = ["read_aio", "write_aio", "flush_to_disk"];

    /// <summary>Every event name QEMU's blkdebug accepts. Rules on events Strata's drivers do not raise are taken
    /// (so a config file written for QEMU loads) and simply never fire.</summary>
    public static readonly string[] QemuEvents =
    [
        "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table", "l2_load", "l2_update",
        "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write", "read_aio", "read_backing_aio", "read_compressed",
        "write_aio", "write_compressed", "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
        "reftable_grow", "reftable_update", "refblock_load", "refblock_update", "refblock_update_part", "refblock_alloc",
        "refblock_alloc_hookup", "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
        "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free", "flush_to_os",
        "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head", "pwritev_rmw_tail", "pwritev_rmw_after_tail",
        "pwritev", "pwritev_zero", "pwritev_done", "empty_image_prepare", "l1_shrink_write_table",
        "l1_shrink_free_l2_clusters", "cor_write", "cluster_alloc_space", "none",
    ];

    /// <summary>Rules from blkdebug's options: a config file's text (may be null) and the inline
    /// inject-error.N.* / set-state.N.* keys, as QEMU's blkdebug takes them (config file rules first).</summary>
    public static Blkdebug FromOptions(string? configText, BlockOptions options)
    {
        var sections = new List<(string Name, Dictionary<string, string> Keys)>();
        if (configText is not null) sections.AddRange(ParseConfig(configText));
        foreach (var name in new[] { "inject-error", "set-state" })
        {
            var list = options.Child(name);
            for (int i = 0; list.HasChild(i.ToString(System.Globalization.CultureInfo.InvariantCulture)); i++)
            {
                var item = list.Child(i.ToString(System.Globalization.CultureInfo.InvariantCulture));
                sections.Add((name, item.Values.ToDictionary(kv => kv.Key, kv => kv.Value ?? "", StringComparer.Ordinal)));
            }
        }
        var states = new List<BlkdebugStateRule>();
        var errors = new List<BlkdebugErrorRule>();
        foreach (var (name, keys) in sections)
        {
            string ev = keys.GetValueOrDefault("event") ?? throw new BlockSpecException("Parameter 'event' is missing");
            if (Array.IndexOf(QemuEvents, ev) < 0) throw new BlockSpecException($"Invalid parameter '{ev}'");
            if (name == "set-state")
            {
                states.Add(new BlkdebugStateRule(ev, Number(keys, "state") ?? 0,
                    Number(keys, "new_state") ?? throw new BlockSpecException("Parameter 'new_state' is missing")));
            }
            else
            {
                int? state = Number(keys, "state");
                errors.Add(new BlkdebugErrorRule(ev, Number(keys, "errno") ?? 5, state is 0 ? null : state,
                    keys.TryGetValue("sector", out var sector) && long.Parse(sector, System.Globalization.CultureInfo.InvariantCulture) is >= 0 and var s ? s : null,
                    keys.GetValueOrDefault("once") is "on" or "true" or "yes"));
            }
        }
        return new Blkdebug(states, errors);
    }

    private static int? Number(Dictionary<string, string> keys, string key) =>
        !keys.TryGetValue(key, out var text) ? null
        : int.TryParse(text, System.Globalization.NumberStyles.Integer, System.Globalization.CultureInfo.InvariantCulture, out int v) ? v
        : throw new BlockSpecException($"Parameter '{key}' expects a number");

    /// <summary>QEMU's config file syntax: "[section]" headers, then <c>key = "value"</c> lines; '#' starts a
    /// comment line. Only [inject-error] and [set-state] sections mean anything to blkdebug.</summary>
    public static List<(string Name, Dictionary<string, string> Keys)> ParseConfig(string text)
    {
        var sections = new List<(string Name, Dictionary<string, string> Keys)>();
        Dictionary<string, string>? current = null;
        int lineNo = 0;
        foreach (var raw in text.Split('\n'))
        {
            lineNo++;
            string line = raw.Trim();
            if (line.Length == 0 || line[0] == '#') continue;
            if (line[0] == '[')
            {
                int close = line.IndexOf(']');
                if (close < 0) throw new BlockSpecException($"blkdebug config:{lineNo}: parse error");
                string name = line[1..close].Split(' ', 2)[0];
                current = new Dictionary<string, string>(StringComparer.Ordinal);
                if (name is "inject-error" or "set-state") sections.Add((name, current));
                continue;
            }
            int eq = line.IndexOf('=');
            string value = eq < 0 ? "" : line[(eq + 1)..].Trim();
            if (current is null || eq <= 0 || value.Length < 2 || value[0] != '"' || value[^1] != '"')
                throw new BlockSpecException($"blkdebug config:{lineNo}: parse error");
            current[line[..eq].Trim()] = value[1..^1];
        }
        return sections;
    }

    /// <summary>An event happened (raised by a format driver or before a host I/O). As QEMU's blkdebug: the error rules
    /// of this event that hold in the current state become the active ones (replacing those armed before), and the
    /// state rules move the state. Nothing fails here: an armed rule fails the next host I/O it matches
    /// (<see cref="CheckIo"/>), and keeps failing them unless it is a "once" rule.</summary>
    public void Event(string name)
    {
        lock (_lock)
        {
            int state = _state;
            List<BlkdebugErrorRule>? armed = null;
            foreach (var r in _errorRules)
                if (r.Event == name && (r.State is not { } s || s == state)) (armed ??= []).Insert(0, r);
            if (armed is not null) _active = armed;
            foreach (var r in _stateRules)
                if (r.Event == name && r.State == state) _state = r.NewState;
        }
    }

    /// <summary>Before a host read, write or flush (<paramref name="length"/> 0): throws the error of the first armed
    /// rule that covers the range (a rule with a sector covers only I/O that includes it; flushes have none).</summary>
    public void CheckIo(long offset, long length)
    {
        if (_active.Count == 0) return;
        lock (_lock)
        {
            foreach (var r in _active)
            {
                if (r.Sector is { } sector && (length == 0 || sector * 512 < offset || sector * 512 >= offset + length)) continue;
                if (r.Once)
                {
                    _active.Remove(r);
                    _errorRules.Remove(r);
                }
                throw new BlockIOException(BlockIOException.Describe(r.Errno), r.Errno);
            }
        }
    }

    /// <summary>An event directly followed by the host I/O it announces (read_aio, write_aio, flush_to_disk).</summary>
    public void Event(string name, long offset, long length)
    {
        Event(name);
        CheckIo(offset, length);
    }
}
