"""`mirrorfs serve`: the process tree behind one served disk.

    clients ──NBD──▶ nbdkit + mirrorfs plugin ──NBD──▶ qemu-storage-daemon (source image)
                                                └──NBD──▶ qemu-storage-daemon (destination image)

Image files get a storage daemon each; NBD URIs are used as they are. Everything is checked before
anything starts (a bad input leaves both sides untouched), and everything started is stopped on exit,
on a signal and on failure, in order: nbdkit first (it flushes both sides), then the daemons.
"""

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from mirrorfs import endpoints, sockets
from mirrorfs.datapath import jsonlines
from mirrorfs.access import Access
from mirrorfs.datapath.disk import DEFAULT_REGION, LOCK_GRANULARITY
from mirrorfs.errors import Error, ProcessError, UsageError
from mirrorfs.events import EventLog
from mirrorfs.frontend import Nbdkit, OperatorLines
from mirrorfs.processes import LogRelay
from mirrorfs.datapath.state import StateError
from mirrorfs.datapath.state import open_for as open_state
from mirrorfs.storage import CACHE_MODES, StorageDaemon

log = logging.getLogger("mirrorfs")


def runtime_parent():
    """Short paths for sockets: XDG_RUNTIME_DIR if the user has one, else /tmp."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return base if base and os.path.isdir(base) else tempfile.gettempdir()


def make_rundir():
    """A private directory for sockets, pidfiles and logs, named after our pid so that one left by
    a mirrorfs that was killed (nobody was left to remove it) can be recognized and removed."""
    parent = Path(runtime_parent())
    for old in parent.glob("mirrorfs-*-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists() and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"mirrorfs-{os.getpid()}-", dir=parent))


POLICIES = ("fail", "degrade")
COPY_MODES = ("none", "full")


def identity(endpoint):
    """How the state names an endpoint: the image file, or the URI; and its size."""
    if endpoint.is_image:
        return {"image": str(endpoint.image.path), "format": endpoint.image.format,
                "size": endpoint.size}
    return {"uri": endpoint.uri, "size": endpoint.size}


def lock_granularity(*sides):
    """The unit in which the data path serializes changes: the largest qcow2 cluster among the
    image sides (64 KiB, qcow2's default, for NBD URIs, whose format we cannot know)."""
    sizes = [ep.image.cluster_size if ep.is_image else LOCK_GRANULARITY
             for ep in sides if ep is not None]
    return max([s for s in sizes if s] + [4096])


class MirrorServer:
    """The process tree of `mirrorfs serve`, and the controls of the mirror it serves (the same
    interface as Migration, for the control socket): status, pivot, cancel, events."""

    def __init__(self, source, dest=None, socket=None, listen=None, readonly=False, threads=16,
                 copy="none", state_dir=None, policy=None, rate=None, region=None, access=None,
                 io_timeout=None, cache="auto"):
        """`access`: TLS, the sockets' group, --insecure (mirrorfs.access.Access); default: none.
        `cache`: the storage daemons' use of the host page cache (mirrorfs.storage.CACHE_MODES)."""
        if socket is None and listen is None:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
        if readonly and dest is not None:
            raise UsageError("--readonly serves the source alone; do not give a destination")
        if not readonly and dest is None:
            raise UsageError("a destination is required (or --readonly to serve the source alone)")
        if not 1 <= threads <= 1024:
            raise UsageError(f"--threads {threads}: expected 1 to 1024")
        if copy not in COPY_MODES:
            raise UsageError(f"--copy {copy!r}: expected one of {', '.join(COPY_MODES)}")
        if copy == "full" and dest is None:
            raise UsageError("--copy full needs a destination")
        # degrade is only safe when what a degraded write leaves behind survives a crash: with a
        # state directory. Without one, a failing destination fails the client's request.
        policy = policy or ("degrade" if state_dir else "fail")
        if policy not in POLICIES:
            raise UsageError(f"--on-dest-error {policy!r}: expected one of {', '.join(POLICIES)}")
        if state_dir is not None and dest is None:
            raise UsageError("--state-dir keeps a mirror's state; it needs a destination")
        if region is not None and (region < 1 << 20 or region & (region - 1)):
            raise UsageError("--region: expected a power of two of at least 1 MiB")
        if io_timeout is not None and io_timeout < 0:
            raise UsageError(f"--io-timeout {io_timeout}: expected seconds, 0 for none")
        self.io_timeout = io_timeout
        if cache not in CACHE_MODES:
            raise UsageError(f"--cache {cache!r}: expected one of {', '.join(CACHE_MODES)}")
        self.cache = cache
        self.copy_mode, self.policy, self.rate = copy, policy, rate
        self.state_dir = Path(state_dir).absolute() if state_dir else None
        self.region = region
        self.log = EventLog()
        self.phase = "new"
        self.phase_since = time.monotonic()
        self.resumed = False
        self.source_spec = source
        self.dest_spec = dest
        self.socket_path = Path(socket).absolute() if socket else None
        self.listen = sockets.parse_listen(listen) if listen else None
        self.readonly = readonly
        self.threads = threads
        self.access = access or Access()
        self.rundir = None
        self.daemons = []
        self.nbdkit = None
        self.final_status = None        # the data path's status once quiesced, at stop
        self._relay = None
        self._listeners = []
        self._own_socket = False

    # Start and stop.

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self):
        if self.socket_path:
            sockets.check_unix_path(self.socket_path)
        self.access.check(self.listen)
        source = endpoints.resolve("source", self.source_spec, writable=not self.readonly)
        dest = endpoints.resolve("destination", self.dest_spec) if self.dest_spec else None
        if dest is not None:
            endpoints.check_distinct(source, dest)
        if shutil.which("nbdkit") is None:
            raise ProcessError("nbdkit is not installed (run 'make setup')")

        # The listening sockets first: a busy path or port fails before any daemon opens an image.
        if self.socket_path:
            self._listeners.append(sockets.bind_unix(self.socket_path))
            self._own_socket = True
            self.access.share(self.socket_path)
        if self.listen:
            self._listeners.append(sockets.bind_tcp(*self.listen))

        self.rundir = make_rundir()
        for ep, name in ((source, "src"), (dest, "dst")):
            if ep is not None and ep.is_image:
                daemon = StorageDaemon(ep.image, self.rundir, name,
                                       readonly=self.readonly and ep is source, cache=self.cache)
                self.daemons.append(daemon)
                daemon.start()
                ep.uri = daemon.uri
        for ep in (source, dest):
            if ep is not None:
                endpoints.probe(ep)
        if dest is not None and dest.size < source.size:
            raise UsageError(f"destination {dest.spec} is smaller than source {source.spec} "
                             f"({dest.size} < {source.size} bytes)")
        self.source, self.dest = source, dest

        params = {"source": source.uri, "control": self.datapath_socket,
                  "granularity": lock_granularity(source, dest)}
        if self.io_timeout is not None:
            params["timeout"] = self.io_timeout
        phase = "serving" if dest is None else "mirroring"
        mode = "full" if self.copy_mode == "full" else "mirror"
        if dest is not None:
            params.update(dest=dest.uri, policy=self.policy, mode=mode)
            if self.rate:
                params["rate"] = self.rate
            if self.state_dir is not None:
                phase = self._open_state(source, dest, mode, params)
        self.nbdkit = Nbdkit(self.rundir, self._listeners, params, readonly=self.readonly,
                             threads=self.threads, access=self.access)
        self._relay = LogRelay(self.nbdkit.log_path, sys.stderr, select=OperatorLines()).start()
        self.nbdkit.start()
        for s in self._listeners:           # nbdkit has them now
            s.close()
        self._enter(phase)

    def _open_state(self, source, dest, mode, params):
        """Load or create the state; a restart after a switch or a cancel serves one side alone.
        Returns the phase to serve in."""
        try:
            state, self.resumed = open_state(
                self.state_dir, mode=mode,
                source=identity(source), dest=identity(dest), size=source.size,
                region_size=self.region or DEFAULT_REGION)
        except StateError as e:
            raise UsageError(str(e)) from None
        if state.phase == "switched":
            log.warning("the state says this disk switched to the destination: serving %s alone",
                        dest.spec)
            params.clear()
            params.update(source=dest.uri, control=self.datapath_socket)
            self.retire_daemon("src")
            return "switched"
        if state.phase == "cancelled":
            log.warning("the state says this mirror was cancelled: serving %s alone", source.spec)
            for key in ("dest", "mode", "policy", "rate"):
                params.pop(key, None)
            self.retire_daemon("dst")
            return "cancelled"
        params["state"] = self.state_dir
        if self.region:
            params["region"] = self.region
        return "mirroring"

    def stop(self):
        """Stop everything we started; safe to call at any point, and more than once."""
        if self.nbdkit is not None:
            self._stop_nbdkit()
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        for daemon in reversed(self.daemons):
            daemon.stop()
        for s in self._listeners:
            s.close()
        self._listeners = []
        if self._own_socket:
            self.socket_path.unlink(missing_ok=True)
            self._own_socket = False
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None
        if self.phase not in ("new", "stopped"):
            self._enter("stopped")
        self.log.close()

    def _stop_nbdkit(self):
        """nbdkit 1.32's python plugin does not exit on SIGTERM while a client stays connected and
        idle (a VM always is): it waits for the client to go. So the data path is first quiesced:
        new requests held, those in flight finished on both sides, both sides flushed. After that
        no request is between the sides, and killing nbdkit loses nothing and cannot leave the
        sides different; clients see the server go away, as with any shutdown."""
        grace = 10
        if self.nbdkit.alive():
            try:
                self.datapath("quiesce")
                grace = 1
                # Nothing is in flight now: what may differ between the sides is final.
                self.final_status = self.datapath("status")["status"]
            except jsonlines.ControlError as e:
                log.warning("could not quiesce the data path before stopping: %s", e)
        self.nbdkit.stop(timeout=grace)

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # Running.

    @property
    def datapath_socket(self):
        return self.rundir / "datapath.ctl"

    def datapath(self, cmd, **args):
        """A request to the data path inside nbdkit (status, switch); raises ControlError."""
        return jsonlines.call(self.datapath_socket, {"cmd": cmd, **args}, timeout=120)

    def daemon(self, name):
        """The storage daemon of "src" or "dst", or None if that side is an NBD URI."""
        return next((d for d in self.daemons if d.name == name), None)

    def retire_daemon(self, name):
        """Stop a side's storage daemon once the data path no longer uses it."""
        daemon = self.daemon(name)
        if daemon is not None:
            self.daemons.remove(daemon)
            daemon.stop()

    @property
    def uris(self):
        found = []
        s = "s" if self.access.tls_required else ""
        if self.socket_path:
            found.append(f"nbd{s}+unix:///?socket={self.socket_path}")
        if self.listen:
            host, port = self.listen
            found.append(f"nbd{s}://{'[' + host + ']' if ':' in host else host}:{port}/")
        return found

    def children(self):
        return [c for c in [self.nbdkit, *self.daemons] if c is not None]

    def wait(self, stop: threading.Event, interval=0.5):
        """Serve until `stop` is set. A child that dies on its own is an error. Watches the data
        path meanwhile, turning what changes (synchronized, errors) into events."""
        seen = {}
        while not stop.wait(interval):
            for child in self.children():
                # Not one being stopped: a side's daemon is retired after a switch while this
                # loop runs (in another thread), and its exit is then expected.
                if child.died():
                    raise child.failure("exited unexpectedly")
            self._watch(seen)

    def _watch(self, seen):
        try:
            dp = self.datapath("status")["status"]
        except jsonlines.ControlError:
            return
        if dp.get("synchronized") and not seen.get("synchronized") and self.dest is not None:
            self.log.add("synchronized", dirty_bytes=0)
        seen["synchronized"] = dp.get("synchronized")
        for name, side in dp.get("sides", {}).items():
            if side["errors"] > seen.get(name, 0):
                self.log.add("error", side=name, errors=side["errors"], degraded=side["degraded"])
            seen[name] = side["errors"]

    # Controls (the control socket's commands).

    def _enter(self, phase, **details):
        self.phase = phase
        self.phase_since = time.monotonic()
        self.log.add("phase", phase=phase, **details)

    def events(self, since=0, timeout=None):
        return self.log.follow(since, timeout)

    def status(self):
        status = {"phase": self.phase, "phase_seconds": round(time.monotonic() - self.phase_since, 3),
                  "source": self.source_spec, "destination": self.dest_spec, "uris": self.uris,
                  "copy_mode": self.copy_mode, "policy": self.policy,
                  "state_dir": str(self.state_dir) if self.state_dir else None,
                  "resumed": self.resumed, "events": self.log.recent(5)}
        try:
            status["datapath"] = dp = self.datapath("status")["status"]
        except jsonlines.ControlError as e:
            status["datapath"] = {"error": str(e)}
            return status
        if self.phase == "mirroring":
            # The phases: copying until the destination holds everything, then synchronized.
            status["phase"] = "synchronized" if dp.get("synchronized") else "copying"
        return status

    def copy(self, rate=None, wait=False):
        raise UsageError("serve has no base to copy: --copy full copies the whole disk by itself")

    def verify(self):
        dp = self.datapath("status")["status"]
        if dp.get("synchronized"):
            return True, "the destination holds the whole disk"
        return False, f"{dp.get('dirty_bytes')} bytes may still differ"

    def pivot(self, force=False, timeout=10.0):
        if self.phase != "mirroring":
            raise UsageError(f"cannot pivot while {self.phase} (possible when mirroring)")
        try:
            reply = self.datapath("switch", reader="destination", writers=["destination"],
                                  phase="switched", timeout=timeout)
        except jsonlines.ControlError as e:
            raise Error(str(e)) from None
        self.retire_daemon("src")
        stall = reply["stall_ms"] / 1000
        self._enter("switched", stall_ms=round(stall * 1000, 3))
        return stall

    def cancel(self, timeout=10.0):
        if self.phase != "mirroring":
            raise UsageError(f"cannot cancel while {self.phase} (possible when mirroring)")
        try:
            self.datapath("switch", reader="source", writers=["source"], phase="cancelled",
                          timeout=timeout)
        except jsonlines.ControlError as e:
            raise Error(str(e)) from None
        self.retire_daemon("dst")
        self._enter("cancelled")
