"""A latency histogram that the data path's worker threads fill without a lock, and a reader sums.

Prometheus wants cumulative counts per bucket that never go down. A shared list incremented by
several threads could lose an increment, and worse, write back a stale value (a count that goes
down, which Prometheus reads as a restart). So each thread counts in a list of its own, made on its
first sample and kept in `_all` for good (a thread that ends leaves its counts behind); a reader
adds the lists up. Each list has one writer, so a reader sees each count at some recent value, and
the sum never decreases. A sample costs a thread-local lookup, a bisect and two additions.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import bisect
import threading

# Upper bounds, seconds: 100 us (a local write) to 10 s (a side that hangs until --io-timeout).
BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
          1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self):
        self._local = threading.local()
        self._all = []
        self._lock = threading.Lock()   # taken once per thread, when its list is made

    def add(self, seconds):
        try:
            counts = self._local.counts
        except AttributeError:
            counts = self._local.counts = [0] * (len(BOUNDS) + 2)   # buckets, +Inf, then the sum
            with self._lock:
                self._all.append(counts)
        counts[bisect.bisect_left(BOUNDS, seconds)] += 1
        counts[-1] += seconds

    def snapshot(self):
        """{"bounds": [...], "counts": per bucket (not cumulative; the last is +Inf), "sum": s}."""
        with self._lock:
            lists = list(self._all)
        total = [0] * (len(BOUNDS) + 2)
        for counts in lists:
            for i, n in enumerate(list(counts)):
                total[i] += n
        return {"bounds": list(BOUNDS), "counts": total[:-1], "sum": total[-1]}
