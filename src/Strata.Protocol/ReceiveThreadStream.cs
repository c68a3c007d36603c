using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Threading.Tasks.Sources;

namespace Strata.Protocol;

/// <summary>
/// The input of a connection that has a thread of its own. The thread runs the session (<see cref="Run"/>), and when
/// the session reads on it, the thread receives itself: a non-blocking recv, and poll(2) when the socket is empty. So a
/// request that is answered without a hand-off (an NBD read served from memory) costs no wake-up of another thread:
/// on two cores every wake-up is CPU taken from the client. If the session has moved to another thread meanwhile (it
/// waited for a free request slot), its next read hands the receive back to the connection's thread and the session
/// resumes there.
/// Nothing is read ahead: a read takes what one recv gives into the session's own buffer, and what the client sent
/// beyond that stays in the socket's buffer, not in this process's memory.
/// </summary>
internal sealed partial class ReceiveThreadStream : Stream, IValueTaskSource<int>
{
    private readonly Socket _socket;
    private readonly int _wakeFd; // an eventfd in the poll beside the socket: a cancelled read ends its wait at once
    private readonly object _lock = new();
    private Thread? _thread;
    private bool _disposed;

    // A read handed to the thread by the session running elsewhere. The completion runs the session's continuation
    // inline on the thread (RunContinuationsAsynchronously is false). The thread takes the read only once the
    // continuation is registered (armed, then pending): completed before that, the continuation would be queued to
    // the thread pool and the session would go on there, each later read handed over again.
    private ManualResetValueTaskSourceCore<int> _handOff;
    private Memory<byte> _handOffBuffer;
    private CancellationToken _handOffToken;
    private bool _handOffArmed;
    private bool _handOffPending;
    private bool _sessionEnded;
    private bool _threadGone;

    private CancellationToken _wakeToken;
    private CancellationTokenRegistration _wakeRegistration;

    /// <param name="socket">Switched to non-blocking here; make any NetworkStream over it first.</param>
    public ReceiveThreadStream(Socket socket)
    {
        _socket = socket;
        _socket.Blocking = false;
        _wakeFd = EventFd(0, EfdCloexec | EfdNonblock);
        if (_wakeFd < 0) throw new IOException($"eventfd failed: errno {Marshal.GetLastPInvokeError()}");
    }

    /// <summary>Runs the session on the calling thread, which is the connection's from now on, and serves its reads
    /// there until it ends.</summary>
    public Task Run(Func<Task> startSession)
    {
        _thread = Thread.CurrentThread;
        Task session;
        try
        {
            session = startSession();
        }
        catch (Exception e)
        {
            session = Task.FromException(e);
        }
        session.ContinueWith(static (_, s) => ((ReceiveThreadStream)s!).EndOfSession(), this, CancellationToken.None,
            TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
        try
        {
            while (true)
            {
                Memory<byte> buffer;
                CancellationToken ct;
                lock (_lock)
                {
                    while (!_handOffPending && !_sessionEnded) Monitor.Wait(_lock);
                    if (!_handOffPending)
                    {
                        _threadGone = true; // in the same lock: no read can be handed over after this look
                        break; // a session waiting for a read cannot have ended
                    }
                    _handOffPending = false;
                    buffer = _handOffBuffer;
                    ct = _handOffToken;
                    _handOffBuffer = default;
                }
                int n;
                try
                {
                    n = Receive(buffer.Span, ct);
                }
                catch (Exception e)
                {
                    _handOff.SetException(e);
                    continue;
                }
                _handOff.SetResult(n);
            }
        }
        finally
        {
            // Whatever ended the loop (also an exception out of a continuation run inline), a read handed over
            // fails instead of waiting for a thread that is gone.
            bool stranded;
            lock (_lock)
            {
                _threadGone = true;
                stranded = _handOffPending;
                _handOffPending = false;
            }
            if (stranded) _handOff.SetException(new IOException("the connection's thread has ended"));
        }
        return session;
    }

    private void EndOfSession()
    {
        lock (_lock)
        {
            _sessionEnded = true;
            Monitor.Pulse(_lock);
        }
    }

    public override ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
    {
        if (Thread.CurrentThread == _thread)
        {
            try
            {
                return new ValueTask<int>(Receive(buffer.Span, cancellationToken));
            }
            catch (Exception e)
            {
                return ValueTask.FromException<int>(e);
            }
        }
        lock (_lock)
        {
            if (_threadGone) return ValueTask.FromException<int>(new IOException("the connection's thread has ended"));
            // Reads come one at a time: the previous hand-off's result was taken before this read began.
            if (_handOffArmed || _handOffPending) return ValueTask.FromException<int>(new InvalidOperationException("a read is already waiting"));
            _handOff.Reset();
            _handOffBuffer = buffer;
            _handOffToken = cancellationToken;
            _handOffArmed = true;
            return new ValueTask<int>(this, _handOff.Version);
        }
    }

    private int Receive(Span<byte> buffer, CancellationToken ct)
    {
        ObjectDisposedException.ThrowIf(_disposed, this); // its eventfd's number may already belong to another file
        while (true)
        {
            ct.ThrowIfCancellationRequested();
            int n = _socket.Receive(buffer, SocketFlags.None, out var error);
            switch (error)
            {
                case SocketError.Success:
                    return n;
                case SocketError.WouldBlock or SocketError.Interrupted:
                    WaitReadable(ct);
                    break;
                default:
                    throw new IOException($"receive failed: {error}", new SocketException((int)error));
            }
        }
    }

    private unsafe void WaitReadable(CancellationToken ct)
    {
        if (ct != _wakeToken)
        {
            // The pipe reader passes the same token read after read: one registration serves them all.
            _wakeRegistration.Dispose();
            _wakeToken = ct;
            _wakeRegistration = ct.UnsafeRegister(static s => ((ReceiveThreadStream)s!).Wake(), this);
        }
        var fds = stackalloc PollFd[2];
        fds[0] = new PollFd { Fd = (int)_socket.SafeHandle.DangerousGetHandle(), Events = PollIn };
        fds[1] = new PollFd { Fd = _wakeFd, Events = PollIn };
        while (Poll(fds, 2, -1) < 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Eintr) throw new IOException($"poll failed: errno {errno}");
        }
        if (fds[1].Revents != 0)
        {
            ulong drained;
            _ = ReadEventFd(_wakeFd, &drained, 8);
            ct.ThrowIfCancellationRequested();
        }
    }

