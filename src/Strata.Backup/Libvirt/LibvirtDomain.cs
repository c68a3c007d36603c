using System.Runtime.InteropServices;
using static Strata.Backup.Libvirt.LibvirtNative;

namespace Strata.Backup.Libvirt;

/// <summary>A libvirt call that failed, with libvirt's own message and error number.</summary>
public sealed class LibvirtException(string message, int code) : Exception(message)
{
    public int Code { get; } = code;

    internal static LibvirtException Last(string what)
    {
        int code = virGetLastErrorCode();
        string detail = Marshal.PtrToStringUTF8(virGetLastErrorMessage()) ?? "unknown error";
        return new LibvirtException($"{what}: {detail}", code);
    }
}

/// <summary>What libvirt says a domain is doing.</summary>
public enum DomainState { Running, Paused, ShutOff, Other }

/// <summary>A connection to a libvirt daemon (qemu:///system by default).</summary>
public sealed class LibvirtConnection : IDisposable
{
    private nint _conn;

    private LibvirtConnection(nint conn) => _conn = conn;

    public static LibvirtConnection Open(string uri)
    {
        nint conn;
        try
        {
            Quiet();
            conn = virConnectOpen(uri);
        }
        catch (DllNotFoundException)
        {
            throw new BackupException("libvirt's library (libvirt.so.0) is not installed", "install libvirt0 (Debian) or libvirt-libs", BackupExitCodes.Source);
        }
        if (conn == 0)
        {
            var e = LibvirtException.Last($"cannot connect to libvirt at '{uri}'");
            throw new BackupException(e.Message, "is libvirtd running, and may this user use its socket? (--connect URI)", BackupExitCodes.Source);
        }
        return new LibvirtConnection(conn);
    }

    /// <summary>The named domain; a <see cref="BackupException"/> (usage) when there is none.</summary>
    public LibvirtDomain Domain(string name)
    {
        nint dom = virDomainLookupByName(Handle, name);
        if (dom == 0)
        {
            var e = LibvirtException.Last($"no domain '{name}'");
            throw new BackupException(e.Message, "list the domains with: virsh list --all", e.Code == ErrNoDomain ? BackupExitCodes.Usage : BackupExitCodes.Source);
        }
        return new LibvirtDomain(dom, name);
    }

    /// <summary>Defines (persistently) a domain from its XML.</summary>
    public LibvirtDomain Define(string xml)
    {
        nint dom = virDomainDefineXML(Handle, xml);
        if (dom == 0) throw LibvirtException.Last("cannot define the domain");
        return new LibvirtDomain(dom, LibvirtXml.DomainName(xml));
    }

    private nint Handle => _conn != 0 ? _conn : throw new ObjectDisposedException(nameof(LibvirtConnection));

    public void Dispose()
    {
        if (_conn != 0) virConnectClose(_conn);
        _conn = 0;
    }
}

/// <summary>One domain: its state and XML, its checkpoints and its backup job.</summary>
public sealed class LibvirtDomain : IDisposable
{
    private nint _dom;

    internal LibvirtDomain(nint dom, string name)
    {
        _dom = dom;
        Name = name;
    }

    public string Name { get; }

    private nint Handle => _dom != 0 ? _dom : throw new ObjectDisposedException(nameof(LibvirtDomain));

    public DomainState State()
    {
        if (virDomainGetState(Handle, out int state, out _, 0) < 0) throw LibvirtException.Last($"cannot read the state of '{Name}'");
        return state switch { StateRunning => DomainState.Running, StatePaused => DomainState.Paused, StateShutoff => DomainState.ShutOff, _ => DomainState.Other };
    }

    /// <summary>The domain's XML: the running definition, or the persistent one with <paramref name="inactive"/>.</summary>
    public string XmlDesc(bool inactive = false) =>
        TakeString(virDomainGetXMLDesc(Handle, inactive ? XmlInactive : 0)) ?? throw LibvirtException.Last($"cannot read the XML of '{Name}'");

    /// <summary>The names of every checkpoint libvirt knows for this domain.</summary>
    public unsafe IReadOnlyList<string> Checkpoints()
    {
        int n = virDomainListAllCheckpoints(Handle, out nint array, 0);
        if (n < 0) throw LibvirtException.Last($"cannot list the checkpoints of '{Name}'");
        var names = new List<string>(n);
        try
        {
            for (int i = 0; i < n; i++)
            {
                nint cp = ((nint*)array)[i];
                names.Add(Marshal.PtrToStringUTF8(virDomainCheckpointGetName(cp)) ?? "");
                virDomainCheckpointFree(cp);
            }
        }
        finally
        {
            NativeMemory.Free((void*)array);
        }
        return names;
    }

