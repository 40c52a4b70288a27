"""One bandwidth budget for every copy on the host, shared max-min fair, with no daemon.

The budget is a file, RUN_DIR/budget.json, written whole by `mirrorfs budget set`:
    {"rate": 33554432,        bytes/s all copies together may read (null: no host limit)
     "max_copies": 2,         copies that run at once; the others are queued, in order (null: any)
     "floor": 4194304,        while the host's clients write more than busy_writes bytes/s, the
     "busy_writes": 67108864}  copies together get only `floor` (DRBD's c-min-rate); null: never

Every copy (a serve's full copy or resync, a migration's base copy or resync, an evacuation's
hydration: one per process) has an entry in RUN_DIR/copies/,
rewritten every TICK seconds by a thread of its own process (`Share`):
    {"disk": "/run/vm1.sock", "cap": 4194304 | null, "since": 1700000000.123, "done": bytes,
     "time": when `done` was read, "rate": measured bytes/s,
     "writes": the disk's client write bytes/s, "share": applied bytes/s}
On each tick every process reads all live entries and computes every copy's share with the same
function (`shares`), then applies its own to its copier. The processes agree because they compute
the same function of the same files; a change (a copy starts, ends, changes its cap, the budget is
edited) is seen by everyone at their next tick, so shares are re-divided within 2 x TICK. A process
that dies leaves a stale entry, ignored at once (mirrorfs.host.rundir), so its share goes back to the
others; the budget file outlives every process.

The division (`shares`) is water-filling: the admitted copies are taken in increasing order of their
cap; each gets min(its cap, what is left / copies left). A copy capped below the fair share keeps
its cap, and what it leaves is divided among the rest: max-min fairness. A copy's cap is its own
--rate; without one, it is unlimited and takes only its fair share.
"""

import json
import math
import os
import threading
import time

from mirrorfs.common.sizes import human_size
from mirrorfs.errors import UsageError
from mirrorfs.host.rundir import COPIES, write_atomically

BUDGET = "budget.json"
TICK = 0.25                     # seconds between two looks at the run directory, per copy
FIELDS = ("rate", "max_copies", "floor", "busy_writes")


def load(rundir):
    """The budget: a dict with every field of FIELDS (None when not set)."""
    path = rundir.file(BUDGET)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        data = {}
    except ValueError:
        raise UsageError(f"{path} is not a budget file (remove it, or set the budget again)") from None
    return {k: data.get(k) for k in FIELDS}


# How an operator spells each field (the CLI's options), for the one-line refusal of a bad value.
SPELLING = {"rate": "budget rate", "max_copies": "--max-copies", "floor": "--floor",
            "busy_writes": "--busy-writes"}


