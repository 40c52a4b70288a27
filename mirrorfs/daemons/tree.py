"""The process tree behind one served disk, and its one switch primitive.

    clients ──NBD──▶ nbdkit + mirrorfs data path ──NBD──▶ qemu-storage-daemon (source image)
                                                   └──NBD──▶ qemu-storage-daemon (destination image)

Image files get a storage daemon each; NBD URIs are used as they are. Everything is checked before
anything starts (a bad input leaves both sides untouched), and everything started is stopped on exit,
on a signal and on failure, in order: nbdkit first (its data path flushes both sides), then the daemons.

The tree knows processes, not phases: what the disk is doing, and which commands are allowed when, is
the business of the controller on top (mirrorfs.control.controller: `serve`'s Mirror, the Migration). The one
thing it does to the disk is `switch`: serve one side alone under a drain (the data path refuses a
second switch, and one to a destination that is not synchronized or does not answer), then retire the
side no longer used.
"""

import dataclasses
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from mirrorfs.common.phases import Phase
from mirrorfs.sides import endpoints, images
from mirrorfs.system import sockets
from mirrorfs.common import jsonlines
from mirrorfs.datapath.options import LAG_CONVERGE_MAX, LOCK_GRANULARITY
from mirrorfs.datapath import statedir
from mirrorfs.datapath.state import StateError
from mirrorfs.errors import Error, ProcessError, UsageError
from mirrorfs.daemons.nbdkit import Nbdkit, OperatorLines
from mirrorfs.system.children import LogRelay
from mirrorfs.daemons.storage import SharedStorageDaemon, StorageDaemon

log = logging.getLogger("mirrorfs")

# The sides, by the names the data path and the state use.
SIDES = ("source", "destination")
_DAEMON = {"source": "src", "destination": "dst"}


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


def identity(endpoint):
    """How the state names an endpoint: the image file, or the URI; and its size. A file also by
    its inode, so that another file put at the same path (a destination created afresh) is not
    taken for the one the state describes (datapath.statedir)."""
    if endpoint.is_image:
        found = {"image": str(endpoint.image.path), "format": endpoint.image.format,
                 "size": endpoint.size}
        if isinstance(endpoint.image, images.ImageInfo):        # not RBD
            try:
                found["inode"] = os.stat(endpoint.image.path).st_ino
            except OSError:
                pass
        return found
    return {"uri": endpoint.uri, "size": endpoint.size}


# How long stopping waits for the requests in flight to finish (the data path's quiesce), and
# how long once a storage daemon died (see ProcessTree._stop_nbdkit).
DRAIN = 10.0
DRAIN_AFTER_A_DEATH = 1.0


def lock_granularity(*sides):
    """The unit in which the data path serializes changes: the largest qcow2 cluster among the
    image sides (64 KiB, qcow2's default, for NBD URIs, whose format we cannot know)."""
    sizes = [ep.image.cluster_size if ep.is_image else LOCK_GRANULARITY
             for ep in sides if ep is not None]
    return max([s for s in sizes if s] + [4096])


