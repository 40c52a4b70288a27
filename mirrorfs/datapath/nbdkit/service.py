"""The data path inside nbdkit, assembled from its options, and its control socket.

The options (mirrorfs.datapath.options) come from nbdkit's `key=value` parameters, written by the
supervisor, which also starts the storage daemons and creates the state directory: this module only
loads a state, it never creates one (nor a hydration map), and refuses one whose size disagrees with
the source, or whose files are missing, corrupt or not all of one migration (datapath.statedir: the
supervisor checked them before starting anything; this is the second line of defence).

The control socket (the supervisor is its only client) takes:
    {"cmd": "status"}                                   the disk, the sides, the copier
    {"cmd": "switch", "to": "destination", "end": "switched", "timeout": 10}
    {"cmd": "switch", "to": "source", "end": "cancelled"}
                                                        with "commit": PATH, the data path asks
                                                        PATH {"cmd": "commit", "to", "end",
                                                        "retired_complete"} while it holds the
                                                        requests, before the state and the sides
                                                        change (Disk.switch)
    {"cmd": "quiesce"}                                  before the process stops
    {"cmd": "compare", "seconds": 580}                  a mirror's sides, byte by byte (serve's
                                                        pivot with --copy none: datapath.mirror.compare)
    {"cmd": "set-rate", "rate": N}                      the limit of the copier or the hydrator
                                                        (the host budget's share)

When the supervisor dies (`parent`), the kernel kills nbdkit at once (see lifeline).

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import functools
import logging
import os
import socket
import threading
import time

from mirrorfs.datapath.nbdkit import lifeline
from mirrorfs.datapath.sides import sideio
from mirrorfs.common import jsonlines
from mirrorfs.datapath.sides.backend import NbdBackend
from mirrorfs.datapath.mirror.copier import Copier
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.errors import DrainTimeout, SideUnreachable, StateError, SwitchRefused
from mirrorfs.datapath.evacuation.evacuee import Evacuee
from mirrorfs.datapath.evacuation.hydration import HydrationError, HydrationMap
from mirrorfs.datapath.evacuation.hydrator import Hydrator
from mirrorfs.datapath.options import DataPathOptions
from mirrorfs.datapath.state import ENDS
from mirrorfs.datapath import statedir

log = logging.getLogger("mirrorfs")

WATCH_MIN = 0.02                # the watchdog's shortest sleep, seconds


class DataPath:
    def __init__(self):
        self.params = {}
        self.options = None
        # The served disk (datapath.served: a mirror's Disk or an evacuation's Evacuee) and its
        # background copy (datapath.background: the mirror's Copier or the evacuation's
        # Hydrator), chosen by connect(); from then on driven through their contracts alone.
        self.disk = None
        self.copier = None
        self.control = None

    def configure(self, key, value):
        self.params[key] = value

    def check(self):
        self.options = DataPathOptions.from_params(self.params)

    def connect(self):
        o = self.options
        try:
            source = NbdBackend(o.source, o.source_label)
            dest = NbdBackend(o.dest, "destination") if o.dest else None
        except SideUnreachable as e:
            raise RuntimeError(str(e)) from None
        timeout = o.io_timeout
        if dest is not None and timeout > 0:
            # Reconnecting to a destination that stopped answering is bounded like its requests:
            # a client's write must not wait the full connect timeout after its cut.
            dest.connect_timeout = min(dest.connect_timeout, timeout)
        if dest is not None and dest.size < source.size:
            raise RuntimeError(f"destination is smaller than source ({dest.size} < {source.size} bytes)")
        state = self._state(source) if o.state and dest is not None else None
        if o.switch_first:
            self._evacuate(source, dest, state)
            return
        region = state.region_size if state is not None else o.region
        dirty = DirtyMap(source.size, region, state, full=o.copy == "full")
        self.disk = Disk(source, dest, dirty, policy=o.policy, granularity=o.granularity,
                         net=o.net, lag=o.lag)
        if dest is not None:
            # In every mode: a change that reached only the source (degrade) is copied again by it.
            # Held (rate 0) until the supervisor gives it its share of the host budget.
            self.copier = Copier(self.disk, rate=0 if o.hold else o.rate)
            if dirty.needs_copy:
                log.info("resuming: %d regions may differ and will be copied again",
                         len(dirty.needs_copy))
            if o.copy == "full" and dirty.cursor:
                log.info("resuming the full copy at %d of %d bytes", dirty.cursor, source.size)

    def _evacuate(self, source, dest, state):
        """--switch-first: the destination serves from now on, the source is only read."""
        if not state.switch_first:
            raise RuntimeError(f"the state in {state.directory} is a mirror's, not an evacuation's")
        try:
            in_place = self.options.in_place
            hydration = HydrationMap.open(state.directory, source.size, state.region_size,
                                          in_place=in_place, create=False,
                                          flush=functools.partial(sideio.flush, dest))
            if hydration.owner != state.owner:
                raise HydrationError(f"{state.directory / statedir.HYDRATION} is not migration "
                                     f"{state.migration}'s")
            self.disk = Evacuee(source, dest, hydration, state, granularity=self.options.granularity,
                                in_place=in_place, copy_on_read=self.options.copy_on_read,
                                unit=self.options.in_place_unit)
        except (HydrationError, ValueError) as e:
            raise RuntimeError(str(e)) from None
        # Held (rate 0) until the supervisor gives it its share of the host budget, as a copier.
        o = self.options
        self.copier = Hydrator(self.disk, rate=0 if o.hold else o.rate)
        log.info("evacuating: %d of %d regions hydrated", hydration.hydrated_count, hydration.count)

    def _state(self, source):
        directory = self.options.state
        try:
            state = statedir.load(directory)
        except StateError as e:
            raise RuntimeError(str(e)) from None
        if state is None:
            raise RuntimeError(f"no state in {directory}: the supervisor creates it")
        if state.phase in ENDS:
            raise RuntimeError(f"the state in {directory} says the mirror {state.phase}; "
                               "serve one side alone")
        if state.size != source.size:
            raise RuntimeError(f"the state in {directory} is for a {state.size}-byte disk, the "
                               f"source has {source.size} bytes")
        return state

    def start_threads(self):
        """After nbdkit's fork (if it forks), in its main thread: the death signal (lifeline), the
        control socket and the copier."""
        if self.options.parent is not None:
            lifeline.arm(self.options.parent)
        path = self.options.control
        if path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)            # a socket file is created 0777 & ~umask: 0600
            try:
                sock.bind(path)
            finally:
                os.umask(old)
            sock.listen(8)
            self.control = jsonlines.Server(sock, self.handle, "datapath control").start()
        if self.copier is not None:
            self.copier.start()
        self.disk.start()
        timeout = self.options.io_timeout
        if timeout > 0 and self.disk.watched_sides():
            threading.Thread(target=self._watch, args=(timeout,), name="request watchdog",
                             daemon=True).start()

    def _watch(self, timeout):
        """Cut the connections of a watched side (the disk's watched_sides: a mirror's mirror
        sides) whose request has waited `timeout` seconds, waking when the oldest request falls
        due rather than on a fixed period (once a second let a request wait up to a second more,
        and more than that after a cut)."""
        while True:
            due = timeout
            for side in self.disk.watched_sides():
                due = min(due, side.expire(timeout))
            # Not less than WATCH_MIN: a handle due "now" is cut in this pass, and a busy side
            # must not turn the watchdog into a spinning thread that competes for the GIL.
            time.sleep(max(due, WATCH_MIN))

    def status(self):
        status = self.disk.status()
        if self.copier is not None:
            status[self.copier.section] = self.copier.status()
        return status

    def handle(self, request):
        """The data path's control commands; the supervisor is the only client."""
        cmd = request["cmd"]
        if cmd == "status":
            return {"status": self.status()}
        if cmd == "switch":
            try:
                to, end = request["to"], request["end"]
                timeout = float(request.get("timeout", 10))
                if end not in ENDS:
                    raise ValueError(f"end must be one of {', '.join(ENDS)}")
            except (KeyError, TypeError, ValueError) as e:
                raise jsonlines.ControlError(f"switch: bad arguments: {e}") from None
            commit = request.get("commit")
            if commit is not None and not isinstance(commit, str):
                raise jsonlines.ControlError("switch: commit must be a socket path")
            try:
                stall = self.disk.switch(to, end, timeout,
                                         commit=_committer(commit, to, end, timeout)
                                         if commit else None)
            except (DrainTimeout, SwitchRefused, StateError, ValueError) as e:
                raise jsonlines.ControlError(f"switch refused: {e}") from None
            if self.copier is not None:
                self.copier.stop()
            log.info("%s: serving the %s alone; clients held %.1f ms", end, to, stall * 1000)
            return {"stall_ms": stall * 1000, "retired_complete": self.disk.retired_complete}
        if cmd == "read-from":
            # A group's safety net (Disk.read_from): reads from `to`, changes still to both.
            try:
                to = request["to"]
                timeout = float(request.get("timeout", 10))
            except (KeyError, TypeError, ValueError) as e:
                raise jsonlines.ControlError(f"read-from: bad arguments: {e}") from None
            commit = request.get("commit")
            if commit is not None and not isinstance(commit, str):
                raise jsonlines.ControlError("read-from: commit must be a socket path")
            try:
                stall = self.disk.read_from(to, timeout, commit=_committer(
                    commit, to, "read-from", timeout) if commit else None)
            except (DrainTimeout, SwitchRefused, StateError, ValueError) as e:
                raise jsonlines.ControlError(f"switch refused: {e}") from None
            log.info("reading from the %s, writing to both; clients held %.1f ms", to, stall * 1000)
            return {"stall_ms": stall * 1000}
        if cmd == "set-rate":
            return self._set_rate(request.get("rate"))
        if cmd == "compare":
            seconds = request.get("seconds")
            if seconds is not None and (isinstance(seconds, bool) or
                                        not isinstance(seconds, (int, float)) or seconds <= 0):
                raise jsonlines.ControlError("compare: seconds must be a positive number")
            return self._compare(seconds)
        if cmd == "quiesce":
            try:
                self.disk.quiesce(float(request.get("timeout", 10)))
            except DrainTimeout as e:
                raise jsonlines.ControlError(f"quiesce: {e}") from None
            return {}
        raise jsonlines.ControlError(f"unknown command {cmd!r}")

    def _compare(self, seconds):
        """The first offset where the mirror's sides differ (None: none found), the bytes compared
        (the whole disk, unless `seconds` ran out first) and whether the sides are
        identical; refused once the mirror ended, and in an evacuation (only the destination holds
        the changes there)."""
        try:
            found = self.disk.compare(seconds)
        except sideio.SideFailure as e:
            raise jsonlines.ControlError(f"compare: {e}") from None
        if found is None:
            raise jsonlines.ControlError("compare: only a mirror that has not ended compares its "
                                         "sides")
        offset, compared = found
        return {"identical": offset is None and compared >= self.disk.size, "offset": offset,
                "bytes": compared, "size": self.disk.size}

    def _set_rate(self, rate):
        """The limit of the copy from now on (the mirror's copier, or an evacuation's hydrator):
        bytes/s, 0 to hold it (queued by the host budget), or null for none. Answers with its
        status and whether it has anything to copy (`copying`): the host budget's only probe."""
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int) or rate < 0):
            raise jsonlines.ControlError("set-rate: rate must be a non-negative integer or null")
        written = self.disk.inflight.bytes["write"]
        if self.copier is None:
            return {"copy": None, "copying": False, "written": written}
        self.copier.set_rate(rate)
        return {"copy": self.copier.status(), "copying": self.copier.copying,
                "ended": self.disk.ended, "written": written}

    def close(self):
        if self.copier is not None:
            self.copier.stop()
        if self.control is not None:
            self.control.stop()
        if self.disk is not None:
            self.disk.stop()


def _committer(path, to, end, timeout):
    """The switch's commit: the supervisor's answer on `path` (a one-shot socket it serves for the
    length of the switch). No answer, or a refusal, refuses the switch."""
    def commit(retired_complete):
        try:
            jsonlines.call(path, {"cmd": "commit", "to": to, "end": end,
                                  "retired_complete": retired_complete}, timeout=timeout)
        except jsonlines.ControlError as e:
            raise SwitchRefused(f"the end was not recorded ({e}); nothing changed") from None
    return commit
