namespace Strata.Backup;

/// <summary>A failure to show the user: what went wrong and a hint on what to do about it.</summary>
public class BackupException(string message, string? hint = null, int exitCode = BackupExitCodes.Failed) : Exception(message)
{
    public string? Hint { get; } = hint;
    public int ExitCode { get; } = exitCode;
}

/// <summary>`strata backup` exit codes (documented in its --help).</summary>
public static class BackupExitCodes
{
    public const int Ok = 0;
    /// <summary>The backup, restore or prune failed, or verify found a problem.</summary>
    public const int Failed = 1;
    /// <summary>Bad arguments, or no such repository, disk or point.</summary>
    public const int Usage = 2;
    /// <summary>Another run holds the repository lock.</summary>
    public const int Locked = 3;
    /// <summary>The source (QMP or NBD) could not be reached or refused a command.</summary>
    public const int Source = 4;
}
