"""The copier inside the data path: it copies from the source to the destination whatever may differ.

- Full mode's first pass: the whole disk, in order, from the saved cursor.
- Regions to copy again: a change that reached only the source (degrade policy), or regions a crash
  left unknown.

Each chunk is copied *as a change*: under the disk's range lock, so a client write to the same bytes
either waits for the chunk or the chunk waits for it. Either way the destination ends with the
newest data: a write that came first is read back from the source by the copy, a write that comes
after is mirrored over it. With write intent and the cursor (see dirtymap), this is why the copy always
converges under any write load: writes are mirrored synchronously and never make more to copy.

The copy of a range is the one every copy makes (datapath.sides.copy): allocation-aware (the
source's block status says where data is; data is read and written, zero and unallocated extents
become zero requests that may trim), in chunks paced by the copier's pacer and stoppable between
them. This module gives it the copier's policy: each chunk under the range lock and write intent
(`_held`), the counters after each chunk, the cursor after a first-pass chunk, the region cleared
after the whole region's copy (never before: the region differs until its last chunk is copied).

This module runs inside nbdkit's embedded interpreter: standard library only (the sides are backends).
"""

import contextlib
import logging
import threading
import time

from mirrorfs.datapath.background import BackgroundCopy
from mirrorfs.datapath.sides.backend import describe
from mirrorfs.datapath.sides.copy import copy_range
from mirrorfs.datapath.errors import CopyFailed, SideError, SideFailure, Stopped

log = logging.getLogger("mirrorfs")

CHUNK = 4 * 1024 * 1024         # held under the range lock at a time: what a client write may wait for
# Chunks copied at once. A chunk reads, then writes: with a remote destination the writes wait for
# its latency, so too few chunks leave it idle between them (scripts/bench/remote.py, 1 GiB to RBD: 0.75x of
# qemu-img convert with 3, 0.80-0.89x with 6, the same with 8; to a local export or a 1 ms NBD one,
# 3 and 6 are the same). More also holds more of the disk under range locks (6 x CHUNK = 24 MiB).
WORKERS = 6
# A copy under a rate limit copies chunks of about a sixteenth of a second's worth (Pacer.chunk),
# down to this: smooth at the rates a host budget hands out (a few MiB/s per copy), where one 4 MiB
# chunk would be a second's worth, and each is held under the range lock for less time.
PACED_CHUNK = 256 * 1024
MAINTENANCE_INTERVAL = 2.0      # how often the cursor is saved and quiet regions are cleared
RETRY_DELAY = 1.0
# A chunk holds its range lock while the destination takes it, so copying to a destination that
# fails (or hangs until --io-timeout cuts it) would hold the client's writes to those bytes too. The
# copier therefore lets a failing destination settle: it copies only once the destination went this
# long without a failure, doubling after each failed chunk, back to the first value after a success.
SETTLE_FIRST = 2.0
SETTLE_MAX = 60.0


