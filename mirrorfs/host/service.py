"""`mirrorfs host`: the host service. It serves every named disk of the registry (mirrorfs.host.registry),
each through its own qemu-storage-daemon on the record's current chain, and lends a disk to a
migration and takes it back.

    clients ──NBD──▶ disk's SOCKET ──▶ qemu-storage-daemon (record's chain)      exporting
    clients ──NBD──▶ disk's SOCKET ──▶ the migration (nbdkit, its data path)     lent

What outlives what. The daemons are detached (mirrorfs.host.daemons): the service's SIGTERM, SIGINT,
kill -9 or upgrade stops nothing a client uses; the next service adopts every daemon that still
serves its record's chain and takes a copy of its listening socket. Only the `shutdown` command
stops the disks (each daemon flushed and closed), then the service.

The listening sockets. The service binds each disk's socket (0600) and keeps a copy of it for the
disk's life, as `mirrorfs export` does: a daemon gets it by fd, a migration gets it on `lend`
(SCM_RIGHTS); a daemon or a borrower that dies leaves it open, so clients wait in its backlog
instead of being refused. With `--socket-group GROUP` every disk's socket is 0660 and GROUP's (a
system libvirt's QEMU runs as libvirt-qemu, not as root): set when the service binds it, and again
on every socket it adopts at its start. Nothing else binds a named disk's socket (a migration
serves the very socket it borrowed), so the ownership holds through lend, switch, take-back and
hand-back. An unknown group is refused before the service binds anything.

Control socket RUN_DIR/host.ctl (JSON lines, 0600), one request {"cmd": ..., "disk": NAME}:
    add (image, socket), remove, list, status, lend, give-back, shutdown (mirrorfs.host.requests)

A lend is recorded (registry.lend) before the daemon stops; a give-back (registry.returned) before the
chain it names is served. A borrower that died is taken back once it has been dead for
--take-back-after seconds and no resume borrowed the disk again: the record's `serving` side (which
the migration recorded before serving anything from it) is served. A lent evacuation that serves its
destination cannot be: the destination has holes only the evacuation's hydration map knows how to
fill, so it stays unserved, and `list` says to resume it.

A record that cannot be read is reported (its file, one line, in the log and in `list`) and its disk
is not served; the others are. Guessing its chain could serve old data; not serving it makes the
damage visible at once, and restoring the file brings the disk back (restart the service).

Cost: no thread per disk. One thread polls every daemon's and borrower's pidfd (blocking while
nothing happens, so the idle service uses no CPU), a small pool starts daemons, and the control
socket has a thread per connected client.
"""

import concurrent.futures
import logging
import os
import select
import threading
import time
from pathlib import Path

from mirrorfs.common import jsonlines
from mirrorfs.daemons.storage import check_cache
from mirrorfs.datapath import statedir
from mirrorfs.errors import Error, UsageError
from mirrorfs.host import daemons as disk_daemons
from mirrorfs.host import registry as reg
from mirrorfs.host.daemons import DiskDaemon
from mirrorfs.host.named import Disk, Phase
from mirrorfs.host.requests import Requests
from mirrorfs.host.rundir import DISKS
from mirrorfs.sides import images, rbd
from mirrorfs.system import notify, sockets
from mirrorfs.system import pidfd as pidfds
from mirrorfs.system.access import Access

log = logging.getLogger("mirrorfs")

CONTROL = "host.ctl"
TAKE_BACK_AFTER = 10.0
START_WORKERS = 8
# A daemon that dies on its own is restarted, at most this many times in RESTART_WINDOW seconds.
RESTARTS, RESTART_WINDOW = 3, 60.0


class HostOptions:
    """What the operator asks of the host service, checked once, here, on its values: the storage
    daemons' cache mode, how long a dead borrower's disk waits for a resume, and the group the
    disks' sockets are shared with (looked up now, before anything starts). The CLI only parses
    the text; the Python API reaches the same rules."""

    def __init__(self, cache="auto", take_back_after=TAKE_BACK_AFTER, socket_group=None):
        check_cache(cache)
        if isinstance(take_back_after, bool) or not isinstance(take_back_after, (int, float)) or \
                not 0 <= take_back_after < 86400 * 365:
            raise UsageError(f"--take-back-after {take_back_after!r}: expected 0 or more seconds")
        self.cache, self.take_back_after = cache, float(take_back_after)
        self.access = Access(group=socket_group)
        self.access.check()


