"""What a served disk is doing now, and who may change it: the part every controller shares.

A controller sits on top of one process tree (mirrorfs.daemons.tree) and owns:
- **the phase**, changed only under one lock. Every command that changes it (copy, pivot, cancel;
  verify too, as it must not run beside a switch) takes the lock for its whole length; a second
  command meanwhile is refused at once with the reason ("cannot cancel: pivot is in progress"), and
  once the first is done the phase itself refuses what no longer fits ("cannot cancel while
  switched"). The data path refuses a second switch on its own as well, and the state journal a
  second end: the loser of a race is refused at every layer, never half-applied.
- **the event log**: phase changes, and the data path's own events (synchronized, errors, degraded
  writes), watched while serving;
- **the status**, in one schema: kind, phase, uris, serving, source, destination, events, datapath,
  and optional sections (copy, switch, state) that the display shows only when present;
- **the command table** the control socket serves (mirrorfs.control.socket): only the commands this
  controller really has.

Two controllers exist: `serve`'s Mirror (mirrorfs.control.mirror) and the Mirrored-Snapshot Migration
(mirrorfs.control.migration).
"""

import contextlib
import math
import threading
import time

from mirrorfs.common.phases import Phase
from mirrorfs.common.sizes import rate_value
from mirrorfs.errors import UsageError
from mirrorfs.control.events import EventLog


class PhaseError(UsageError):
    """A command that does not fit the current phase, or that came while another one runs."""


def number(request, key, default=None):
    """A non-negative, finite number from a control request (None when absent)."""
    value = request.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or not math.isfinite(value):
        raise UsageError(f"{request['cmd']}: {key} must be a non-negative finite number")
    return value


def rate(request, key="rate"):
    """A rate from a control request: bytes/s, at least 1, or None (absent or null: no limit). A
    0 or a fraction is refused (common.sizes.rate_value): it once meant "no limit"."""
    try:
        return rate_value(request.get(key), f"{request['cmd']}: {key}")
    except ValueError as e:
        raise UsageError(str(e)) from None