class ProcessTree:
    """Storage daemons, nbdkit and the listening sockets of one served disk.

    After `start()`, `serving` says which side the data path serves alone ("source" or
    "destination"), or None while it mirrors; `state` is the mirror's state (None without a state
    directory), and `resumed` whether it was found rather than created."""

    def __init__(self, source, dest, options, listener=None):
        """`source`, `dest`: what the user named (image files or NBD URIs); `options`: ServeOptions;
        `listener`: the disk's listening socket when it is borrowed from a `mirrorfs export`
        (mirrorfs.control.export): served instead of binding one, and never closed by nbdkit's exit, so
        clients wait in its backlog while the disk changes hands."""
        options.check_sides(dest is not None)
        self.borrowed = listener
        self.source_spec, self.dest_spec = source, dest
        self.options = options
        self.access = options.access
        self.source = self.dest = None
        self.state = None
        self.resumed = False
        self.in_place = False           # an evacuation hydrating in place (datapath.evacuation.evacuee)
        self.serving = None
        self.reader = "source"          # while mirroring: the side reads come from (a group's net)
        # The last switch's word on the side it retired: True when it holds every change, flushed
        # inside the hold (the commit of a net); False when it may not; None: not asked.
        self.retired_complete = None
        self.rundir = None
        self.daemons = {}               # side -> StorageDaemon, for image sides
        self._shared = None             # with --one-daemon: the SharedStorageDaemon behind both
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
        o = self.options
        self.access.check(o.listen_address)
        # An evacuation only reads the source: a full or read-only one is what it is for.
        source = endpoints.resolve("source", self.source_spec,
                                   writable=not (o.readonly or o.switch_first))
        dest = endpoints.resolve("destination", self.dest_spec) if self.dest_spec else None
        if dest is not None:
            endpoints.check_distinct(source, dest)
        if shutil.which("nbdkit") is None:
            raise ProcessError("nbdkit is not installed (run 'make setup')")
        # The state directory before anything starts: a file missing, corrupt or someone else's
        # is refused while no storage daemon, no nbdkit and no socket exists yet.
        saved = self._check_state(source, dest)

        # The listening sockets first: a busy path or port fails before any daemon opens an image.
        if self.borrowed is not None:
            self._listeners.append(self.borrowed)
        elif o.socket_path:
            self._listeners.append(sockets.bind_unix(o.socket_path))
            self._own_socket = True
            self.access.share(o.socket_path)
        if o.listen_address:
            self._listeners.append(sockets.bind_tcp(*o.listen_address))

        self.rundir = make_rundir()
        in_place = self.in_place = self._hydrates_in_place(source, dest, saved)
        if o.one_daemon and source.is_image and dest is not None and dest.is_image:
            self._shared = SharedStorageDaemon(
                [("source", source.image, False), ("destination", dest.image, False)],
                self.rundir, "both", cache=o.cache)
            self.daemons.update(self._shared.sides)
            self._shared.start()
            source.uri, dest.uri = self.daemons["source"].uri, self.daemons["destination"].uri
        for side, ep in (("source", source), ("destination", dest)):
            if ep is not None and ep.is_image and side not in self.daemons:
                daemon = StorageDaemon(ep.image, self.rundir, _DAEMON[side],
                                       readonly=(o.readonly or o.switch_first) and side == "source",
                                       cache=o.cache,
                                       backing=source.image if in_place and side == "destination"
                                       else None)
                self.daemons[side] = daemon
                daemon.start()
                ep.uri = daemon.uri
        for ep in (source, dest):
            if ep is not None:
                endpoints.probe(ep)
        if dest is not None and dest.size < source.size:
            raise UsageError(f"destination {dest.spec} is smaller than source {source.spec} "
                             f"({dest.size} < {source.size} bytes)")
        self.source, self.dest = source, dest

        datapath = o.datapath(source.uri, dest.uri if dest else None, self.datapath_socket,
                              lock_granularity(source, dest))
        if in_place:
            datapath = dataclasses.replace(datapath, in_place=True,
                                           in_place_unit=dest.image.allocation_unit or 0)
        if dest is None:
            self.serving = "source"
        elif o.state_path is not None:
            datapath = self._open_state(datapath, saved)
        self.nbdkit = Nbdkit(self.rundir, self._listeners, datapath.to_params(),
                             readonly=o.readonly, threads=o.threads, access=self.access)
        self._relay = LogRelay(self.nbdkit.log_path, sys.stderr, select=OperatorLines()).start()
        self.nbdkit.start()
        for s in self._listeners:           # nbdkit has them now (a borrowed one we keep)
            if s is not self.borrowed:
                s.close()
        self._listeners = []

    def _check_state(self, source, dest):
        """The saved state, checked (datapath.statedir: every file there, one owner, these sides),
        or None when the directory holds none (and no other state directory holds these images).
        An NBD URI's size is asked now: a connection, no process."""
        o = self.options
        if o.state_path is None or dest is None:
            return None
        try:
            saved = statedir.load(o.state_path)
            if saved is None:
                statedir.refuse_taken(o.state_path, source=identity(source), dest=identity(dest),
                                      switch_first=o.switch_first)
                return None
            for ep in (source, dest):
                if not ep.is_image:
                    endpoints.probe(ep)
            return statedir.check(saved, copy=o.copy, source=identity(source),
                                  dest=identity(dest), switch_first=o.switch_first)
        except StateError as e:
            raise UsageError(str(e)) from None

    def _hydrates_in_place(self, source, dest, saved):
        """Whether an evacuation hydrates in place (datapath.evacuation.evacuee): both sides image files, the
        destination a qcow2 with no backing file of its own (the source chain becomes its runtime
        backing), and empty (copy-on-read keeps what it holds already); a resumed evacuation goes
        on as its state says."""
        o = self.options
        if not (o.switch_first and dest is not None and source.is_image and dest.is_image):
            return False
        if saved is not None:
            return saved.switch_first and saved.in_place and not saved.ended
        if not all(isinstance(ep.image, images.ImageInfo) for ep in (source, dest)):
            return False                # RBD
        return (dest.image.format == "qcow2" and len(dest.image.chain) == 1
                and images.is_empty(dest.image))

    def _open_state(self, datapath, saved):
        """The state checked before anything started (`saved`), or a new one; a restart after a
        switch or a cancel serves one side alone. Returns the data path's options."""
        source, dest = self.source, self.dest
        if saved is not None:
            self.state, self.resumed = saved, True
        else:
            try:
                self.state, self.resumed = statedir.open_for(
                    self.options.state_path, copy=self.options.copy,
                    source=identity(source), dest=identity(dest), size=source.size,
                    region_size=datapath.region, switch_first=self.options.switch_first,
                    in_place=self.in_place, disk=self.options.disk,
                    migration=self.options.migration)
            except StateError as e:
                raise UsageError(str(e)) from None
        if self.state.phase == Phase.SWITCHED:
            log.warning("the state says this disk switched to the destination: serving %s alone",
                        dest.spec)
            self._retire_daemon("source")
            self.serving = "destination"
            return datapath.alone(dest.uri, "destination")
        if self.state.reader == "destination":
            log.warning("the state says a group's pivot left this disk reading from %s, writing "
                        "to both", dest.spec)
            self.reader = "destination"
            return dataclasses.replace(datapath, net=True)
        if self.state.phase == Phase.CANCELLED:
            log.warning("the state says this mirror was cancelled: serving %s alone", source.spec)
            self._retire_daemon("destination")
            self.serving = "source"
            return datapath.alone(source.uri, "source")
        return datapath

    def stop(self):
        """Stop everything we started; safe to call at any point, and more than once."""
        if self.nbdkit is not None:
            self._stop_nbdkit()
        if self._relay is not None:
            self._relay.stop()
            self._relay = None
        if self._shared is not None:
            self._shared.stop()         # the whole process at once, not one export after the other
            self._shared = None
        for side in list(self.daemons)[::-1]:
            self._retire_daemon(side)
        for s in self._listeners:
            s.close()
        self._listeners = []
        if self.borrowed is not None:
            self.borrowed.close()           # our copy: the export keeps the socket listening
            self.borrowed = None
        if self._own_socket:
            self.options.socket_path.unlink(missing_ok=True)
            self._own_socket = False
        if self.rundir is not None:
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None

    def _stop_nbdkit(self):
        """Stop nbdkit so that no client request is ever answered with an error: a client with
        reconnection on (QEMU's reconnect-delay) retries a request that got no answer, but passes an
        error on to its guest.

        So the data path is first quiesced: new requests held for good, those in flight finished on
        both sides, both sides flushed. Then nbdkit is killed with SIGKILL, not SIGTERM: on SIGTERM
        nbdkit 1.32 answers the requests it holds with ESHUTDOWN (measured: 16 of 120 writes of a
        reconnecting qemu-io failed per restart), and with an idle client connected it does not
        exit at all. Killed, it drops every connection; the held requests stay unanswered and the
        client sends them again to whatever serves the socket next. Nothing is lost: every request
        that reached a side was finished and flushed before the kill.
        If the data path cannot be quiesced (it is hung, or a side is gone), it is killed all the
        same (nbdkit ignores SIGTERM, see mirrorfs.datapath.nbdkit.callbacks): a request that reached one
        side only is then covered by the write intent, with a state directory."""
        if self.nbdkit.alive():
            # A request waiting for a storage daemon that died never finishes (nothing starts it
            # again, GUARANTEES.md), while those on a living side take milliseconds: the usual
            # drain would only hold the restart back for its whole 10 s.
            dead = any(d.died() for d in self.daemons.values())
            drain = DRAIN_AFTER_A_DEATH if dead else DRAIN
            try:
                self._ask({"cmd": "quiesce", "timeout": drain}, timeout=drain + 110)
                # Nothing is in flight now: what may differ between the sides is final.
                self.final_status = self.datapath("status")["status"]
            except Error as e:
                log.warning("could not quiesce the data path before stopping: %s", e)
        self.nbdkit.stop(timeout=10, sig=signal.SIGKILL)

    def release_source(self):
        """An evacuation is hydrated: the data path let the source go; so do the destination's
        daemon (when it hydrated in place, the source was its runtime backing) and the source's."""
        self.serving = "destination"
        dest = self.daemons.get("destination")
        if dest is not None:
            dest.drop_backing()
        self._retire_daemon("source")

    def drop_source(self):
        """A group's safety net lost its source (its daemon died): the daemon leaves the list,
        so that its death is not taken for a crash of the disk; the data path degrades the
        source's failures until the commit retires it."""
        self._retire_daemon("source")

    def _retire_daemon(self, side):
        """Stop a side's storage daemon once the data path no longer uses it. It leaves the list
        first: the controller's watch (another thread) must not take its exit for a crash."""
        daemon = self.daemons.pop(side, None)
        if daemon is not None:
            daemon.stop()

    # Running.

    @property
    def datapath_socket(self):
        return self.rundir / "datapath.ctl"

    def datapath(self, cmd, timeout=120, **args):
        """A request to the data path inside nbdkit (status, set-rate, compare, quiesce); its
        refusal, or its absence, raises Error with the reason. The supervisor's one client of the
        data path's socket, where the protocol's ControlError becomes the supervisor's own tree
        (mirrorfs.errors): no caller above sees common's exception."""
        return self._ask({"cmd": cmd, **args}, timeout)

    def _ask(self, request, timeout):
        try:
            return jsonlines.call(self.datapath_socket, request, timeout=timeout)
        except jsonlines.ControlError as e:
            raise Error(str(e)) from None

    def datapath_status(self):
        """The data path's status, or {"error": why} when it cannot be asked."""
        if self.rundir is None:
            return {"error": "not running"}
        try:
            return self.datapath("status", timeout=10)["status"]
        except Error as e:
            return {"error": str(e)}

    def daemon_pids(self):
        """{side: the pid of the storage daemon serving it}, for image sides still in use: two
        sides with one pid share a daemon (--one-daemon)."""
        return {side: d.pid for side, d in self.daemons.items()}

    def daemon(self, side):
        """The storage daemon of a side, or None if that side is an NBD URI (or retired)."""
        return self.daemons.get(side)

    def switch(self, to, end, timeout=10.0, commit=None):
        """Serve side `to` alone from now on, recording `end` ("switched", "cancelled") in the
        state; then retire the other side's daemon. Returns the stall clients saw, in seconds.
        Raises Error with the data path's reason when it refuses (nothing changed then).

        `commit()`, when given, runs while the data path holds the clients' requests, after its
        checks and before the state and the sides change (datapath.mirror.disk.Disk.switch): the moment
        to record the end where others look (a named disk's record) before anything is served
        from the new side. It is served to the data path on a one-shot socket in the private run
        directory; raising refuses the switch."""
        reply = self._held("switch", to, end, timeout, commit, timeout + LAG_CONVERGE_MAX + 60,
                           end=end)
        self.retired_complete = reply.get("retired_complete")
        self.serving = to
        self._retire_daemon(SIDES[1 - SIDES.index(to)])
        return reply["stall_ms"] / 1000

    def read_from(self, to, timeout=10.0, commit=None):
        """A group's safety net (datapath.mirror.disk.Disk.read_from): reads from side `to`, changes
        still to both. `commit()` as for `switch`. Returns the stall clients saw, in seconds."""
        reply = self._held("read-from", to, "read-from", timeout, commit, timeout + 60)
        self.reader = to
        return reply["stall_ms"] / 1000

    def _held(self, cmd, to, what, timeout, commit, wait, **request):
        """Ask the data path for `cmd` (a switch, a change of reader) with `timeout` for its drain,
        waiting `wait` seconds for the reply (with --lag a switch first drains the lag), and serve
        `commit()` to it on a one-shot socket while it holds the requests (the commit's own time
        comes on top). Raises Error with the data path's reason when it refuses."""
        server = None
        if commit is not None:
            path = self.rundir / "commit.ctl"
            path.unlink(missing_ok=True)
            server = jsonlines.Server(sockets.bind_unix(path), _commit_handler(commit, to, what, self),
                                      "switch commit").start()
            request["commit"] = str(path)
            wait += 30
        try:
            return self._ask({"cmd": cmd, "to": to, "timeout": timeout, **request}, wait)
        finally:
            if server is not None:
                server.stop()
                Path(request["commit"]).unlink(missing_ok=True)

    @property
    def uris(self):
        found = []
        s = "s" if self.access.tls_required else ""
        o = self.options
        if o.socket_path:
            found.append(f"nbd{s}+unix:///?socket={o.socket_path}")
        if o.listen_address:
            host, port = o.listen_address
            found.append(f"nbd{s}://{'[' + host + ']' if ':' in host else host}:{port}/")
        return found

    def check_children(self):
        """Raise ProcessError if a child exited without being asked to."""
        for child in [self.nbdkit, *list(self.daemons.values())]:
            if child is not None and child.died():
                raise child.failure("exited unexpectedly")


def _commit_handler(commit, to, end, tree):
    """The one-shot socket's handler: the data path's {"cmd": "commit"} runs `commit()` once,
    with the tree's `retired_complete` set from it first (a group's commit reads it there)."""
    def handle(request):
        if request.get("cmd") != "commit" or request.get("to") != to or request.get("end") != end:
            raise jsonlines.ControlError(f"expected the commit of the switch to {to} ({end})")
        tree.retired_complete = request.get("retired_complete")
        try:
            commit()
        except Error as e:
            raise jsonlines.ControlError(str(e)) from None
        return {}
    return handle
