"""Process file descriptors (pidfd_open(2), pidfd_getfd(2)): how the host service watches processes it
did not start, and takes back a listening socket another process holds.

- `pidfd_of(pid)`: a pidfd, readable (poll) once the process has exited, whoever its parent is. One poll
  over every pidfd is how one thread watches hundreds of storage daemons and borrowers.
- `socket_of(pid, inode)`: a copy, in this process, of the unix socket `socket:[inode]` that process
  `pid` holds. A restarted service gets each disk's listening socket back from the daemon serving it
  (or from the migration borrowing it), so the socket never closes and a reconnecting client never
  sees a refused connection. Python has no pidfd_getfd: syscall 438 through libc (Linux 5.6; the
  caller needs PTRACE_MODE_ATTACH_REALCREDS over the process: same user, or root).
"""

import ctypes
import os
import select
import socket

from mirrorfs.errors import ProcessError

_SYS_PIDFD_GETFD = 438          # the same number on every architecture (the unified syscall table)
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def pidfd_of(pid):
    """A pidfd of process `pid`, or None if there is no such process."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def getfd(pidfd, targetfd):
    """A copy (close-on-exec) of file descriptor `targetfd` of the process behind `pidfd`."""
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, targetfd, 0)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def fd_of_socket(pid, inode):
    """The number of a file descriptor of `pid` that is the socket `inode`, or None."""
    want = f"socket:[{inode}]"
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == want:
                return int(name)
        except OSError:
            continue
    return None


def socket_of(pid, inode, pidfd=None):
    """A socket object for the socket `inode` held by process `pid` (None if it holds no such socket).
    Pass `pidfd` to be sure the pid was not recycled since the caller checked it."""
    target = fd_of_socket(pid, inode)
    if target is None:
        return None
    own = pidfd if pidfd is not None else pidfd_of(pid)
    if own is None:
        return None
    try:
        fd = getfd(own, target)
    except OSError as e:
        raise ProcessError(f"cannot take socket:[{inode}] from process {pid}: {e.strerror}") from None
    finally:
        if pidfd is None:
            os.close(own)
    return socket.socket(fileno=fd)


def inode(sock):
    return os.fstat(sock.fileno()).st_ino


def exited(pidfd):
    """Whether the process behind `pidfd` has exited (without waiting)."""

    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


_ACCEPTCON = 0x10000            # __SO_ACCEPTCON in /proc/net/unix's Flags: a listening socket


def listening_inodes(path):
    """The inodes of the listening unix sockets bound to `path` (from /proc/net/unix): normally
    one; none if nothing listens there."""
    path = os.fspath(path)
    found = []
    try:
        with open("/proc/net/unix") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _ACCEPTCON:
                    found.append(int(fields[6]))
    except OSError:
        pass
    return found


def holders(inode, pids=None):
    """The pids (other than ours) that hold the socket `inode`: every process's fds scanned unless
    `pids` narrows it. For rare checks (a take-back), not for a loop."""
    me = os.getpid()
    candidates = pids if pids is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return [pid for pid in candidates if pid != me and fd_of_socket(pid, inode) is not None]