class Controller:
    kind = "?"

    def __init__(self):
        self.log = EventLog()
        self.tree = None
        self.phase = Phase.NEW
        self.phase_since = time.monotonic()
        self._change = threading.Lock()
        self._busy = None               # the command holding the lock, for refusals
        self.finished = threading.Event()   # the controller's work is over (a hand-back): stop

    # The phase machine.

    @contextlib.contextmanager
    def changing(self, command, *phases):
        """Run a phase-changing command: refused if another one runs, or if the phase is not one
        of `phases`."""
        if not self._change.acquire(blocking=False):
            raise PhaseError(f"cannot {command}: {self._busy or 'another command'} is in progress")
        try:
            self._busy = command
            self.require(command, *phases)
            yield
        finally:
            self._busy = None
            self._change.release()

    @contextlib.contextmanager
    def internal_change(self):
        """A change the controller makes on its own (a copy that finished, stopping): it waits for
        a command in progress instead of being refused."""
        with self._change:
            yield

    def require(self, command, *phases):
        if self.phase not in phases:
            raise PhaseError(f"cannot {command} while {self.shown_phase()}"
                             f" (possible when {' or '.join(phases)})")

    def enter(self, phase, **details):
        self.phase = phase
        self.phase_since = time.monotonic()
        self.log.add("phase", phase=phase, **details)

    @property
    def uris(self):
        """Where clients connect (after start)."""
        return self.tree.uris if self.tree else []

    def shown_phase(self):
        """The phase as status shows it (a controller may refine it from the data path's)."""
        return self.phase

    # Events.

    def events(self, since=0, timeout=None):
        """Yield events after sequence number `since`, waiting for new ones (see EventLog)."""
        return self.log.follow(since, timeout)

    def run(self, stop, interval=0.5):
        """Serve until `stop` (a threading.Event) is set or the work is over (`finished`). A child
        that dies on its own raises ProcessError (see `check`)."""
        seen = {}
        while not stop.wait(interval) and not self.finished.is_set():
            self.check(seen)

    def check(self, seen):
        """One look at the processes, every `interval`: a dead child raises ProcessError, and the
        data path's own events become events of this log (`seen` is what was seen before)."""
        self.tree.check_children()
        self._watch(seen)

    def _watch(self, seen):
        dp = self.tree.datapath_status()
        if "error" in dp:
            return
        synced = dp.get("synchronized") and dp.get("ended") is None and self.tree.dest is not None
        if synced and not seen.get("synchronized"):
            self.log.add("synchronized", dirty_bytes=0)
            self.on_synchronized()
        seen["synchronized"] = synced
        for name, side in dp.get("sides", {}).items():
            before = seen.get(name, {"errors": 0, "degraded": 0})
            if side["errors"] > before["errors"]:
                self.log.add("error", side=name, errors=side["errors"],
                             last_error=side.get("last_error"))
            if side["degraded"] > before["degraded"]:
                self.log.add("degraded", side=name, degraded=side["degraded"])
            seen[name] = {"errors": side["errors"], "degraded": side["degraded"]}

    def on_synchronized(self):
        """The data path just reported the sides synchronized."""

    # Status and commands.

    def status(self):
        tree = self.tree
        status = {"kind": self.kind, "phase": self.shown_phase(),
                  "phase_seconds": round(time.monotonic() - self.phase_since, 3),
                  "uris": self.uris,
                  "serving": tree.serving if tree else None,
                  "source": None, "destination": None,
                  "events": self.log.recent(5)}
        if tree is not None and tree.nbdkit is not None and self.phase != Phase.STOPPED:
            status["datapath"] = tree.datapath_status()
            status["storage_daemons"] = tree.daemon_pids()
        return status

    def commands(self):
        """The control socket's table: name -> handler(request) -> dict, or an iterator of dicts."""
        table = {
            "status": lambda r: {"status": self.status()},
            "events": lambda r: ({"event": e} for e in self.events(since=int(number(r, "since", 0)))),
        }
        if self.copies:
            table["rate"] = lambda r: self.set_cap(rate(r)) or {}
        return table

    # The host (mirrorfs.host): a controller whose disk copies data says how much it has copied
    # (copy_probe) and takes the rate the host budget gives it (copy_apply); `host_share`, the
    # budget's thread, is set by whoever registered the disk in a run directory.

    copies = False
    host_share = None

    @property
    def queued(self):
        """The copy waits for a slot of the host's concurrent-copy limit."""
        return self.host_share is not None and self.host_share.queued

    def copy_cap(self):
        """The operator's own limit of this disk's copy (bytes/s), or None."""
        return None

    def set_cap(self, cap):
        """A new limit of this disk's copy (the `rate` command); a cap under the host budget."""
        if self.host_share is not None:
            self.host_share.set_cap(cap)
        else:
            self.copy_apply(cap)
        self.log.add("rate", rate=cap)

    # The copy inside the data path (a mirror's copier, the resync of a migration's degraded writes,
    # an evacuation's hydration) runs in the phases `datapath_copies`; the data path's `set-rate`
    # sets its limit and answers whether it has anything to copy. `_datapath_rate` is the limit
    # as last set (0: held until the first share), sent again at each look.
    datapath_copies = ()
    _datapath_rate = None

    def copy_probe(self):
        """None when nothing is being copied, else {"done": bytes copied, "written": client
        write bytes so far}."""
        if self.phase not in self.datapath_copies:
            return None
        copying, done, written = self._datapath_copy()
        return {"done": done, "written": written} if copying else None

    def copy_apply(self, rate):
        """The copy's limit from now on: None, 0 (queued), or bytes/s."""
        self._datapath_rate = rate
        if self.phase in self.datapath_copies:
            self.tree.datapath("set-rate", rate=rate, timeout=5)

    def _datapath_copy(self):
        """The data path's copy, its limit set again: (anything to copy, bytes paid for by its
        pacer, bytes the disk's clients wrote)."""
        reply = self.tree.datapath("set-rate", rate=self._datapath_rate, timeout=5)
        copy = reply.get("copy")
        if copy is None:
            return False, 0, reply["written"]
        return bool(reply.get("copying")), copy["paid_bytes"], reply["written"]

    def switch_commands(self):
        """The commands of a controller that mirrors (its `verify`, `pivot` and `cancel`)."""
        return {
            "verify": lambda r: dict(zip(("identical", "detail"), self.verify())),
            "pivot": lambda r: {"stall_ms": round(self.pivot(force=r.get("force") is True) * 1000, 3)},
            "cancel": lambda r: self.cancel() or {},
        }