    private unsafe void Wake()
    {
        lock (_lock)
        {
            if (_disposed) return;
            ulong one = 1;
            _ = WriteEventFd(_wakeFd, &one, 8);
        }
    }

    public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
        ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();

    /// <summary>Only on the connection's thread: anywhere else it would hold a thread until the client sends.</summary>
    public override int Read(byte[] buffer, int offset, int count) => Thread.CurrentThread == _thread
        ? Receive(buffer.AsSpan(offset, count), CancellationToken.None)
        : throw new NotSupportedException("a synchronous read off the connection's thread");

    protected override void Dispose(bool disposing)
    {
        if (disposing)
        {
            lock (_lock)
            {
                if (_disposed) return;
                _disposed = true;
            }
            _wakeRegistration.Dispose();
            Close(_wakeFd);
        }
        base.Dispose(disposing);
    }

    int IValueTaskSource<int>.GetResult(short token) => _handOff.GetResult(token);
    ValueTaskSourceStatus IValueTaskSource<int>.GetStatus(short token) => _handOff.GetStatus(token);
    void IValueTaskSource<int>.OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags)
    {
        _handOff.OnCompleted(continuation, state, token, flags);
        bool threadGone;
        lock (_lock)
        {
            if (!_handOffArmed) return;
            _handOffArmed = false;
            threadGone = _threadGone;
            if (!threadGone)
            {
                _handOffPending = true;
                Monitor.Pulse(_lock);
            }
        }
        if (threadGone) _handOff.SetException(new IOException("the connection's thread has ended"));
    }

    public override bool CanRead => true;
    public override bool CanSeek => false;
    public override bool CanWrite => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
    public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();

    private const short PollIn = 0x1;
    private const int Eintr = 4;
    private const int EfdCloexec = 0x80000, EfdNonblock = 0x800;

    [StructLayout(LayoutKind.Sequential)]
    private struct PollFd
    {
        public int Fd;
        public short Events;
        public short Revents;
    }

    [LibraryImport("libc", EntryPoint = "poll", SetLastError = true)]
    private static unsafe partial int Poll(PollFd* fds, nuint count, int timeoutMs);

    [LibraryImport("libc", EntryPoint = "eventfd", SetLastError = true)]
    private static partial int EventFd(uint initial, int flags);

    [LibraryImport("libc", EntryPoint = "read")]
    private static unsafe partial nint ReadEventFd(int fd, ulong* value, nuint size);

    [LibraryImport("libc", EntryPoint = "write")]
    private static unsafe partial nint WriteEventFd(int fd, ulong* value, nuint size);

    [LibraryImport("libc", EntryPoint = "close")]
    private static partial int Close(int fd);
}
