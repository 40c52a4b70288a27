"""A copy's rate limit that may change while the copy runs: the host budget (mirrorfs.host.budget)
re-divides the host's bandwidth every fraction of a second, and each copy applies its new share here.

    pacer = Pacer(rate=None)         # None: no limit; 0: hold (the copy is queued); N: bytes/s
    if pacer.reserve(n, stop):       # before copying up to n bytes: wait until the rate allows them
        copied = copy(...)
        pacer.settle(n, copied)      # what was really copied (zero extents are not paid for)
    pacer.set(32 << 20)              # from another thread, at any time; waiters wake at once

It keeps a virtual clock, `_due`: the time from which the next reservation may start. A reservation
waits until then and moves it on by n / rate; so several workers sharing one pacer start their
pieces one after the other, n / rate apart, from the first piece on (paying after the copy would
let every worker copy one piece at once first: a burst of workers x pieces). Idle time is not
saved up beyond BURST: a copy that had nothing to do (or was held) for a minute does not then run
unlimited for a minute. A change of rate rescales what is still owed; a waiter is woken and waits
again at the new rate, so a share that drops takes effect at once.

Bytes are counted here as they are paid (`paid`), which is what the host budget measures a copy by.

Used by the data path's copier and an evacuation's hydrator (inside nbdkit) and the migration's base
copy (in the supervisor), so this module is standard library only.
"""

import threading
import time

BURST = 0.5                     # seconds of unused rate a copy may catch up on (after a stall)
HOLD_POLL = 0.5                 # a held or waiting copy looks at its stop event this often


class Pacer:
    def __init__(self, rate=None):
        self._rate = rate
        self._cond = threading.Condition(threading.Lock())
        self._due = time.monotonic()
        self.paid = 0

    @property
    def rate(self):
        return self._rate

    def set(self, rate):
        """The new limit: None (none), 0 (hold), or bytes per second."""
        with self._cond:
            if rate == self._rate:
                return
            now = time.monotonic()
            if self._rate and rate:
                # What is still owed at the old rate is owed at the new one, scaled.
                self._due = now + max(0.0, self._due - now) * self._rate / rate
            else:
                self._due = now
            self._rate = rate
            self._cond.notify_all()

    def chunk(self, largest, smallest):
        """How much to copy before the next payment: a limited copy pays in pieces of about a
        sixteenth of a second (so a share is kept smoothly over each second, and a change of it
        applies within one piece), between `smallest` and `largest`. A held copy takes the
        smallest: the piece it waits with is copied at a rate not known yet."""
        rate = self._rate
        if rate is None:
            return largest
        if rate == 0:
            return smallest
        size = max(smallest, min(largest, rate // 16))
        return size - size % smallest

    def reserve(self, n, stop):
        """Wait until `n` more bytes may be copied, and count them as spent. False if `stop` (a
        threading.Event) was set meanwhile: then nothing may be copied."""
        with self._cond:
            while not stop.is_set():
                rate = self._rate
                if rate is None:
                    return True
                if rate == 0:
                    self._cond.wait(HOLD_POLL)
                    continue
                now = time.monotonic()
                start = max(self._due, now - BURST)
                if start <= now:
                    self._due = start + n / rate
                    return True
                # In slices of HOLD_POLL: a stop must end the wait of a copy far ahead of its rate
                # (a base copy at a small share is cancelled within a second, not minutes).
                self._cond.wait(min(start - now, HOLD_POLL))
            return False

    def settle(self, reserved, copied):
        """After a reservation of `reserved` bytes, `copied` were copied: the rest is given back."""
        with self._cond:
            self.paid += copied
            if self._rate and reserved > copied:
                # Not before now: skipping zeros must not save up time for a burst of data later.
                self._due = max(self._due - (reserved - copied) / self._rate, time.monotonic())


class Paced:
    """A copy paced by its `pacer` (a Pacer): the data path's copier and hydrator, whose limit the
    supervisor reads and sets (the data path's `set-rate`: the host budget's share)."""

    @property
    def rate(self):
        return self.pacer.rate

    def set_rate(self, rate):
        """The limit from now on (None, 0 to hold, or bytes/s); applies from the next piece."""
        self.pacer.set(rate)


def eta_seconds(remaining, measured, limit):
    """Seconds a paced copy still needs for `remaining` bytes: at the rate `measured`, but never
    faster than its `limit` (bytes/s; None or 0: none known). A paced copy's first piece goes at
    once, so over its first seconds the measured rate can be many times the limit: a copy limited
    to 100 bytes/s once showed an ETA of 7 minutes for four days of copying. None when nothing is
    left or nothing moves."""
    rate = min(measured, limit) if limit else measured
    if remaining <= 0 or not rate:
        return None
    return round(remaining / rate)
