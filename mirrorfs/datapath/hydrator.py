"""The background hydration of an evacuation (--switch-first): every region not hydrated yet is
copied from the source to the destination and committed (datapath.hydration), then the source is
released (Evacuee.finish).

- In region order from the first unhydrated one, several workers at once, each copying a batch of
  regions (BATCH) under their range lock, so a client's change to those bytes waits for the copy or
  the copy for it (evacuee).
- Allocation-aware (sideio.copy): zero and unallocated extents become zero requests.
- In place (evacuee, `in_place`): a batch is one NBD_CMD_CACHE to the destination, whose daemon
  copies it from the source (its runtime backing) itself; the bytes never cross nbdkit, so a
  batch is larger (BATCH_IN_PLACE). Measured (docs/PERFORMANCE.md, "Evacuation"): 1 GiB in about
  the time of `qemu-img convert`, with a seventh of the CPU the copy through nbdkit takes.
- Committed in groups: a worker hands its batch to `commit`, which flushes the destination and
  saves the map once for every batch handed in meanwhile (and every client change waiting).
- Rate-limited (`--rate`), and yields to clients: while a client request came in the last
  YIELD_WINDOW, only one worker copies.
- A region the source cannot read is retried with backoff (RETRY_FIRST doubling to RETRY_MAX) and
  listed in status (`unreadable`) with the error; the others go on meanwhile.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import errno
import logging
import threading
import time

from mirrorfs.datapath import sideio
from mirrorfs.datapath.hydration import HydrationError
from mirrorfs.datapath.errors import DrainTimeout

log = logging.getLogger("mirrorfs")

BATCH = 8                       # regions copied under one range lock (8 MiB with 1 MiB regions)
BATCH_IN_PLACE = 32             # regions per NBD_CMD_CACHE when hydrating in place
WORKERS = 4
YIELD_WINDOW = 0.05             # seconds since a client request during which one worker copies
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
IDLE = 0.5                      # how often an idle hydrator looks again (regions given back)


class Hydrator:
    def __init__(self, disk, rate=None, workers=WORKERS, batch=None):
        self.disk = disk
        self.map = disk.map
        self.rate = rate
        # In place, large batches unless rate-limited (then small ones, paced before each copy:
        # the whole batch is read by the destination's daemon, so it counts whole).
        self.batch = batch or (BATCH_IN_PLACE if disk.in_place and not rate else BATCH)
        self._next_slot = 0.0           # in place with a rate: when the next batch may start
        self.bytes_read = 0
        self.bytes_zeroed = 0
        self.started = time.monotonic()
        self.finished_at = None
        self._lock = threading.Lock()
        self._next = 0                  # the next region to look at
        self._taken = set()             # regions a worker is copying now
        self._unreadable = {}           # region -> {"error", "errno", "attempts", "retry_at"}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"hydrator {i}",
                                          daemon=True) for i in range(workers)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        self._stop.set()

    def status(self):
        elapsed = (self.finished_at or time.monotonic()) - self.started
        m = self.map
        with self._lock:
            now = time.monotonic()
            unreadable = [{"offset": m.span(r)[0], "length": m.span(r)[1] - m.span(r)[0],
                           "error": info["error"], "errno": info["errno"],
                           "attempts": info["attempts"],
                           "retry_in": round(max(0.0, info["retry_at"] - now), 1)}
                          for r, info in sorted(self._unreadable.items())]
        return {"bytes_read": self.bytes_read, "bytes_zeroed": self.bytes_zeroed,
                "rate": round((self.bytes_read + self.bytes_zeroed) / elapsed) if elapsed else 0,
                "rate_limit": self.rate, "unreadable": unreadable,
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
                self._pace(batch)
                self._copy(batch)
            finally:
                with self._lock:
                    self._taken.difference_update(batch)
            self._throttle()

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
            while len(batch) < self.batch and r + 1 < self.map.count:
                r += 1
                if self.map.hydrated(r) or r in self._taken or r in self._unreadable:
                    break
                batch.append(r)
            self._taken.update(batch)
            self._next = batch[-1] + 1
            return batch

    def _copy(self, batch):
        disk, m = self.disk, self.map
        lo, hi = m.span(batch[0])[0], m.span(batch[-1])[1]
        token = disk.inflight.enter_range("hydrate", lo, hi)
        copied = []
        try:
            todo = [r for r in batch if not (m.hydrated(r) or m.is_copied(r))]
            if len(todo) == len(batch):
                # The usual case: the whole batch in one go (its reads all in flight at once, then
                # its writes). Region by region below only if that fails, to find the bad ones.
                try:
                    read, zeroed = disk.copy_range(lo, hi)
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
                    self._cannot_read(r, e)
                    continue
                self.bytes_read += read
                self.bytes_zeroed += zeroed
                copied.append(r)
                with self._lock:
                    self._unreadable.pop(r, None)
        finally:
            disk.inflight.leave(token)
        if copied:
            try:
                m.commit(copied, disk._flush_dest)
            except HydrationError as e:
                log.warning("hydration of [%d, %d) not saved, will retry: %s", lo, hi, e)
                self._stop.wait(RETRY_FIRST)

    def _cannot_read(self, r, e):
        with self._lock:
            info = self._unreadable.get(r, {"attempts": 0})
            attempts = info["attempts"] + 1
            delay = min(RETRY_FIRST * 2 ** (attempts - 1), RETRY_MAX)
            self._unreadable[r] = {"attempts": attempts, "error": str(e),
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

    def _pace(self, batch):
        """In place with a rate: wait for this batch's turn (its bytes at `rate`)."""
        if not (self.rate and self.disk.in_place):
            return
        lo, hi = self.map.span(batch[0])[0], self.map.span(batch[-1])[1]
        with self._lock:
            start = max(self._next_slot, time.monotonic())
            self._next_slot = start + (hi - lo) / self.rate
        self._stop.wait(max(0.0, start - time.monotonic()))

    def _throttle(self):
        if not self.rate or self.disk.in_place:
            return
        ahead = self.bytes_read / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            self._stop.wait(ahead)