class Copier(BackgroundCopy):
    """The mirror's background copy (datapath.background: the contract the service drives)."""

    section = "copy"
    name = "copier"

    def __init__(self, disk, rate=None, chunk=CHUNK, workers=WORKERS):
        super().__init__(disk, rate, workers)
        self.dirty = disk.dirty
        self.chunk = chunk              # the largest first-pass chunk; a limited copy takes smaller
        self.failures = 0
        # Copy mode none starts synchronized: nothing to announce until something needs copying.
        self.synchronized_at = self.started if self.dirty.synchronized() else None
        self._settle = SETTLE_FIRST
        # Bumped each time _settle doubles: the workers' chunks that fail together (one outage
        # fails every chunk in flight) double it once, not once per worker (6 workers would
        # otherwise take it from 2 s to the 60 s cap at the first outage).
        self._generation = 0
        # Several workers copy different chunks at once, so one chunk's reads overlap another's
        # writes. The cursor only moves over chunks that are all done (see _chunk_done).
        self._lock = threading.Lock()
        self._next = self.dirty.cursor  # the next first-pass chunk to hand out
        self._retry = []                # first-pass chunks (start, end) whose copy failed
        self._finished = {}             # first-pass chunks done above the cursor: start -> end

    def _wake(self):
        self.dirty.changed.set()

    @property
    def copying(self):
        """Is there anything to copy (the first pass, or regions to copy again)?"""
        return not (self.dirty.synchronized() or self.disk.ended)

    def _own_status(self):
        elapsed = time.monotonic() - self.started
        return {"first_pass_bytes": self.dirty.cursor, "size": self.disk.size,
                "read_rate": round(self.bytes_read / elapsed) if elapsed else 0,
                "failures": self.failures,
                "dest_available": self.disk.dest.available if self.disk.dest else None,
                "synchronized_seconds": (round(self.synchronized_at - self.started, 3)
                                         if self.synchronized_at else None)}

    # The loop.

    def _mirroring(self):
        d = self.disk
        return d.dest is not None and len(d.writers) == 2

    @property
    def _to(self):
        """The side copied to: the one that does not read (the destination, or, under a group's
        safety net, the source)."""
        d = self.disk
        return d.source if d.reader is d.dest else d.dest

    def _run(self, index):
        maintains = index == 0          # one worker saves the cursor and clears quiet regions
        next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
        while not self._stop.is_set() and self._mirroring():
            # Read before the settle check: a chunk started after it belongs to this generation
            # even if another worker's failure doubles the wait meanwhile.
            generation = self._generation
            unsettled = self._unsettled()
            if unsettled > 0:
                self._stop.wait(unsettled)
                continue
            try:
                worked = self._step()
            except CopyFailed:
                with self._lock:
                    self.failures += 1
                    if generation == self._generation:
                        self._generation += 1
                        self._settle = min(self._settle * 2, SETTLE_MAX)
                self._stop.wait(max(RETRY_DELAY, self._to.down_until - time.monotonic()))
                continue
            if worked:
                self._settle = SETTLE_FIRST
            if maintains and time.monotonic() >= next_maintenance:
                self._maintain()
                next_maintenance = time.monotonic() + MAINTENANCE_INTERVAL
            if not worked:
                if maintains and self.synchronized_at is None and self.dirty.synchronized() \
                        and self._lag_drained():
                    self.synchronized_at = time.monotonic()
                    log.info("synchronized: the destination holds the whole disk (%.1fs)",
                             self.synchronized_at - self.started)
                    self._maintain()        # the cursor saved (after a flush) and the phase with it
                self.dirty.changed.wait(MAINTENANCE_INTERVAL)
                self.dirty.changed.clear()

    def _lag_drained(self):
        """With --lag, the copy ends once the lag has drained too: only then did the destination
        hold the whole disk at one moment (the lag then stays within its bound)."""
        lag = self.disk.lag
        return lag is None or not self.disk.lag_in_force() or lag.empty

    def _unsettled(self):
        """Seconds to wait before the destination has gone `_settle` seconds without a failure,
        and has no request waiting for a second or more (a hang the watchdog has not cut yet)."""
        dest = self._to
        if dest.oldest_wait() >= 1.0:
            return RETRY_DELAY
        last = self.disk.stats[dest.name].last_error
        return 0.0 if last is None else self._settle - (time.time() - last["time"])

    def _step(self):
        """Copy one chunk or one region; False if there was nothing to copy."""
        chunk = self._take_chunk()
        if chunk is not None:
            try:
                self._copy(*chunk)
            except CopyFailed:
                with self._lock:
                    self._retry.append(chunk)
                raise
            self._chunk_done(*chunk)
            return True
        region = self.dirty.take_region()
        if region is None:
            return False
        self.synchronized_at = None
        start = region * self.dirty.region_size
        end = min(start + self.dirty.region_size, self.disk.size)
        try:
            self._copy(start, end)          # chunk by chunk, each under its range lock
        except CopyFailed:
            self.dirty.give_back(region)
            raise
        self.dirty.region_done(region)
        return True

    def _chunk_size(self):
        return self.pacer.chunk(self.chunk, min(PACED_CHUNK, self.chunk))

    def _take_chunk(self):
        """The next first-pass chunk, (start, end); None when the first pass is handed out."""
        with self._lock:
            if self._retry:
                return self._retry.pop()
            if self._next < self.disk.size:
                start = self._next
                self._next = min(start + self._chunk_size(), self.disk.size)
                return start, self._next
            return None

    def _chunk_done(self, start, end):
        """Move the cursor over every chunk done, up to the first one still being copied: the
        cursor promises that everything below it is copied."""
        with self._lock:
            self._finished[start] = end
            cursor = self.dirty.cursor
            while cursor in self._finished:
                cursor = self._finished.pop(cursor)
        self.dirty.advance(cursor)

    def _maintain(self):
        try:
            self.dirty.save_cursor(self._to.flush)
            self.dirty.clean(self._flush_sides)
        except SideError as e:
            log.warning("saving the copy's progress failed (will retry): %s", describe(e))

    def _flush_sides(self):
        for side in self.disk.writers:
            side.flush()

    # The copy of a range (one first-pass chunk, or a region), on the one copy.

    def _copy(self, start, end):
        """Copy [start, end) from the read side to the other, in chunks of `_chunk_size()`, each
        paid for outside its range lock (a chunk that waits for its rate holds no client write).
        Raises CopyFailed: Stopped if stopped between two chunks."""
        try:
            done = copy_range(self.disk.reader, self._to, start, end, chunk=self.chunk,
                              smallest=min(PACED_CHUNK, self.chunk), pacer=self.pacer,
                              stop=self._stop, guard=self._held, after=self._copied)
        except SideFailure as e:
            log.warning("copy of [%d, %d) failed, will retry: %s", start, end, e)
            raise CopyFailed() from None
        if done.end < end:
            raise Stopped()

    @contextlib.contextmanager
    def _held(self, start, end):
        """One chunk as a change: under its range lock (a client write to those bytes waits for
        the chunk, or the chunk for it) and its write intent, which records whether both sides
        took it."""
        disk = self.disk
        token = disk.inflight.enter_range("copy", start, end)
        try:
            if disk.lag is not None and disk.lag_in_force():
                # The lag's changes to this range reach the destination before the chunk does.
                disk.lag.wait_range(*token)
            intent = self.dirty.before_change(start, end)
            ok = False
            try:
                yield
                ok = True
            finally:
                self.dirty.after_change(intent, both_sides=ok)
        finally:
            disk.inflight.leave(token)

    def _copied(self, start, end, read, zeroed):
        self.bytes_read += read
        self.bytes_zeroed += zeroed
