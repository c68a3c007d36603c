namespace Strata.Block.Graph;

/// <summary>The drivers a graph can open nodes with, by name. The block layer's own are registered from the start;
/// a host program adds the drivers that live above it (nbd, which needs the protocol library's client).</summary>
public sealed class BlockDriverRegistry
{
    private readonly Dictionary<string, IBlockDriver> _drivers = new(StringComparer.Ordinal);

    /// <summary>A registry of the block layer's drivers: file, blkdebug, null-co, qcow2, raw, throttle,
    /// copy-before-write and snapshot-access.</summary>
    public static BlockDriverRegistry WithBuiltInDrivers()
    {
        var registry = new BlockDriverRegistry();
        registry.Register(new FileDriver());
        registry.Register(new BlkdebugDriver());
        registry.Register(new NullDriver());
        registry.Register(new FormatDriver());
        registry.Register(new ThrottleDriver());
        registry.Register(new CopyBeforeWriteDriver());
        registry.Register(new SnapshotAccessDriver());
        return registry;
    }

    /// <summary>Adds a driver under each of its names; a name already taken is refused (no driver silently replaces
    /// another).</summary>
    public void Register(IBlockDriver driver)
    {
        lock (_drivers)
        {
            foreach (var name in driver.Names)
                if (_drivers.ContainsKey(name)) throw new InvalidOperationException($"A block driver named '{name}' is already registered");
            foreach (var name in driver.Names) _drivers[name] = driver;
        }
    }

    /// <summary>The driver of <paramref name="name"/>; QEMU's "Unknown driver" when there is none.</summary>
    public IBlockDriver Find(string name)
    {
        lock (_drivers)
            return _drivers.GetValueOrDefault(name) ?? throw new BlockException($"Unknown driver '{name}'");
    }
}
