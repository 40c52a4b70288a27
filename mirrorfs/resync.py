"""The copier inside the data path: it copies from the source to the destination whatever may differ.

- Full mode's first pass: the whole disk, in order, from the saved cursor.
- Regions to copy again: a change that reached only the source (degrade policy), or regions a crash
  left unknown.

Each chunk is copied *as a change*: under the disk's range lock, so a client write to the same bytes
either waits for the chunk or the chunk waits for it. Either way the destination ends with the
newest data: a write that came first is read back from the source by the copy, a write that comes
after is mirrored over it. With write intent and the cursor (see dirtymap), this is why the copy always
converges under any write load: writes are mirrored synchronously and never make more to copy.

The copy is allocation-aware: the source's block status says where data is; data is read and
written, zero and unallocated extents become zero requests (may trim) on the destination.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import logging
import threading
import time

import nbd

from mirrorfs.backend import BackendError, describe

log = logging.getLogger("mirrorfs")

CHUNK = 1024 * 1024             # held under the range lock at a time: what a client write may wait for
MAINTENANCE_INTERVAL = 2.0      # how often the cursor is saved and quiet regions are cleared
RETRY_DELAY = 1.0


class CopyFailed(Exception):
    pass


class Copier:
    def __init__(self, disk, rate=None, chunk=CHUNK):
        self.disk = disk
        self.dirty = disk.dirty
        self.rate = rate                # bytes per second, or None
        self.chunk = chunk
        self.bytes_read = 0             # data copied
        self.bytes_zeroed = 0           # zero/unallocated extents written as zero requests
        self.failures = 0
        self.started = time.monotonic()
        self.synchronized_at = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copier", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self.dirty.changed.set()

    def status(self):
        elapsed = time.monotonic() - self.started
        return {"first_pass_bytes": self.dirty.cursor, "size": self.disk.size,
                "bytes_read": self.bytes_read, "bytes_zeroed": self.bytes_zeroed,
                "read_rate": round(self.bytes_read / elapsed) if elapsed else 0,
                "rate_limit": self.rate, "failures": self.failures,
                "dest_available": self.disk.dest.available if self.disk.dest else None,
                "synchronized_seconds": (round(self.synchronized_at - self.started, 3)
                                         if self.synchronized_at else None)}

    # The loop.

    def _mirroring(self):
        d = self.disk
        return d.dest is not None and d.reader is d.source and d.dest in d.writers

    def _run(self):
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
        while not self._stop.is_set() and self._mirroring():
            try:
                worked = self._step()
            except CopyFailed:
                self.failures += 1
                self._stop.wait(max(RETRY_DELAY, self.disk.dest.down_until - time.monotonic()))
                continue
            if time.monotonic() >= next_maintenance:
                self._maintain()
                next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
            if not worked:
                if self.synchronized_at is None and self.dirty.synchronized():
                    self.synchronized_at = time.monotonic()
                    log.info("synchronized: the destination holds the whole disk (%.1fs)",
                             self.synchronized_at - self.started)
                    self.dirty.save_phase("synchronized")
                self.dirty.changed.wait(MAINTENANCE_INTERVAL)
                self.dirty.changed.clear()

    def _step(self):
        """Copy one chunk or one region; False if there was nothing to copy."""
        if not self.dirty.first_pass_done():
            start = self.dirty.cursor
            end = min(start + self.chunk, self.disk.size)
            self._copy(start, end)
            self.dirty.advance(end)
            return True
        region = self.dirty.take_region()
        if region is None:
            return False
        self.synchronized_at = None
        start = region * self.dirty.region_size
        end = min(start + self.dirty.region_size, self.disk.size)
        try:
            for pos in range(start, end, self.chunk):
                self._copy(pos, min(pos + self.chunk, end))
        except CopyFailed:
            self.dirty.give_back(region)
            raise
        return True

    def _maintain(self):
        try:
            self.dirty.save_cursor(lambda: self.disk.dest.call(lambda h: h.flush()))
            self.dirty.clean(self._flush_sides)
        except (nbd.Error, BackendError) as e:
            log.warning("saving the copy's progress failed (will retry): %s", describe(e))

    def _flush_sides(self):
        for side in self.disk.writers:
            side.call(lambda h: h.flush())

    # One chunk.

    def _copy(self, start, end):
        disk = self.disk
        token = disk.inflight.enter_range("copy", start, end)
        try:
            intent = self.dirty.before_change(start, end)
            ok = False
            try:
                for offset, length, zero in self._extents(start, end):
                    if zero:
                        disk.dest.call(lambda h: h.zero(length, offset))
                        self.bytes_zeroed += length
                    else:
                        data = disk.source.call(lambda h: h.pread(length, offset))
                        disk.dest.call(lambda h: h.pwrite(data, offset))
                        self.bytes_read += length
                ok = True
            except (nbd.Error, BackendError) as e:
                log.warning("copy of [%d, %d) failed, will retry: %s", start, end, describe(e))
                raise CopyFailed() from None
            finally:
                self.dirty.after_change(intent, both_sides=ok)
        finally:
            disk.inflight.leave(token)
        self._throttle()

    def _extents(self, start, end):
        """(offset, length, reads_as_zero) covering [start, end), from the source's block status."""
        source = self.disk.source
        if not source.can_extents:
            yield start, end - start, False
            return
        pos = start
        while pos < end:
            found = source.extents(end - pos, pos, req_one=False)
            if not found:
                yield pos, end - pos, False
                return
            for offset, length, flags in found:
                stop = min(offset + length, end)
                if stop > pos:
                    yield pos, stop - pos, bool(flags & nbd.STATE_ZERO)
                    pos = stop
                if pos >= end:
                    break

    def _throttle(self):
        if not self.rate:
            return
        ahead = self.bytes_read / self.rate - (time.monotonic() - self.started)
        if ahead > 0:
            self._stop.wait(ahead)
