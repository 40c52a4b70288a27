"""A named disk's storage daemon: started detached, so that it outlives the host service, and adopted
by the next one.

    RUN_DIR/host/NAME.json      the disk's entry: its socket's inode, and its daemon (pid, start time,
                                the chain it serves, its QMP socket), or null while none runs
    RUN_DIR/host/NAME.{qmp,pid,log}

Why detached (own session, no PDEATHSIG): the service's SIGTERM, kill -9 or upgrade must be
invisible to the disk's clients. The daemon keeps serving, and keeps the disk's listening socket open;
a new service finds the entry, checks that the pid is still that daemon (same /proc start time) and
that it serves the chain the registry names, watches it (a pidfd) and takes a copy of its listening
socket (pidfd_getfd), which it needs to start the next daemon on the same socket. A daemon that is
dead is replaced; one that serves another chain is stopped first.

Stopping is SIGTERM: qemu-storage-daemon drops its clients' connections without answering what they
wait for (a reconnecting client sends it again), drains, flushes and closes the images; SIGKILL only
after STOP_TIMEOUT.
"""

import json
import os
import select
import signal

from mirrorfs.daemons.storage import StorageDaemon
from mirrorfs.errors import ProcessError
from mirrorfs.host.rundir import process_running, process_start, write_atomically
from mirrorfs.system import pidfd as pidfds

SUBDIR = "host"
_aio = "io_uring"               # the daemons' I/O engine: "threads" once io_uring failed here
STOP_TIMEOUT = 30


def entry_path(directory, name):
    return directory / f"{name}.json"


def read_entry(directory, name):
    """The disk's entry, or None (missing or unreadable: nothing to adopt from it)."""
    try:
        entry = json.loads(entry_path(directory, name).read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def write_entry(directory, name, socket_inode, daemon):
    write_atomically(entry_path(directory, name), {
        "name": name, "inode": socket_inode,
        "daemon": None if daemon is None else {
            "pid": daemon.pid, "process_start": daemon.start_time, "chain": daemon.chain,
            "qmp": str(directory / f"{name}.qmp")}})


def remove_entry(directory, name):
    for suffix in (".json", ".qmp", ".pid"):
        (directory / f"{name}{suffix}").unlink(missing_ok=True)


class DiskDaemon:
    """A running qemu-storage-daemon of a named disk: started here (`start`) or adopted (`adopt`)."""

    def __init__(self, directory, name, pid, start_time, chain, storage=None):
        self.directory = directory
        self.name = name
        self.pid = pid
        self.start_time = start_time
        self.chain = list(chain)        # the paths it serves, top first
        self._storage = storage         # ours: a StorageDaemon (its Popen reaps it)
        self.pidfd = pidfds.pidfd_of(pid)
        if self.pidfd is None or process_start(pid) != start_time:
            self.close()
            raise ProcessError(f"qemu-storage-daemon of {name} (pid {pid}) exited")
        self.stopping = False
        self.reported = False           # the service's watcher saw it exit

    @classmethod
    def start(cls, directory, name, image, chain, listener, cache):
        """Serve `image` (an ImageInfo or RbdImage) on `listener`, detached; on io_uring (see
        daemons.storage.file_node: native AIO would cap a host at ~30 disks), or QEMU's thread
        pool where this QEMU or kernel has no io_uring."""
        global _aio
        storage = StorageDaemon(image, directory, name, cache=cache, listener=listener, detached=True,
                                aio=_aio)
        try:
            storage.start()
        except ProcessError as e:
            if _aio != "io_uring" or "io_uring" not in str(e) and "io-uring" not in str(e):
                raise
            _aio = "threads"
            storage = StorageDaemon(image, directory, name, cache=cache, listener=listener,
                                    detached=True, aio=_aio)
            storage.start()
        try:
            return cls(directory, name, storage.pid, process_start(storage.pid), chain, storage)
        except BaseException:
            storage.stop()
            raise

    @classmethod
    def adopt(cls, directory, name, entry):
        """The daemon the entry names, if it still runs (same pid, same start time), else None."""
        daemon = (entry or {}).get("daemon")
        if not daemon:
            return None
        pid, start = daemon.get("pid"), daemon.get("process_start")
        if not isinstance(pid, int) or not process_running(pid, start):
            return None
        try:
            return cls(directory, name, pid, start, daemon.get("chain") or [])
        except ProcessError:
            return None

    def listener(self, inode):
        """A copy of the listening socket `inode` this daemon holds, or None."""
        if not inode:
            return None
        try:
            return pidfds.socket_of(self.pid, inode, self.pidfd)
        except ProcessError:
            return None

    def exited(self):
        """Whether it has exited (reaped if it is our child)."""
        if self.pidfd is None:
            return True
        if not pidfds.exited(self.pidfd):
            return False
        if self._storage is not None:
            self._storage._child.proc.poll()
        return True

    def log_tail(self):
        try:
            lines = (self.directory / f"{self.name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in lines[-3:] if line.strip())

    def stop(self, timeout=STOP_TIMEOUT):
        """SIGTERM (flush and close), SIGKILL after `timeout`; safe to call twice."""
        self.stopping = True
        if self._storage is not None:
            self._storage.stop()
        elif self.pidfd is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
                try:
                    signal.pidfd_send_signal(self.pidfd, sig)
                except ProcessLookupError:
                    break
                p = select.poll()
                p.register(self.pidfd, select.POLLIN)
                if p.poll(wait * 1000):
                    break
            (self.directory / f"{self.name}.qmp").unlink(missing_ok=True)
            (self.directory / f"{self.name}.pid").unlink(missing_ok=True)
        self.close()

    def close(self):
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
