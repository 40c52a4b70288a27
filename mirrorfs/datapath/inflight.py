"""The requests in flight on the served disk: counted, ordered, and holdable.

- Every request enters and leaves, so we know how many are in flight.
- A request that changes data (write, zero, trim, the copier's chunks) holds its byte range: an
  overlapping one waits until it is done on *both* sides. Two overlapping changes are therefore applied
  in the same order on the source and the destination, whatever the client's concurrency; without this,
  two racing writes could land A-then-B on one side and B-then-A on the other.
- Ranges are widened to whole `granularity` units (the qcow2 cluster size), so two changes that
  touch the same cluster never run at once even when their bytes do not overlap. qemu-storage-daemon
  7.2 (Debian 12) corrupts qcow2 refcounts when writes, zeroes without unmap and discards hit a
  cluster concurrently (tests/system/test_stress.py shows it against a bare export); mirrorfs does not send
  it such a mix.
- `pause()` holds new requests and waits for those in flight to drain; the switch to the destination
  happens in that window and `resume()` lets the held requests go on, so clients never disconnect.

One condition variable guards it all: a request costs one lock round-trip to enter and one to leave.
"""

import collections
import threading
import time

from mirrorfs.datapath.errors import DrainTimeout  # noqa: F401 (raised here, caught by callers)


class InFlight:
    def __init__(self, granularity=1):
        self.granularity = granularity
        # Entering and leaving take the lock itself: the Condition's own `with` is a Python-level
        # call, twice per request. Waits go through the Condition, which shares the lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._count = 0
        self._ranges = []        # [start, end) of changes in flight
        self._paused = False
        self._waiters = 0
        self.started = collections.Counter()     # requests by kind, counted under the lock
        self.bytes = collections.Counter()       # their bytes by kind, likewise (host metrics)

    @property
    def count(self):
        return self._count

    @property
    def paused(self):
        """Is a pause holding new requests (waiting for those in flight, or done waiting)?"""
        return self._paused

    def enter(self, kind, length=0):
        """A request that does not change data (read, extents, cache, flush)."""
        with self._lock:
            while self._paused:
                self._wait()
            self._count += 1
            self.started[kind] += 1
            if length:
                self.bytes[kind] += length

    def enter_range(self, kind, start, end):
        """A request that changes [start, end). Returns a token for `leave()`."""
        g = self.granularity
        length = end - start
        start, end = start - start % g, end + (-end % g)
        token = (start, end)
        with self._lock:
            while self._paused or self._overlaps(start, end):
                self._wait()
            self._count += 1
            self.started[kind] += 1
            self.bytes[kind] += length
            self._ranges.append(token)
        return token

    def leave(self, token=None):
        with self._lock:
            self._count -= 1
            if token is not None:
                self._ranges.remove(token)
            if self._waiters:
                self._cond.notify_all()

    def release_range(self, token):
        """Let other changes to the range of `token` start while the request stays in flight
        (a lagged change waiting for room: datapath.mirror.lag orders the destination's copies); end
        it with `leave()` without a token."""
        with self._lock:
            self._ranges.remove(token)
            if self._waiters:
                self._cond.notify_all()

    def _overlaps(self, start, end):
        for s, e in self._ranges:
            if s < end and start < e:
                return True
        return False

    def _wait(self):
        self._waiters += 1
        try:
            self._cond.wait()
        finally:
            self._waiters -= 1

    def pause(self, timeout):
        """Hold new requests and wait until none is in flight. On timeout, resume and raise."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._paused:
                raise RuntimeError("already paused")
            self._paused = True
            while self._count:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._paused = False
                    self._cond.notify_all()
                    raise DrainTimeout(f"{self._count} requests still in flight after {timeout}s")
                self._waiters += 1
                try:
                    self._cond.wait(left)
                finally:
                    self._waiters -= 1

    def resume(self):
        with self._cond:
            self._paused = False
            self._cond.notify_all()