def check(changes):
    """The budget's rules, on values, once: every field a positive whole number (bytes a second,
    or copies) or None (no limit). Both the CLI, which only parses the text, and the Python API
    come through here before anything is written."""
    for field, value in changes.items():
        if field not in FIELDS:
            raise UsageError(f"budget: no field {field!r} (one of {', '.join(FIELDS)})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise UsageError(f"{SPELLING[field]} {value!r}: expected a positive number")


def save(rundir, **changes):
    """Change some fields of the budget (None removes a limit); returns the new budget."""
    check(changes)
    budget = load(rundir)
    budget.update(changes)
    write_atomically(rundir.file(BUDGET), budget)
    return budget


def describe(budget):
    parts = [f"rate {human_size(budget['rate']) + '/s' if budget['rate'] else 'unlimited'}",
             f"max copies {budget['max_copies'] or 'unlimited'}"]
    if budget.get("floor"):
        parts.append(f"floor {human_size(budget['floor'])}/s while clients write more than "
                     f"{human_size(budget['busy_writes'])}/s")
    return ", ".join(parts)


def host_rate(budget, entries):
    """The rate all copies share now: the budget, or its floor while the host's clients are busy."""
    rate = budget["rate"]
    if budget.get("floor") and budget.get("busy_writes"):
        writes = sum(e.get("writes") or 0 for e in entries)
        if writes > budget["busy_writes"]:
            rate = min(rate or math.inf, budget["floor"])
    return rate


def shares(budget, entries):
    """Every copy's share: {pid: bytes/s (0: queued), or None: no limit at all}.

    `entries` are the live copy entries, oldest first. The first `max_copies` run; the others get
    0 (queued) until one of those ends. The running ones divide the host rate by water-filling."""
    limit = budget.get("max_copies")
    running = entries if not limit else entries[:limit]
    result = {e["pid"]: 0 for e in entries[len(running):]}
    rate = host_rate(budget, entries)
    if rate is None:
        result.update({e["pid"]: e.get("cap") for e in running})
        return result
    left, count = float(rate), len(running)
    for e in sorted(running, key=lambda e: e.get("cap") or math.inf):
        share = min(e.get("cap") or math.inf, left / count)
        result[e["pid"]] = max(1, int(share))
        left -= share
        count -= 1
    return result


class Share:
    """This process's copy in the host budget: a thread that, every TICK, asks `probe()` about the
    copy, writes its entry, computes the shares and gives its own to `apply(rate)`.

    `probe()` returns None when there is nothing to copy (no entry then), else a dict with "done"
    (bytes copied so far, by the copier's own count) and optionally "written" (the bytes the disk's
    clients wrote so far; the floor looks at their rate). `apply(rate)`: None (no limit), 0 (hold:
    queued), or bytes/s."""

    def __init__(self, rundir, disk, probe, apply, cap=None):
        self.rundir = rundir
        self.disk = str(disk)
        self.probe, self.apply = probe, apply
        self.cap = cap
        self.share = None               # what was applied last
        # A count of the copies that started held (renew), and how many of them the last apply
        # covered. A count, not a flag: a renew that lands while apply() runs on the tick's thread
        # must survive that apply's end (a flag set back to "applied" after the call lost it, and
        # a group's third base copy stayed held at rate 0 forever).
        self._renewals = 0
        self._covered = -1
        self.queued = False
        self.registered = None          # the "since" of the current entry
        self._samples = []              # (time, done) over the last second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host budget", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def renew(self):
        """A copy that starts held began under this process's entry (a migration's base copy while
        its resync keeps the entry registered): give it the share at the next tick, even though
        the share itself did not change."""
        self._renewals += 1

    def stop(self):
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.rundir.unregister(COPIES)

    def set_cap(self, cap):
        self.cap = cap

    def _run(self):
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:           # a copier that went away meanwhile; the next tick sees
                pass
            self._stop.wait(TICK)

    def tick(self):
        info = self.probe()
        now = time.monotonic()
        if info is None:
            if self.registered is not None:
                self.rundir.unregister(COPIES)
                self.registered = None
            self._samples.clear()
            self.queued = False
            self._give(self.cap)
            return
        written = info.get("written", 0)
        self._samples = [s for s in self._samples if now - s[0] <= 1.0] + [(now, info["done"], written)]
        t0, d0, w0 = self._samples[0]
        rate = round((info["done"] - d0) / (now - t0)) if now > t0 else 0
        writes = round((written - w0) / (now - t0)) if now > t0 else 0
        if self.registered is None:
            self.registered = time.time()
            self.renew()                    # a new copy (held until it gets its share)
        self.rundir.register(COPIES, {"disk": self.disk, "cap": self.cap, "since": self.registered,
                                      "time": time.time(), "done": info["done"], "rate": rate,
                                      "writes": writes, "share": self.share})
        budget = load(self.rundir)
        mine = shares(budget, self.rundir.entries(COPIES)).get(os.getpid(), self.cap)
        self.queued = mine == 0
        self._give(mine)

    def _give(self, rate):
        renewals = self._renewals         # read before apply(): a renew during it is seen next tick
        if rate != self.share or renewals != self._covered:
            self.apply(rate)
            self.share = rate
            self._covered = renewals
