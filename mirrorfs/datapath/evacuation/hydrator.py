"""The background hydration of an evacuation (--switch-first): every region not hydrated yet is
copied from the source to the destination and committed (datapath.evacuation.hydration), then the source is
released (Evacuee.finish).

- In region order from the first unhydrated one, several workers at once, each copying a batch of
  regions (BATCH) under their range lock, so a client's change to those bytes waits for the copy or
  the copy for it (evacuee).
- Allocation-aware (Evacuee.copy_range, on the one copy of a range, datapath.sides.copy): zero and
  unallocated extents become zero requests; a lost connection is sent again.
- In place (evacuee, `in_place`): a batch is one NBD_CMD_CACHE to the destination, whose daemon
  copies it from the source (its runtime backing) itself; the bytes never cross nbdkit, so a
  batch is larger (BATCH_IN_PLACE). Measured (docs/PERFORMANCE.md, "Evacuation"): 1 GiB in about
  the time of `qemu-img convert`, with a seventh of the CPU the copy through nbdkit takes.
- Committed in groups: a worker hands its batch to `commit`, which flushes the destination and
  saves the map once for every batch handed in meanwhile (and every client change waiting).
- Rate-limited by the copies' one pacer (common.pacing), as the mirror's copier: `--rate`, then
  the host budget's share of it (`set_rate`, from the data path's `set-rate` command; 0 holds the
  hydration while the host's copies are queued). A batch reserves its bytes before it is copied,
  outside its range lock, and a limited hydration takes batches of about a sixteenth of a
  second's worth (whole regions, at least one). What is paid is what the sides carry: through
  nbdkit the data read (zero extents are given back), in place the whole batch (the destination's
  daemon reads all of it). And it yields to clients: while a client request came in the last
  YIELD_WINDOW, only one worker copies.
- A region that cannot be copied is retried with backoff (RETRY_FIRST doubling to RETRY_MAX) and
  listed in status with the error and **the side that failed** (the SideFailure's, which in place
  already tells the source's failure through the destination's backing from the destination's
  own, datapath.evacuation.evacuee): `unreadable` when the source could not read it (its data is at risk),
  `unwritable` when the destination could not take it (full: ENOSPC; failing). The others go on
  meanwhile. A commit whose flush or save fails is the destination's too (`commit_failures`).

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import errno
import logging
import threading
import time

from mirrorfs.datapath.background import BackgroundCopy
from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.evacuation.hydration import HydrationError
from mirrorfs.datapath.errors import DrainTimeout

log = logging.getLogger("mirrorfs")

BATCH = 8                       # regions copied under one range lock (8 MiB with 1 MiB regions)
BATCH_IN_PLACE = 32             # regions per NBD_CMD_CACHE when hydrating in place
WORKERS = 4
YIELD_WINDOW = 0.05             # seconds since a client request during which one worker copies
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
IDLE = 0.5                      # how often an idle hydrator looks again (regions given back)


class Hydrator(BackgroundCopy):
    """The evacuation's background copy (datapath.background: the contract the service drives)."""

    section = "hydrator"
    name = "hydrator"

    def __init__(self, disk, rate=None, workers=WORKERS, batch=None):
        super().__init__(disk, rate, workers)
        self.map = disk.map
        # The most regions in a batch: in place, large ones unless rate-limited (see _batch_size).
        self.batch = batch or (BATCH_IN_PLACE if disk.in_place else BATCH)
        self.finished_at = None
        self._lock = threading.Lock()
        self._next = 0                  # the next region to look at
        self._taken = set()             # regions a worker is copying now
        # region -> {"side", "error", "errno", "attempts", "retry_at"}: regions that failed to copy
        self._unreadable = {}
        # Commits whose flush or save failed (the destination's; its failed copies are counted in
        # the side's stats, as a client request's)
        self.commit_failures = 0
        self.last_commit_error = None

    @property
    def copying(self):
        """Is there anything left to hydrate?"""
        return not (self.map.complete or self.disk.ended)

    def _own_status(self):
        elapsed = (self.finished_at or time.monotonic()) - self.started
        m = self.map
        with self._lock:
            now = time.monotonic()
            failed = [{"offset": m.span(r)[0], "length": m.span(r)[1] - m.span(r)[0],
                       "side": info["side"], "error": info["error"], "errno": info["errno"],
                       "attempts": info["attempts"],
                       "retry_in": round(max(0.0, info["retry_at"] - now), 1)}
                      for r, info in sorted(self._unreadable.items())]
        return {"rate": round((self.bytes_read + self.bytes_zeroed) / elapsed) if elapsed else 0,
                "unreadable": [f for f in failed if f["side"] != "destination"],
                "unwritable": [f for f in failed if f["side"] == "destination"],
                "commit_failures": self.commit_failures,
                "last_commit_error": self.last_commit_error,
                "seconds": round(elapsed, 3), "finished": self.finished_at is not None}

    # The loop.

    def _run(self, index):
        while not self._stop.is_set() and not self.disk.ended:
            if index and time.monotonic() - self.disk.last_client_request < YIELD_WINDOW:
                self._stop.wait(YIELD_WINDOW)
                continue
            batch = self._take()
            if batch is None:
                if self.map.complete and not self._taken:
                    self._finish()
                else:
                    self._stop.wait(IDLE)
                continue
            try:
                self._copy(batch)
            finally:
                with self._lock:
                    self._taken.difference_update(batch)

    def _take(self):
        """Up to `batch` consecutive regions to copy: not hydrated, not taken, not waiting for a
        retry. None if there is none now."""
        now = time.monotonic()
        with self._lock:
            for start in (self._next, 0):
                r = self.map.next_unhydrated(start)
                while r is not None and (r in self._taken or self._unreadable.get(
                        r, {}).get("retry_at", 0) > now):
                    r = self.map.next_unhydrated(r + 1)
                if r is not None:
                    break
            if r is None:
                return None
            batch = [r]
            size = self._batch_size()
            while len(batch) < size and r + 1 < self.map.count:
                r += 1
                if self.map.hydrated(r) or r in self._taken or r in self._unreadable:
                    break
                batch.append(r)
            self._taken.update(batch)
            self._next = batch[-1] + 1
            return batch

    def _batch_size(self):
        """Regions in the next batch: `batch`, or under a limit about a sixteenth of a second's
        worth (Pacer.chunk), so a share holds within each second and a new one applies soon."""
        region = self.map.region_size
        return max(1, self.pacer.chunk(self.batch * region, region) // region)

    def _copy(self, batch):
        disk, m = self.disk, self.map
        lo, hi = m.span(batch[0])[0], m.span(batch[-1])[1]
        # Outside the range lock: a batch that waits for its rate holds no client write.
        if not self.pacer.reserve(hi - lo, self._stop):
            return
        token = disk.inflight.enter_range("hydrate", lo, hi)
        copied = []
        paid = 0                        # data this batch read (in place: all of it)
        try:
            todo = [r for r in batch if not (m.hydrated(r) or m.is_copied(r))]
            if len(todo) == len(batch):
                # The usual case: the whole batch in one go (its reads all in flight at once, then
                # its writes). Region by region below only if that fails, to find the bad ones.
                try:
                    read, zeroed = disk.copy_range(lo, hi)
                    paid += read
                    self.bytes_read += read
                    self.bytes_zeroed += zeroed
                    copied = batch
                    batch = []
                    with self._lock:
                        for r in copied:
                            self._unreadable.pop(r, None)
                except sideio.SideFailure:
                    pass
            for r in batch:
                if m.hydrated(r) or m.is_copied(r):
                    copied.append(r)
                    continue
                try:
                    read, zeroed = disk.copy_region(r)
                except sideio.SideFailure as e:
                    self._cannot_copy(r, e)
                    continue
                paid += read
                self.bytes_read += read
                self.bytes_zeroed += zeroed
                copied.append(r)
                with self._lock:
                    self._unreadable.pop(r, None)
        finally:
            disk.inflight.leave(token)
            # What the sides carried is paid; what was skipped, or zero, is given back.
            self.pacer.settle(hi - lo, paid)
        if copied:
            try:
                m.commit(copied)
            except HydrationError as e:
                with self._lock:
                    self.commit_failures += 1
                    self.last_commit_error = str(e)
                log.warning("hydration of [%d, %d) not saved, will retry: %s", lo, hi, e)
                self._stop.wait(RETRY_FIRST)

    def _cannot_copy(self, r, e):
        """Region `r` failed to copy: `e.side` failed (the source could not read it, or the
        destination could not take it); retried later, listed under that side meanwhile."""
        side = e.side.name
        with self._lock:
            info = self._unreadable.get(r, {"attempts": 0})
            attempts = info["attempts"] + 1
            delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
            self._unreadable[r] = {"side": side, "attempts": attempts, "error": str(e),
                                   "errno": errno.errorcode.get(e.errno, str(e.errno)),
                                   "retry_at": time.monotonic() + delay}
        self.disk.stats[e.side.name].failed("hydrate", e.offset, e.length, e.cause)

    def _finish(self):
        try:
            if self.disk.finish():
                self.finished_at = time.monotonic()
                log.info("hydration done: %d bytes read, %d zeroed in %.1fs", self.bytes_read,
                         self.bytes_zeroed, self.finished_at - self.started)
        except (DrainTimeout, sideio.SideFailure) as e:
            log.warning("ending the hydration failed (will retry): %s", e)
            self._stop.wait(RETRY_FIRST)