    /// <summary>A checkpoint's XML without the domain definition inside it; null when libvirt has no such checkpoint.</summary>
    public string? CheckpointXml(string name)
    {
        nint cp = virDomainCheckpointLookupByName(Handle, name, 0);
        if (cp == 0)
        {
            if (virGetLastErrorCode() == ErrNoCheckpoint) return null;
            throw LibvirtException.Last($"cannot look up checkpoint '{name}'");
        }
        try
        {
            return TakeString(virDomainCheckpointGetXMLDesc(cp, CheckpointXmlNoDomain)) ?? throw LibvirtException.Last($"cannot read checkpoint '{name}'");
        }
        finally
        {
            virDomainCheckpointFree(cp);
        }
    }

    /// <summary>Tells libvirt about a checkpoint whose bitmaps already exist (metadata only), optionally checking
    /// that every disk's bitmap is really there.</summary>
    public void RedefineCheckpoint(string xml, bool validate)
    {
        nint cp = virDomainCheckpointCreateXML(Handle, xml, CheckpointRedefine | (validate ? CheckpointRedefineValidate : 0));
        if (cp == 0) throw LibvirtException.Last("cannot redefine the checkpoint");
        virDomainCheckpointFree(cp);
    }

    /// <summary>Deletes a checkpoint: its bitmaps are merged into its parent's (so no write is lost), or with
    /// <paramref name="metadataOnly"/> only libvirt's record goes. False when there was no such checkpoint.</summary>
    public bool DeleteCheckpoint(string name, bool metadataOnly = false)
    {
        nint cp = virDomainCheckpointLookupByName(Handle, name, 0);
        if (cp == 0)
        {
            if (virGetLastErrorCode() == ErrNoCheckpoint) return false;
            throw LibvirtException.Last($"cannot look up checkpoint '{name}'");
        }
        try
        {
            if (virDomainCheckpointDelete(cp, metadataOnly ? CheckpointDeleteMetadataOnly : 0) < 0) throw LibvirtException.Last($"cannot delete checkpoint '{name}'");
            return true;
        }
        finally
        {
            virDomainCheckpointFree(cp);
        }
    }

    /// <summary>Starts a backup job (and creates the checkpoint, atomically with it).</summary>
    public void BackupBegin(string backupXml, string? checkpointXml)
    {
        if (virDomainBackupBegin(Handle, backupXml, checkpointXml, 0) < 0) throw LibvirtException.Last($"libvirt refused to start the backup of '{Name}'");
    }

    /// <summary>The running backup job's XML (with the export names libvirt chose), or null when none runs.</summary>
    public string? BackupXml()
    {
        string? xml = TakeString(virDomainBackupGetXMLDesc(Handle, 0));
        if (xml is not null) return xml;
        if (virGetLastErrorCode() == ErrNoBackup) return null;
        throw LibvirtException.Last($"cannot read the backup job of '{Name}'");
    }

    /// <summary>Ends the domain's job: for a pull backup, this is how it ends (the scratch files and socket go).</summary>
    public void AbortJob()
    {
        if (virDomainAbortJob(Handle) < 0) throw LibvirtException.Last($"cannot end the job of '{Name}'");
    }

    /// <summary>
    /// Ends the domain's backup job and waits until libvirt no longer reports one: virDomainAbortJob returns once QEMU
    /// was asked to cancel, and libvirt ends the backup job only when QEMU's block jobs report their end. A run that
    /// exits right after the abort would otherwise leave `virsh domjobinfo` showing the job for a moment, and the next
    /// run could find it still there. False if it is still reported after <paramref name="patience"/>.
    /// </summary>
    public bool EndBackupJob(TimeSpan patience)
    {
        AbortJob();
        var deadline = DateTime.UtcNow + patience;
        while (BackupXml() is not null)
        {
            if (DateTime.UtcNow > deadline) return false;
            Thread.Sleep(20);
        }
        return true;
    }

    public void Dispose()
    {
        if (_dom != 0) virDomainFree(_dom);
        _dom = 0;
    }
}
