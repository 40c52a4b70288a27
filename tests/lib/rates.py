"""Copy rates measured from byte counts sampled over time (the host budget's tests): per copy, a
list of (time, bytes done), interpolated linearly between samples."""

import bisect


class Counts:
    """Samples of byte counts: `add(key, t, done)`; `done_at` and `rate` read them back."""

    def __init__(self):
        self.series = {}

    def add(self, key, t, done):
        points = self.series.setdefault(key, [])
        if not points or t > points[-1][0]:
            points.append((t, done))

    def done_at(self, key, t):
        """Bytes done by `key` at time `t`, interpolated (0 before its first sample, its last
        value after its last)."""
        points = self.series.get(key, [])
        if not points or t <= points[0][0]:
            return points[0][1] if points and t >= points[0][0] else 0
        i = bisect.bisect_left(points, (t,))
        if i >= len(points):
            return points[-1][1]
        (t0, d0), (t1, d1) = points[i - 1], points[i]
        return d0 + (d1 - d0) * (t - t0) / (t1 - t0)

    def rate(self, key, start, end):
        return (self.done_at(key, end) - self.done_at(key, start)) / (end - start)

    def first_moved(self, key):
        """When `key`'s count first went above 0 (its copy started), or None."""
        return next((t for t, d in self.series.get(key, []) if d > 0), None)

    def reached(self, key):
        """When `key`'s count first reached its last value (its copy ended)."""
        points = self.series[key]
        return next(t for t, d in points if d == points[-1][1])
