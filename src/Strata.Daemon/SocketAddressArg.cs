using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using Strata.Protocol.Qmp;

namespace Strata.Daemon;

/// <summary>
/// A socket address given as QAPI's SocketAddress (flat: <c>{type, path}</c> or <c>{type, host, port}</c>) or
/// SocketAddressLegacy (<c>{type, data: {…}}</c>, nbd-server-start's), checked member by member as QEMU's input
/// visitor checks them, with QEMU's wording for an address it cannot use. Only unix and inet are served here.
/// </summary>
public sealed record SocketAddressArg(string? Path, string? Host, int Port)
{
    private static readonly string[] Types = ["inet", "unix", "vsock", "fd"];

    private static readonly ArgSpec[] InetMembers =
    [
        new("host", ArgType.Str), new("port", ArgType.Str), new("numeric", ArgType.Bool, true), new("to", ArgType.UInt16, true),
        new("ipv4", ArgType.Bool, true), new("ipv6", ArgType.Bool, true), new("keep-alive", ArgType.Bool, true), new("mptcp", ArgType.Bool, true),
    ];

    private static readonly ArgSpec[] UnixMembers = [new("path", ArgType.Str), new("abstract", ArgType.Bool, true), new("tight", ArgType.Bool, true)];
    private static readonly ArgSpec[] VsockMembers = [new("cid", ArgType.Str), new("port", ArgType.Str)];
    private static readonly ArgSpec[] FdMembers = [new("str", ArgType.Str)];

    /// <summary>sockaddr_un's sun_path holds 108 bytes including the terminating NUL.</summary>
    private const int MaxUnixPath = 107;

    private static ArgSpec[] Members(string type) => type switch
    {
        "inet" => InetMembers,
        "unix" => UnixMembers,
        "vsock" => VsockMembers,
        _ => FdMembers,
    };

    /// <summary>The flat form (blockdev-add's nbd 'server', --nbd-server's 'addr').</summary>
    public static SocketAddressArg Parse(JsonObject o, string prefix)
    {
        string type = Type(o, prefix);
        var specs = Members(type).Prepend(new ArgSpec("type", ArgType.Str)).ToArray();
        ArgSchema.Validate(o, specs, prefix);
        return Build(type, o);
    }

    /// <summary>The legacy form with its members under 'data' (nbd-server-start's 'addr').</summary>
    public static SocketAddressArg ParseLegacy(JsonObject addr, string prefix)
    {
        string type = Type(addr, prefix);
        ArgSchema.Validate(addr, [new("type", ArgType.Str), new("data", ArgType.Object)], prefix);
        var data = addr["data"]!.AsObject();
        ArgSchema.Validate(data, Members(type), prefix + "data.");
        return Build(type, data);
    }

    private static string Type(JsonObject o, string prefix)
    {
        if (!o.TryGetPropertyValue("type", out var t)) throw QmpException.Generic($"Parameter '{prefix}type' is missing");
        if (t is not JsonValue v || v.GetValueKind() != JsonValueKind.String) throw QmpException.Generic($"Invalid parameter type for '{prefix}type', expected: string");
        string type = v.GetValue<string>();
        // QEMU names a union's tag without the path here.
        if (!Types.Contains(type)) throw QmpException.Generic($"Parameter 'type' does not accept value '{type}'");
        return type;
    }

    private static SocketAddressArg Build(string type, JsonObject o)
    {
        switch (type)
        {
            case "unix":
                string path = ArgSchema.Str(o, "path");
                if (path.Length == 0) throw QmpException.Generic("UNIX socket path must not be empty");
                if (ArgSchema.Bool(o, "abstract")) throw QmpException.Generic("Abstract unix sockets are not supported by strata daemon");
                if (Encoding.UTF8.GetByteCount(path) > MaxUnixPath) throw QmpException.Generic($"UNIX socket path '{path}' is too long");
                return new SocketAddressArg(path, null, 0);
            case "inet":
                string host = ArgSchema.Str(o, "host");
                return new SocketAddressArg(null, host, ParsePort(host, ArgSchema.Str(o, "port")));
            case "fd":
                throw QmpException.Generic("only QEMU supports file descriptor passing");
            default:
                throw QmpException.Generic("vsock sockets are not supported by strata daemon");
        }
    }

    /// <summary>A port given as text, as getaddrinfo takes it — except that a number past 65535 is refused
    /// where glibc would silently take it modulo 65536 (qemu-storage-daemon then listens on port 4464 for 70000).
    /// Service names are not looked up.</summary>
    public static int ParsePort(string host, string port)
    {
        if (port.Length == 0 || !port.All(char.IsAsciiDigit))
            throw QmpException.Generic($"address resolution failed for {host}:{port}: Servname not supported for ai_socktype");
        if (!int.TryParse(port, NumberStyles.None, CultureInfo.InvariantCulture, out int n) || n > 65535)
            throw QmpException.Generic($"address resolution failed for {host}:{port}: port number out of range (0-65535)");
        return n;
    }

    /// <summary>The address checked for connecting to it: an empty host names nothing (listening, it is every
    /// address).</summary>
    public SocketAddressArg ForConnect()
    {
        if (Host is "") throw QmpException.Generic($"address resolution failed for :{Port}: Name or service not known");
        return this;
    }

    /// <summary>The address to listen on: an IP literal, localhost, or a name resolved here (the listener takes
    /// addresses only).</summary>
    public string ListenHost()
    {
        string host = Host!;
        if (host is "" or "localhost" || IPAddress.TryParse(host, out _)) return host;
        try
        {
            var addresses = Dns.GetHostAddresses(host);
            return (addresses.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? addresses.First()).ToString();
        }
        catch (Exception e) when (e is SocketException or InvalidOperationException)
        {
            throw QmpException.Generic($"address resolution failed for {host}:{Port}: Name or service not known");
        }
    }

    /// <summary>QEMU's words for a socket that cannot be bound: the unix path is named, and the cause is the
    /// system's (.NET reports a missing folder as "address not available").</summary>
    public string BindError(SocketException e)
    {
        if (Path is null) return $"Failed to bind socket: {e.Message}";
        string? folder = System.IO.Path.GetDirectoryName(System.IO.Path.GetFullPath(Path));
        string cause = folder is not null && !Directory.Exists(folder) ? "No such file or directory"
            : e.SocketErrorCode == SocketError.AccessDenied ? "Permission denied"
            : e.Message;
        return $"Failed to bind socket to {Path}: {cause}";
    }
}
