"""The data path inside nbdkit, assembled from its `key=value` parameters, and its control socket.

Parameters (all given by mirrorfs's supervisor, which also starts the storage daemons):
  source=URI        the authoritative side: reads, and the first write side (required)
  dest=URI          the mirror's destination (without it: the source alone)
  control=PATH      a unix socket for the supervisor: status, switch, quiesce
  mode=mirror|full  mirror: the sides start equal; full: copy the whole source first (default mirror)
  state=DIR         keep the state there (write intent, copy cursor, phase) so a restart resumes
  policy=fail|degrade   what a destination failure does to the client's request (default fail)
  rate=BYTES        limit the copier to BYTES per second
  region=BYTES      the dirty map's region size (default 64 MiB)
  granularity=BYTES changes within one such unit are serialized: the largest qcow2 cluster size
                    of the sides (default 64 KiB; see inflight)
  timeout=SECONDS   cut a mirror side's connection when a request waits longer (default 30; 0: never)
  parent=PID        the supervisor: when it exits, so does the data path (see lifeline)

The supervisor checks the state against the endpoints before starting nbdkit; this module trusts it
but still refuses a state whose size disagrees with the source.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import logging
import os
import socket
import threading
import time

from mirrorfs.datapath import jsonlines, lifeline
from mirrorfs.datapath.backend import BackendError, NbdBackend
from mirrorfs.datapath.dirtymap import DirtyMap
from mirrorfs.datapath.disk import DEFAULT_REGION, LOCK_GRANULARITY, Disk, NotSynchronized
from mirrorfs.datapath.inflight import DrainTimeout
from mirrorfs.datapath.copier import Copier
from mirrorfs.datapath.state import State, StateError

log = logging.getLogger("mirrorfs")

KEYS = ("source", "dest", "control", "mode", "state", "policy", "rate", "region", "granularity",
        "timeout", "parent")
DEFAULT_TIMEOUT = 30.0
WATCH_MIN = 0.02                # the watchdog's shortest sleep, seconds


class DataPath:
    def __init__(self):
        self.config = {}
        self.disk = None
        self.copier = None
        self.control = None

    def configure(self, key, value):
        if key not in KEYS:
            raise ValueError(f"unknown parameter {key!r} (expected one of {', '.join(KEYS)})")
        self.config[key] = value

    def check(self):
        c = self.config
        if "source" not in c:
            raise ValueError("missing parameter: source=URI")
        if c.get("mode", "mirror") not in ("mirror", "full"):
            raise ValueError("mode must be mirror or full")
        if c.get("policy", "fail") not in ("fail", "degrade"):
            raise ValueError("policy must be fail or degrade")
        if c.get("mode") == "full" and "dest" not in c:
            raise ValueError("mode=full needs dest=URI")

    def connect(self):
        c = self.config
        try:
            source = NbdBackend(c["source"], "source")
            dest = NbdBackend(c["dest"], "destination") if "dest" in c else None
        except BackendError as e:
            raise RuntimeError(str(e)) from None
        timeout = float(c.get("timeout", DEFAULT_TIMEOUT))
        if dest is not None and timeout > 0:
            # Reconnecting to a destination that stopped answering is bounded like its requests:
            # a client's write must not wait the full connect timeout after its cut.
            dest.connect_timeout = min(dest.connect_timeout, timeout)
        if dest is not None and dest.size < source.size:
            raise RuntimeError(f"destination is smaller than source ({dest.size} < {source.size} bytes)")
        full = c.get("mode") == "full"
        region = int(c.get("region", DEFAULT_REGION))
        state = self._state(source, dest, full, region) if "state" in c and dest is not None else None
        if state is not None:
            region = state.region_size
        dirty = DirtyMap(source.size, region, state, full=full)
        self.disk = Disk(source, dest, dirty, policy=c.get("policy", "fail"),
                         granularity=int(c.get("granularity", LOCK_GRANULARITY)))
        if dest is not None and (full or dirty.needs_copy):
            rate = int(c["rate"]) if c.get("rate") else None
            self.copier = Copier(self.disk, rate=rate)
            if dirty.needs_copy:
                log.info("resuming: %d regions may differ and will be copied again",
                         len(dirty.needs_copy))
            if full and dirty.cursor:
                log.info("resuming the full copy at %d of %d bytes", dirty.cursor, source.size)

    def _state(self, source, dest, full, region):
        try:
            state = State.load(self.config["state"])
        except StateError as e:
            raise RuntimeError(str(e)) from None
        if state is None:
            state = State(self.config["state"], mode="full" if full else "mirror",
                          source={"uri": source.uri, "size": source.size},
                          dest={"uri": dest.uri, "size": dest.size}, size=source.size,
                          region_size=region, phase="copying" if full else "synchronized")
            state.save()
        elif state.size != source.size:
            raise RuntimeError(f"the state in {self.config['state']} is for a {state.size}-byte "
                               f"disk, the source has {source.size} bytes")
        return state

    def start_threads(self):
        """After nbdkit's fork (if it forks): the control socket and the copier."""
        path = self.config.get("control")
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
        timeout = float(self.config.get("timeout", DEFAULT_TIMEOUT))
        if timeout > 0:
            threading.Thread(target=self._watch, args=(timeout,), name="request watchdog",
                             daemon=True).start()
        if "parent" in self.config:
            lifeline.watch(int(self.config["parent"]), self._orphaned)

    def _orphaned(self):
        """The supervisor died: what it would have done before stopping nbdkit (quiesce)."""
        if self.disk is not None:
            self.disk.quiesce(timeout=2.0)

    def _watch(self, timeout):
        """Cut the connections of a mirror side whose request has waited `timeout` seconds, waking
        when the oldest request falls due rather than on a fixed period (once a second let a
        request wait up to a second more, and more than that after a cut). Only mirror sides: a
        handle of the authoritative side is lent for the whole request, so it looks as old as the
        slowest side; and a slow source is what the client would wait for without mirrorfs too."""
        while True:
            due = timeout
            for side in self.disk.writers:
                if side is not self.disk.reader:
                    due = min(due, side.expire(timeout))
            # Not less than WATCH_MIN: a handle due "now" is cut in this pass, and a busy side
            # must not turn the watchdog into a spinning thread that competes for the GIL.
            time.sleep(max(due, WATCH_MIN))

    def status(self):
        status = self.disk.status()
        if self.copier is not None:
            status["copy"] = self.copier.status()
        if self.disk.dirty.state is not None:
            status["state"] = {"directory": str(self.disk.dirty.state.directory),
                               "phase": self.disk.dirty.state.phase}
        return status

    def handle(self, request):
        """The data path's control commands; the supervisor is the only client."""
        cmd = request["cmd"]
        if cmd == "status":
            return {"status": self.status()}
        if cmd == "switch":
            by_name = {b.name: b for b in self.disk.backends}
            try:
                reader = by_name[request["reader"]]
                writers = [by_name[name] for name in request["writers"]]
                timeout = float(request.get("timeout", 10))
                phase = request.get("phase")
            except (KeyError, TypeError, ValueError) as e:
                raise jsonlines.ControlError(f"switch: bad arguments: {e}") from None
            try:
                stall = self.disk.switch(reader, writers, timeout, phase=phase,
                                         require_synchronized=reader is self.disk.dest)
            except (DrainTimeout, NotSynchronized) as e:
                raise jsonlines.ControlError(f"switch refused: {e}") from None
            if self.copier is not None and reader is not self.disk.source:
                self.copier.stop()
            log.info("switched: reads from %s, writes to %s; clients held %.1f ms", reader.name,
                     ", ".join(w.name for w in writers), stall * 1000)
            return {"stall_ms": stall * 1000}
        if cmd == "quiesce":
            try:
                self.disk.quiesce(float(request.get("timeout", 10)))
            except DrainTimeout as e:
                raise jsonlines.ControlError(f"quiesce: {e}") from None
            return {}
        raise jsonlines.ControlError(f"unknown command {cmd!r}")

    def close(self):
        if self.copier is not None:
            self.copier.stop()
        if self.control is not None:
            self.control.stop()
        if self.disk is None:
            return
        for side in set(self.disk.writers):
            try:
                if side.can_flush:
                    side.call(lambda h: h.flush())
            except Exception as e:      # shutting down: report, go on closing the others
                log.error("%s: flush on exit failed: %s", side.name, e)
            side.close()
