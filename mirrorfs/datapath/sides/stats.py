"""Per-side counters for status and metrics, kept by both served disks (the mirror's and the
evacuation's): errors by operation, the last error, recent latencies and their histogram.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import collections
import errno
import logging
import threading
import time

from mirrorfs.datapath.histogram import Histogram
from mirrorfs.datapath.sides.backend import describe, error_errno

log = logging.getLogger("mirrorfs")

# Latencies kept per side for status percentiles.
LATENCY_SAMPLES = 2048


class SideStats:
    """Per-side counters for status: errors, the last error, and recent latencies.

    The last error (what, where, when) is kept because an operator looking at a failing side
    needs the reason ("No space left on device"), not just a count; the log has every one."""

    def __init__(self, name):
        self.name = name
        self.errors = 0
        self.degraded = 0               # changes acknowledged without this side (degrade policy)
        self.latencies = collections.deque(maxlen=LATENCY_SAMPLES)   # append is atomic
        self.histogram = Histogram()    # the same samples, counted for good (host metrics)
        self.errors_by_op = collections.Counter()       # counted under _lock
        self.last_error = None          # a dict, replaced whole (readers never see half of one)
        self._lock = threading.Lock()
        self._logged_at = 0.0
        self._unlogged = 0

    def failed(self, op, offset, length, exc):
        """Count a failure and log it: every one, unless they come faster than one a second (a
        dead side would fill the log), then one a second with the number left out."""
        now = time.monotonic()
        number = error_errno(exc)
        self.last_error = {"op": op, "offset": offset, "length": length, "error": describe(exc),
                           "errno": errno.errorcode.get(number, str(number)), "time": time.time()}
        with self._lock:
            self.errors += 1
            self.errors_by_op[op] += 1
            if now - self._logged_at < 1.0:
                self._unlogged += 1
                return
            self._logged_at, skipped, self._unlogged = now, self._unlogged, 0
        more = f" ({skipped} more failures not logged)" if skipped else ""
        log.error("%s %s failed at offset %d length %d: %s%s", self.name, op, offset, length,
                  describe(exc), more)

    def degrade(self):
        """A change acknowledged to the client without this side (degrade policy)."""
        with self._lock:
            self.degraded += 1

    def snapshot(self):
        recent = sorted(self.latencies)

        def pct(p):
            return round(recent[min(len(recent) - 1, int(len(recent) * p))] * 1000, 3) if recent else None

        return {"errors": self.errors, "degraded": self.degraded, "last_error": self.last_error,
                "errors_by_op": dict(self.errors_by_op), "histogram": self.histogram.snapshot(),
                "latency_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0),
                               "samples": len(recent)}}
