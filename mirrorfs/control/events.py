"""The events of a served disk (phase changes, errors), kept for `status` and streamed to
`events` subscribers on the control socket."""

import threading
import time


class EventLog:
    def __init__(self):
        self._events = []
        self._changed = threading.Condition()
        self.closed = False

    def add(self, kind, **details):
        with self._changed:
            self._events.append({"seq": len(self._events) + 1, "time": round(time.time(), 3),
                                 "event": kind, **details})
            self._changed.notify_all()

    def close(self):
        with self._changed:
            self.closed = True
            self._changed.notify_all()

    def recent(self, n=10):
        with self._changed:
            return list(self._events[-n:])

    def follow(self, since=0, timeout=None):
        """Yield events after sequence number `since`, waiting for new ones; ends `timeout`
        seconds after the last one (None: never), or when the log is closed."""
        while True:
            with self._changed:
                fresh = self._events[since:]
                if not fresh:
                    if self.closed or not self._changed.wait(timeout):
                        return
                    continue
            yield from fresh
            since = fresh[-1]["seq"]
