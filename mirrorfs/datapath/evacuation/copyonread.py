"""Copy-on-read of an evacuation (--switch-first --copy-on-read): a client's read of a region not
hydrated also hydrates that region, so a guest's working set leaves the source first.

- The client is answered first: `offer()` (called by Evacuee.pread after the read) only queues
  the regions it read, with the bytes of those it read whole; one worker thread hydrates them.
- A region read whole from the source is written to the destination from the bytes the client
  got (no second read of the source); a region read in part (or in place) is copied as the
  hydrator copies it (Evacuee.copy_region: from the source, or one NBD_CMD_CACHE in place).
- Under the hydrator's range locks (InFlight.enter_range over the whole region), and only if the
  region is still untouched once the lock is held: a client change to it since the read (copied,
  held ranges, hydrated) wins, so the bytes read earlier never go over a newer write. What the
  source holds never changes, so bytes read from it before the lock are still its bytes after.
- Committed like the hydrator's batches (HydrationMap.commit: destination flushed, map saved),
  one commit for all the regions the worker took at once.
- Bounded: at most QUEUE_BYTES of read bytes wait; beyond that a read is not queued (counted as
  `skipped`), and the hydrator gets to its regions in its own order. A region that fails to copy
  is left to the hydrator too (counted as `failed`).

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import collections
import logging
import threading

from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.evacuation.hydration import HydrationError

log = logging.getLogger("mirrorfs")

QUEUE_BYTES = 64 * 1024 * 1024  # bytes read that may wait for the worker
QUEUE_REGIONS = 1024            # regions that may wait


class CopyOnRead:
    def __init__(self, disk):
        self.disk = disk
        self.map = disk.map
        self._cond = threading.Condition()
        self._queue = collections.deque()   # (region, bytes read of it whole, or None)
        self._queued = set()
        self._queued_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copy-on-read", daemon=True)
        self.bytes_hydrated = 0
        self.regions_hydrated = 0
        self.skipped = 0
        self.failed = 0

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def status(self):
        return {"bytes": self.bytes_hydrated, "regions": self.regions_hydrated,
                "queued": len(self._queue), "skipped": self.skipped, "failed": self.failed}

    def offer(self, offset, view):
        """The client read `view` at `offset`: queue the regions it touched that are not
        hydrated, with the bytes of each one it read whole from the source."""
        m = self.map
        end = offset + len(view)
        found = []
        for r in m.regions(offset, end):
            if m.hydrated(r) or m.is_copied(r) or r in self._queued:
                continue
            lo, hi = m.span(r)
            whole = not self.disk.in_place and offset <= lo and hi <= end and not \
                m.on_destination(r)
            found.append((r, bytes(view[lo - offset:hi - offset]) if whole else None))
        if not found:
            return
        with self._cond:
            for r, data in found:
                size = len(data) if data is not None else 0
                if r in self._queued:
                    continue
                if (len(self._queue) >= QUEUE_REGIONS
                        or self._queued_bytes + size > QUEUE_BYTES):
                    self.skipped += 1
                    continue
                self._queue.append((r, data))
                self._queued.add(r)
                self._queued_bytes += size
            self._cond.notify()

    def _run(self):
        while not self._stop.is_set() and not self.disk.ended:
            with self._cond:
                while not self._queue and not self._stop.is_set():
                    self._cond.wait(0.5)
                    if self.disk.ended:
                        return
                taken = list(self._queue)
                self._queue.clear()
            try:
                done = [r for r, data in taken if self._hydrate(r, data)]
                if done:
                    self._commit(done)
            finally:
                with self._cond:
                    for r, data in taken:
                        self._queued.discard(r)
                        self._queued_bytes -= len(data) if data is not None else 0

    def _hydrate(self, r, data):
        """Put region `r` on the destination under its range lock, unless a change or the
        hydrator got there first. True if this copied it."""
        disk, m = self.disk, self.map
        lo, hi = m.span(r)
        token = disk.inflight.enter_range("copy-on-read", lo, hi)
        try:
            if disk.ended or m.hydrated(r) or m.is_copied(r):
                return False
            if data is not None and not m.on_destination(r):
                sideio.write(disk.dest, data, lo, False, disk.max_request)
                m.mark_copied([r])
            else:
                disk.copy_region(r)
            return True
        except sideio.SideFailure as e:
            self.failed += 1
            log.warning("copy-on-read of [%d, %d) failed, left to the hydrator: %s", lo, hi, e)
            return False
        finally:
            disk.inflight.leave(token)

    def _commit(self, regions):
        try:
            self.map.commit(regions)
        except HydrationError as e:
            self.failed += len(regions)
            log.warning("copy-on-read of %d regions not saved, left to the hydrator: %s",
                        len(regions), e)
            return
        for r in regions:
            lo, hi = self.map.span(r)
            self.bytes_hydrated += hi - lo
            self.regions_hydrated += 1