class HostService(Requests):
    """    service = HostService(Registry(path), RunDir(path), HostOptions(cache="none"))
           service.start()                      # every disk up; READY=1
           service.run(stop)                    # until a signal or a `shutdown` request
           service.close(shutdown=service.shutdown_requested)

    The control socket's commands are its base class's (mirrorfs.host.requests)."""

    def __init__(self, registry, rundir, options=None):
        # `options` (HostOptions) are checked when made: the CLI makes them before the registry
        # and the run directory, so that a mistake creates nothing. None: the defaults.
        options = options if options is not None else HostOptions()
        self.registry = registry
        self.access = options.access
        self.rundir = rundir
        self.cache = options.cache
        self.take_back_after = options.take_back_after
        self.directory = rundir.path / disk_daemons.SUBDIR
        self.control_path = rundir.path / CONTROL
        self.disks = {}
        self._lock = threading.Lock()          # the dict of disks
        self._stop = threading.Event()
        self._ready = threading.Event()         # every disk of the registry brought up
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._pool = concurrent.futures.ThreadPoolExecutor(START_WORKERS, thread_name_prefix="serve")
        self._server = None
        self._monitor = threading.Thread(target=self._watch, name="watch", daemon=True)

    # Start and stop.

    def start(self):
        self.directory.mkdir(mode=0o755, exist_ok=True)
        try:
            control = sockets.bind_unix(self.control_path)
        except UsageError as e:
            raise UsageError(f"{e} (a host service runs already?)") from None
        self._server = jsonlines.Server(control, self._handle, name="host control")
        good, bad = self.registry.scan()
        for path, error in bad:
            disk = self.disks[Path(path).stem] = Disk(Path(path).stem)
            disk.phase, disk.error = Phase.FAILED, error
            log.error("%s", error)
        for record in good:
            self.disks[record["name"]] = Disk(record["name"])
        self._stop_orphans()
        self._server.start()            # requests wait until every disk is up (_disk)
        t0 = time.monotonic()
        list(self._pool.map(lambda r: self._bring_up(self.disks[r["name"]], r), good))
        self._ready.set()
        self._monitor.start()
        self.rundir.register(DISKS, {"kind": "host", "control": str(self.control_path), "uris": [],
                                     "since": time.time(), "registry": str(self.registry.path)})
        counts = self.counts()
        summary = ", ".join(f"{n} {p}" for p, n in sorted(counts.items())) or "no disks"
        log.warning("host service: %s (%.1f s)", summary, time.monotonic() - t0)
        notify.ready(f"{len(self.disks)} disks: {summary}")
        return self

    def _all(self):
        """The disks now (a copy: requests add and remove disks meanwhile)."""
        with self._lock:
            return list(self.disks.values())

    def counts(self):
        counts = {}
        for disk in self._all():
            counts[disk.phase] = counts.get(disk.phase, 0) + 1
        return counts

    def run(self, stop):
        """Until `stop` (a signal) or a `shutdown` request."""
        while not stop.wait(1) and not self._stop.is_set():
            pass

    def close(self, shutdown=False):
        """Stop the service. The disks stay served unless `shutdown` (then every daemon is
        stopped, flushed, and the sockets closed; a lent disk stays with its borrower)."""
        notify.stopping()
        self._stop.set()
        self._wake()
        if self._server is not None:
            self._server.stop()
            self._server = None
            self.control_path.unlink(missing_ok=True)
        if shutdown:
            list(self._pool.map(self._shut, self._all()))
        self._pool.shutdown(wait=True)
        if self._monitor.is_alive():
            self._monitor.join(5)
        for disk in self._all():
            if disk.daemon is not None:
                disk.daemon.close()
            if disk.listener is not None:
                disk.listener.close()
            if disk.borrower is not None:
                os.close(disk.borrower[1])
                disk.borrower = None
        self.rundir.unregister(DISKS)

    def _shut(self, disk):
        with disk.lock:
            if disk.daemon is not None:
                disk.daemon.stop()
                disk.daemon = None
                disk_daemons.remove_entry(self.directory, disk.name)
                if disk.socket and disk.listener is not None:
                    Path(disk.socket).unlink(missing_ok=True)
            disk.phase = Phase.STOPPED if disk.phase != Phase.LENT else disk.phase

    def _stop_orphans(self):
        """Daemons of disks that are no longer in the registry (removed while no service ran)."""
        for name in os.listdir(self.directory):
            if not name.endswith(".json") or name.startswith(".") or name[:-5] in self.disks:
                continue
            name = name[:-5]
            daemon = DiskDaemon.adopt(self.directory, name, disk_daemons.read_entry(self.directory, name))
            if daemon is not None:
                log.warning("%s: no such disk in the registry any more; stopping its daemon (pid %d)",
                            name, daemon.pid)
                daemon.stop()
            disk_daemons.remove_entry(self.directory, name)

    # Serving one disk.

    def _bring_up(self, disk, record):
        """At the service's start: adopt the disk's daemon, or serve the record's chain anew; a lent
        disk stays with its borrower (or is taken back later if the borrower is gone)."""
        with disk.lock:
            disk.socket = record["socket"]
            entry = disk_daemons.read_entry(self.directory, disk.name) or {}
            try:
                daemon = DiskDaemon.adopt(self.directory, disk.name, entry)
                if daemon is not None:
                    disk.listener = daemon.listener(entry.get("inode"))
                    self._share_adopted(disk)
                    if (not record["lent"] and disk.listener is not None
                            and daemon.chain == reg.paths(record["chain"])):
                        disk.daemon = daemon
                        disk.phase = Phase.EXPORTING
                        return
                    if record["lent"]:
                        why = f"the record says it is lent to migration {record['lent']['migration']}"
                    elif disk.listener is None:
                        why = "its listening socket could not be taken back from it"
                    else:
                        why = f"the record says {' <- '.join(reg.paths(record['chain']))}"
                    log.warning("%s: its daemon (pid %d) serves %s, but %s: replacing it",
                                disk.name, daemon.pid, " <- ".join(daemon.chain), why)
                    daemon.stop()
                if record["lent"]:
                    self._resume_loan(disk, record, entry.get("inode"))
                    return
                self._serve(disk, record)
            except (Error, OSError) as e:
                self._failed(disk, str(e))

    def _listen(self, disk):
        """The disk's listening socket: ours already, or bound anew (a stale path replaced). Its
        directory is made if it is missing: after a reboot /run is empty again."""
        if disk.listener is None:
            parent = Path(disk.socket).parent
            if not parent.exists():
                old = os.umask(0o022)
                try:
                    parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                except OSError as e:
                    raise UsageError(f"cannot make the directory of the socket {disk.socket}: "
                                     f"{e.strerror}") from None
                finally:
                    os.umask(old)
            disk.listener = self.bind(disk.socket)
        return disk.listener

    def _share_adopted(self, disk):
        """A socket bound by an earlier service: this one's --socket-group (it may have changed)."""
        if disk.listener is not None and os.path.exists(disk.socket):
            self.access.share(disk.socket)

    def bind(self, path):
        """A disk's listening socket, bound anew: 0600, or 0660 and the --socket-group's."""
        listener = sockets.bind_unix(path)
        try:
            self.access.share(path)
        except UsageError:
            listener.close()
            Path(path).unlink(missing_ok=True)
            raise
        return listener

    def _serve(self, disk, record):
        """Serve the record's chain on the disk's socket with a new daemon (checked first: the chain
        on disk must be the record's, layer by layer, formats included)."""
        image = _image(record)
        self._listen(disk)
        disk.daemon = DiskDaemon.start(self.directory, disk.name, image, reg.paths(record["chain"]),
                                       disk.listener, self.cache)
        disk_daemons.write_entry(self.directory, disk.name, disk.inode, disk.daemon)
        disk.phase, disk.error = Phase.EXPORTING, None
        self._wake()

    def _failed(self, disk, error):
        disk.phase, disk.error = Phase.FAILED, error
        log.error("%s: %s", disk.name, error)

    def _resume_loan(self, disk, record, inode):
        """A restarted service finds the disk lent: watch the borrower, and get the socket back
        from it (or bind it anew if nothing listens there any more)."""
        lent = record["lent"]
        disk.phase = Phase.LENT
        if reg.borrower_alive(lent):
            pidfd = pidfds.pidfd_of(lent["pid"])
            if pidfd is not None:
                disk.borrower = (lent["pid"], pidfd)
                disk.listener = disk.listener or self._socket_from_borrower(lent["pid"], disk.socket,
                                                                            inode)
                self._share_adopted(disk)
                disk_daemons.write_entry(self.directory, disk.name, disk.inode, None)
                return
        disk.dead_since = time.monotonic()
        if not pidfds.listening_inodes(disk.socket):
            self._listen(disk)
        disk_daemons.write_entry(self.directory, disk.name, disk.inode, None)

    def _socket_from_borrower(self, pid, path, inode):
        """A copy of the disk's listening socket from the borrower or one of its children."""
        wanted = [inode] if inode else pidfds.listening_inodes(path)
        for candidate in [pid] + _children(pid):
            for ino in wanted:
                sock = pidfds.socket_of(candidate, ino)
                if sock is not None:
                    return sock
        return None

    # The watcher: daemons that die, borrowers that die, loans to take back.

    def _wake(self):
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def _watch(self):
        while not self._stop.is_set():
            poll = select.poll()
            poll.register(self._wake_r, select.POLLIN)
            watched = {}
            pending = False
            for disk in self._all():
                daemon, borrower = disk.daemon, disk.borrower
                if daemon is not None and daemon.pidfd is not None and not daemon.stopping \
                        and not daemon.reported:
                    watched[daemon.pidfd] = (disk, "daemon", daemon)
                if borrower is not None:
                    watched[borrower[1]] = (disk, "borrower", borrower)
                pending = pending or disk.dead_since is not None
            for fd in watched:
                poll.register(fd, select.POLLIN)
            events = poll.poll(500 if pending else None)
            for fd, _ in events:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                disk, kind, what = watched[fd]
                if kind == "daemon":
                    what.reported = True
                    self._pool_submit(self._daemon_exited, disk, what)
                else:
                    self._borrower_exited(disk, what)
            now = time.monotonic()
            for disk in self._all():
                if disk.dead_since is not None and now - disk.dead_since >= self.take_back_after:
                    disk.dead_since = None
                    self._pool_submit(self._take_back, disk)

    def _pool_submit(self, fn, *args):
        if not self._stop.is_set():
            try:
                self._pool.submit(fn, *args)
            except RuntimeError:        # shut down meanwhile
                pass

    def _daemon_exited(self, disk, daemon):
        with disk.lock:
            if disk.daemon is not daemon or daemon.stopping:
                return
            daemon.exited()
            tail = daemon.log_tail()
            daemon.close()
            disk.daemon = None
            self._wake()
            now = time.monotonic()
            disk.restarts = [t for t in disk.restarts if now - t < RESTART_WINDOW] + [now]
            if len(disk.restarts) > RESTARTS:
                self._failed(disk, f"its qemu-storage-daemon died {RESTARTS + 1} times in "
                             f"{RESTART_WINDOW:g} s; last: {tail or 'no log'}")
                return
            log.warning("%s: its qemu-storage-daemon (pid %d) died (%s); starting another",
                        disk.name, daemon.pid, tail or "no log")
            try:
                self._serve(disk, self.registry.get(disk.name))
            except Error as e:
                self._failed(disk, str(e))

    def _borrower_exited(self, disk, borrower):
        with disk.lock:
            if disk.borrower is not borrower:
                return
            os.close(borrower[1])
            disk.borrower = None
            disk.dead_since = time.monotonic()
            log.warning("%s: the migration that borrowed it (pid %d) is gone; taking the disk back "
                        "in %g s unless it is resumed", disk.name, borrower[0], self.take_back_after)

    def _take_back(self, disk):
        with disk.lock:
            try:
                record = self.registry.get(disk.name)
            except Error as e:
                self._failed(disk, str(e))
                return
            lent = record["lent"]
            if not lent or reg.borrower_alive(lent) or disk.phase != Phase.LENT:
                return                  # resumed, or handed back meanwhile
            if lent["evacuation"] and lent["serving"] == "destination" and not _hydrated(lent):
                disk.phase = Phase.STRANDED
                disk.error = (f"the evacuation {lent['migration']} died while hydrating; its "
                              "destination has holes only its hydration map can fill: resume it "
                              f"(mirrorfs start {disk.name} ... --state-dir "
                              f"{lent['state_dir'] or 'DIR'})")
                log.error("%s: %s", disk.name, disk.error)
                return
            holders = pidfds.holders(disk.inode) if disk.listener is not None else []
            if holders:
                log.warning("%s: the borrower's processes (%s) still hold its socket; waiting",
                            disk.name, ", ".join(map(str, holders)))
                disk.dead_since = time.monotonic()
                return
            disk.phase = Phase.TAKING_BACK
            try:
                record = self.registry.taken_back(disk.name, lent["migration"])
                log.warning("%s: taken back from migration %s (pid %d); serving %s", disk.name,
                            lent["migration"], lent["pid"], " <- ".join(reg.paths(record["chain"])))
                self._serve_retrying(disk, record)
            except Error as e:
                self._failed(disk, str(e))

    def _serve_retrying(self, disk, record, attempts=20):
        """Serve after a borrower died: its storage daemons (SIGTERMed when it died) may still hold
        the images' locks for a moment."""
        for attempt in range(attempts):
            try:
                return self._serve(disk, record)
            except Error as e:
                if attempt == attempts - 1 or "lock" not in str(e):
                    raise
                time.sleep(0.5)

    def _forget(self, disk):
        """Stop serving the disk and drop it (its record is gone, or never was)."""
        with disk.lock:
            if disk.daemon is not None:
                disk.daemon.stop()
                disk.daemon = None
            if disk.listener is not None:
                disk.listener.close()
                disk.listener = None
                Path(disk.socket).unlink(missing_ok=True)
            disk_daemons.remove_entry(self.directory, disk.name)
            disk.phase = Phase.STOPPED
            with self._lock:
                self.disks.pop(disk.name, None)
            self._wake()


