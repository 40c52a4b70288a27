"""Listening sockets that mirrorfs binds itself and hands to its children.

Binding in our own process means: the path or port is known to be free before any child starts, the
permissions are right before anyone can connect (umask 177 → 0600), and the child is reachable the moment
it is started (connections queue in the backlog), so nobody polls for a socket to appear.
"""

import errno
import ipaddress
import os
import socket
from pathlib import Path

from mirrorfs.errors import UsageError

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


def check_unix_path(path):
    path = Path(path)
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"socket path {path} is longer than {UNIX_PATH_MAX} bytes; use a shorter one")
    return path


# Connections waiting to be accepted. A burst of clients (a host's VMs starting at once) while nbdkit
# is busy must queue here: once the backlog is full, a unix socket refuses connects with EAGAIN
# (200 clients at once overflowed 128 on a loaded machine). The kernel caps it at net.core.somaxconn.
BACKLOG = socket.SOMAXCONN


def bind_unix(path, backlog=BACKLOG):
    """Bind and listen on a new unix socket at `path`, mode 0600.

    A live socket at `path` is "in use"; a stale one (nobody listening) is replaced; anything else at
    `path` is refused.
    """
    path = check_unix_path(path)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise UsageError(f"socket path {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(os.fspath(path))
        except ConnectionRefusedError:
            path.unlink()           # stale: left by a process that died
        except OSError as e:
            raise UsageError(f"socket path {path}: {e.strerror}") from None
        else:
            raise UsageError(f"socket path {path} is in use by another server")
        finally:
            probe.close()
    if not path.parent.is_dir():
        raise UsageError(f"socket path {path}: directory {path.parent} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # bind() creates the socket file with mode 0777 & ~umask (not 0666 like open()), so umask 077 would
    # leave 0700: 177 is what gives the documented 0600.
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind socket {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def received_listener(fds, sender):
    """The one listening unix socket another mirrorfs process handed us (SCM_RIGHTS) with its reply:
    a socket object we own. Anything else is closed and refused, naming `sender`."""
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise UsageError(f"{sender} did not hand over a socket")
    listener = socket.socket(fileno=fds[0])
    if listener.family != socket.AF_UNIX or listener.type != socket.SOCK_STREAM:
        listener.close()
        raise UsageError(f"{sender} handed over something that is not a unix socket")
    return listener


def parse_listen(value):
    """'HOST:PORT' or '[V6]:PORT' → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--listen {value!r}: expected HOST:PORT with a port from 1 to 65535")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def bind_tcp(host, port, backlog=BACKLOG):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UsageError(f"--listen {host}:{port}: {e.strerror}") from None
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"--listen {host}:{port}: address already in use") from None
        raise UsageError(f"--listen {host}:{port}: {e.strerror}") from None
    sock.listen(backlog)
    return sock


def is_loopback(host):
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)
