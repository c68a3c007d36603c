using System.Runtime.InteropServices;

namespace Strata.Backup.Libvirt;

/// <summary>
/// The few calls of libvirt's C library (libvirt.so.0, stable ABI) the libvirt source needs. Pointers are opaque;
/// strings libvirt returns as <c>char*</c> belong to the caller and are freed with <c>free</c>.
/// </summary>
internal static unsafe partial class LibvirtNative
{
    private const string Lib = "libvirt.so.0";

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virConnectOpen(string? name);

    [LibraryImport(Lib)]
    internal static partial int virConnectClose(nint conn);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainLookupByName(nint conn, string name);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainDefineXML(nint conn, string xml);

    [LibraryImport(Lib)]
    internal static partial int virDomainFree(nint domain);

    [LibraryImport(Lib)]
    internal static partial nint virDomainGetXMLDesc(nint domain, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainGetState(nint domain, out int state, out int reason, uint flags);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainCheckpointCreateXML(nint domain, string xml, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainListAllCheckpoints(nint domain, out nint checkpoints, uint flags);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial nint virDomainCheckpointLookupByName(nint domain, string name, uint flags);

    [LibraryImport(Lib)]
    internal static partial nint virDomainCheckpointGetName(nint checkpoint);

    [LibraryImport(Lib)]
    internal static partial nint virDomainCheckpointGetXMLDesc(nint checkpoint, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainCheckpointDelete(nint checkpoint, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainCheckpointFree(nint checkpoint);

    [LibraryImport(Lib, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int virDomainBackupBegin(nint domain, string backupXml, string? checkpointXml, uint flags);

    [LibraryImport(Lib)]
    internal static partial nint virDomainBackupGetXMLDesc(nint domain, uint flags);

    [LibraryImport(Lib)]
    internal static partial int virDomainAbortJob(nint domain);

    [LibraryImport(Lib)]
    internal static partial nint virGetLastErrorMessage();

    [LibraryImport(Lib)]
    internal static partial int virGetLastErrorCode();

    [LibraryImport(Lib)]
    internal static partial void virSetErrorFunc(nint userData, delegate* unmanaged<nint, nint, void> handler);

    // virDomainState
    internal const int StateRunning = 1, StatePaused = 3, StateShutoff = 5;
    // virDomainXMLFlags
    internal const uint XmlInactive = 2;
    // virDomainCheckpointCreateFlags
    internal const uint CheckpointRedefine = 1, CheckpointRedefineValidate = 4;
    // virDomainCheckpointXMLFlags
    internal const uint CheckpointXmlNoDomain = 2;
    // virDomainCheckpointDeleteFlags
    internal const uint CheckpointDeleteMetadataOnly = 2;
    // virErrorNumber
    internal const int ErrNoDomain = 42, ErrNoCheckpoint = 103, ErrNoBackup = 104;

    /// <summary>libvirt prints every error on stderr unless a handler takes them; this one drops them, since each
    /// call's error is read back with <see cref="virGetLastErrorMessage"/> and reported by the caller.</summary>
    [UnmanagedCallersOnly]
    private static void IgnoreError(nint userData, nint error) { }

    private static int _quieted;

    internal static void Quiet()
    {
        if (Interlocked.Exchange(ref _quieted, 1) == 0) virSetErrorFunc(0, &IgnoreError);
    }

    /// <summary>A <c>char*</c> libvirt handed over: copied, then freed.</summary>
    internal static string? TakeString(nint s)
    {
        if (s == 0) return null;
        try { return Marshal.PtrToStringUTF8(s); }
        finally { NativeMemory.Free((void*)s); }
    }
}