def _image(record):
    """The ImageInfo to serve for the record: the chain on disk, checked against the record's."""
    top = record["chain"][0]
    if rbd.is_spec(top["path"]):
        return rbd.probe("disk", rbd.parse("disk", top["path"]))
    info = images.info(top["path"])
    on_disk = [{"path": os.fspath(p), "format": f} for p, f in zip(info.chain, info.formats)]
    if on_disk != record["chain"]:
        raise Error(f"the chain of {top['path']} on disk ({_spell(on_disk)}) is not the one the "
                    f"record names ({_spell(record['chain'])}); not served")
    return info


def _spell(chain):
    return " <- ".join(f"{layer['path']} ({layer['format']})" for layer in chain)


def _children(pid):
    """Every descendant of `pid` (a borrower's nbdkit holds the socket it borrowed)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{p}/task/{task}/children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _hydrated(lent):
    """Whether a dead evacuation's saved hydration map says its destination holds everything:
    every region hydrated, no range held and no hole left. Then a plain daemon serving the
    destination alone serves every acknowledged write (the map is saved after the destination's
    flush), and the disk is taken back like any other; otherwise it stays stranded until the
    evacuation is resumed. A state that cannot be read is not hydrated."""
    if not lent.get("state_dir"):
        return False
    try:
        state = statedir.load(lent["state_dir"])
        if state is None or not state.switch_first:
            return False
        found = statedir.open_map(state)
    except (statedir.StateError, OSError):
        return False
    return found.complete and not found.held and not found.holes
