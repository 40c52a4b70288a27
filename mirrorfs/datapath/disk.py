"""The served disk: what happens to each request. Read this file to know what happens to a write.

- read, extents, cache → the read side (the source until the switch).
- write, zero, trim → every write side (source and destination while mirroring), issued to both at
  once; the client's request completes only when both have answered. Overlapping changes are ordered
  by `InFlight` so both sides apply them in the same order.
- flush → every write side, at once.
- A failure on any side fails the client's request with that side's errno (the source's first), and is
  counted and logged with the side, the offset and the length.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import collections
import errno
import itertools
import logging
import threading
import time

import nbd

from mirrorfs.datapath.backend import BackendError, describe, drive, error_errno, wait_one
from mirrorfs.datapath.dirtymap import DirtyMap
from mirrorfs.datapath.histogram import Histogram
from mirrorfs.datapath.options import DEFAULT_REGION, LOCK_GRANULARITY
from mirrorfs.common.sizes import human_size
from mirrorfs.datapath.inflight import DrainTimeout, InFlight

log = logging.getLogger("mirrorfs")

# Reads up to this size are copied out of libnbd's reply; larger ones land in nbdkit's buffer directly.
COPY_READ_MAX = 256 * 1024
# Writes larger than this may not fit the socket buffer at once; both sides are then polled together.
SEQUENTIAL_WAIT_MAX = 128 * 1024
# Zeroes and trims carry no payload: the advertised maximum (a payload limit, nbdkit's blocksize
# filter's "maxdata" as against "maxlen") does not bind them, qemu-storage-daemon takes them at any
# 32-bit length, and QEMU's own NBD client sends discards of up to 2 GiB, which pieces of 32 MiB would
# turn into 64 round trips. They are split at this larger unit instead.
MAX_EFFECT = 1 << 30
# A request whose authoritative side lost its connection (not: refused the request) is sent again on
# a new connection for this long before the client hears of it. The side may be restarting; or the
# whole process tree is going down (a restart, the supervisor's death), and then the client must get
# no answer at all rather than an error: a reconnecting client sends the request again to whatever
# serves the socket next (QEMU's reconnect-delay), but passes an error on to its guest.
RESEND_FOR = 30.0
RESEND_EVERY = 0.2
# libnbd's errors that mean the connection went away.
_CONNECTION_LOST = {errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE,
                    errno.ECONNREFUSED, errno.ECONNABORTED}
# Latencies kept per side for status percentiles.
LATENCY_SAMPLES = 2048


def connection_lost(exc):
    """Whether a side's failure is the loss of its connection rather than a refused request."""
    return isinstance(exc, BackendError) or error_errno(exc, None) in _CONNECTION_LOST


class RequestError(Exception):
    """A request failed; `errno` is what the client gets."""

    def __init__(self, err, message):
        super().__init__(message)
        self.errno = err


class SwitchRefused(Exception):
    """A switch that must not happen: another one runs or already happened, the sides may still
    differ, or the destination does not answer. Nothing changed."""


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


class Disk:
    def __init__(self, source, dest=None, dirty=None, policy="fail", granularity=LOCK_GRANULARITY):
        self.size = source.size
        self.inflight = InFlight(granularity)
        # Every backend this disk may use, now or after a switch: capabilities are what all can do,
        # because nbdkit tells a client its capabilities once, at connect time.
        self.backends = (source, dest) if dest is not None else (source,)
        self.source, self.dest = source, dest
        self.reader = source            # the authoritative side: reads, and its errors fail requests
        self.writers = self.backends
        self.dirty = dirty if dirty is not None else DirtyMap(self.size, DEFAULT_REGION)
        self.policy = policy            # a destination failure: "fail" the request, or "degrade"
        self.stats = {b.name: SideStats(b.name) for b in self.backends}
        self._turn = itertools.count()
        self.switches = []
        self.ended = dirty.state.phase if dirty is not None and dirty.state is not None and \
            dirty.state.ended else None
        self._switching = threading.Lock()
        # The largest request every side accepts (the maximum clients are told). nbdkit 1.32 does
        # not enforce it on clients that did not negotiate block sizes; larger requests are split
        # (see _change_in_pieces), and one comparison is all they cost a request of ordinary size.
        self.max_request = self.block_size()[2]
        self.max_effect = max(MAX_EFFECT, self.max_request)

    # Capabilities.

    def can_write(self):
        return all(not b.read_only for b in self.backends)

    def can_flush(self):
        return all(b.can_flush for b in self.backends)

    def can_fua(self):
        return all(b.can_fua for b in self.backends)

    def can_trim(self):
        return all(b.can_trim for b in self.backends)

    def can_zero(self):
        return all(b.can_zero for b in self.backends)

    def can_fast_zero(self):
        return all(b.can_fast_zero for b in self.backends)

    def can_multi_conn(self):
        return all(b.multi_conn for b in self.backends)

    def can_extents(self):
        return all(b.can_extents for b in self.backends)

    def can_cache(self):
        return all(b.can_cache for b in self.backends)

    def is_rotational(self):
        return any(b.is_rotational for b in self.backends)

    def block_size(self):
        sides = [b.block_size for b in self.backends]
        minimum = max(s[0] for s in sides) or 1
        preferred = max(max(s[1] for s in sides), minimum, 4096)
        maximums = [s[2] for s in sides if s[2]]
        maximum = min(maximums) if maximums else 32 * 1024 * 1024
        return minimum, min(preferred, maximum), maximum

    # Switching sides, without disconnecting clients.

    def switch(self, to, end, timeout=10.0):
        """End the mirror: serve side `to` ("source" or "destination") alone, without disconnecting
        clients, and record `end` ("switched" or "cancelled") in the state.

        One switch at a time, and only one ever: a second one is refused (SwitchRefused) whether it
        comes during the first or after it, so a pivot and a cancel cannot both win. New requests
        wait, those in flight (the copier's too) drain; then, while nothing is in flight:
        - to the destination: refused unless the sides are synchronized, and unless the destination
          answers on the connections it will serve with (a dead destination keeps the source
          serving);
        - the end is saved in the state *before* the sides change, so a crash at any point
          restarts on the right side; the sides change, and the held requests go on.
        The side no longer used is flushed and disconnected after requests resume. Returns the
        stall in seconds: how long new requests were held."""
        side = {b.name: b for b in self.backends}.get(to)
        if side is None:
            raise ValueError(f"unknown side {to!r}")
        if not self._switching.acquire(blocking=False):
            raise SwitchRefused("another switch is in progress")
        try:
            if self.ended:
                raise SwitchRefused(f"the mirror already ended ({self.ended})")
            started = time.monotonic()
            self.inflight.pause(timeout)
            try:
                if side is self.dest:
                    if not self.dirty.synchronized():
                        raise SwitchRefused(
                            f"{human_size(self.dirty.dirty_bytes())} may still differ between "
                            "the sides; wait until synchronized")
                    try:
                        side.check(timeout)
                    except BackendError as e:
                        raise SwitchRefused(f"the destination does not answer ({e}); still "
                                            "serving the source") from None
                if self.dirty.state is not None:
                    self.dirty.state.record(end=end)
                self.ended = end
                retired = [b for b in self.backends if b is not side]
                self.reader, self.writers = side, (side,)
            finally:
                self.inflight.resume()
        finally:
            self._switching.release()
        stall = time.monotonic() - started
        self.switches.append(stall)
        for b in retired:
            b.retire()
            log.info("%s released", b.name)
        return stall

    def quiesce(self, timeout=10.0):
        """Before the process stops: hold every new request for good, let those in flight finish
        on every side, flush every side. Afterwards nothing is between the sides. Waits for a
        switch in progress to end first."""
        if not self._switching.acquire(timeout=timeout):
            raise DrainTimeout(f"a switch still runs after {timeout}s")
        self.inflight.pause(timeout)
        for b in set(self.writers):
            try:
                b.flush()
            except Exception as e:      # a dead side: nothing more can be done for it here
                log.error("%s: flush before stopping failed: %s", b.name, describe(e))

    def status(self):
        return {
            "size": self.size,
            "in_flight": self.inflight.count,
            "requests": dict(self.inflight.started),
            "request_bytes": dict(self.inflight.bytes),
            "reader": self.reader.name,
            "writers": [b.name for b in self.writers],
            "sides": {b.name: {**self.stats[b.name].snapshot(), "timeouts": b.timeouts,
                               "available": b.available} for b in self.backends},
            "switch_stalls_ms": [round(s * 1000, 3) for s in self.switches],
            "policy": self.policy,
            "ended": self.ended,
            "synchronized": self.dirty.synchronized(),
            "dirty_bytes": self.dirty.dirty_bytes(),
        }

    # Reads.

    def pread(self, buf, offset):
        if len(buf) > self.max_request:
            return self._pread_in_pieces(buf, offset)
        self.inflight.enter("read", len(buf))
        try:
            side = self.reader
            try:
                h = side.acquire()
            except BackendError as e:
                raise RequestError(errno.EIO, str(e)) from None
            failed = False
            try:
                if len(buf) <= COPY_READ_MAX:
                    # One libnbd call (one GIL release) beats three, and copying a few KiB is cheap.
                    buf[:] = h.pread(len(buf), offset)
                else:
                    # Large: let libnbd read straight into nbdkit's buffer.
                    wait_one(h, h.aio_pread(nbd.Buffer.from_buffer(buf), offset))
            except nbd.Error as e:
                failed = True
                error = e
            finally:
                side.release(h, failed)
            if failed and not (connection_lost(error) and self._resend(
                    side, lambda h: buf.__setitem__(slice(None), h.pread(len(buf), offset)))):
                self.stats[side.name].failed("read", offset, len(buf), error)
                raise RequestError(error_errno(error), describe(error))
        finally:
            self.inflight.leave()

    def extents(self, count, offset, req_one):
        self.inflight.enter("extents")
        try:
            return self.reader.extents(count, offset, req_one)
        except nbd.Error as e:
            raise RequestError(error_errno(e), describe(e)) from None
        finally:
            self.inflight.leave()

    def cache(self, count, offset):
        self.inflight.enter("cache")
        try:
            self.reader.call(lambda h: h.cache(count, offset))
        except nbd.Error as e:
            raise RequestError(error_errno(e), describe(e)) from None
        finally:
            self.inflight.leave()

    # Changes: to every write side at once, ordered against overlapping changes. Each command comes
    # in two forms, `start` (libnbd aio: returns a cookie) and `run` (synchronous).

    def pwrite(self, buf, offset, fua):
        if len(buf) > self.max_request:
            return self._pwrite_in_pieces(buf, offset, fua)
        flags = nbd.CMD_FLAG_FUA if fua else 0
        # One shared view of the client's buffer: no copy per side.
        data = nbd.Buffer.from_buffer(buf)
        self._change("write", offset, len(buf),
                     lambda h: h.aio_pwrite(data, offset, flags=flags),
                     lambda h: h.pwrite(buf, offset, flags=flags))

    def zero(self, count, offset, may_trim, fua, fast):
        flags = (0 if may_trim else nbd.CMD_FLAG_NO_HOLE) | (nbd.CMD_FLAG_FUA if fua else 0)
        if fast:
            flags |= nbd.CMD_FLAG_FAST_ZERO
        if count > self.max_effect:
            return self._change_in_pieces(
                "zero", offset, count, lambda o, n: (lambda h: h.aio_zero(n, o, flags=flags),
                                                     lambda h: h.zero(n, o, flags=flags)),
                fast_zero=fast, step=self.max_effect)
        self._change("zero", offset, count,
                     lambda h: h.aio_zero(count, offset, flags=flags),
                     lambda h: h.zero(count, offset, flags=flags), fast_zero=fast)

    def trim(self, count, offset, fua):
        flags = nbd.CMD_FLAG_FUA if fua else 0
        if count > self.max_effect:
            return self._change_in_pieces(
                "trim", offset, count, lambda o, n: (lambda h: h.aio_trim(n, o, flags=flags),
                                                     lambda h: h.trim(n, o, flags=flags)),
                step=self.max_effect)
        self._change("trim", offset, count,
                     lambda h: h.aio_trim(count, offset, flags=flags),
                     lambda h: h.trim(count, offset, flags=flags))

    def flush(self):
        self.inflight.enter("flush")
        try:
            failures = self._on_every_side("flush", 0, 0, lambda h: h.aio_flush(), lambda h: h.flush())
            if failures:
                self._settle("flush", 0, 0, failures)
        finally:
            self.inflight.leave()

    def _change(self, op, offset, length, start, run, fast_zero=False):
        token = self.inflight.enter_range(op, offset, offset + length)
        try:
            intent = self.dirty.before_change(offset, offset + length)
            failures = []
            try:
                failures = self._on_every_side(op, offset, length, start, run)
                if fast_zero and failures:
                    failures = self._finish_fast_zero(offset, length, failures)
                if failures:
                    failures = self._resend_lost(failures, run)
            finally:
                # Anything short of success on every side may leave the sides different.
                self.dirty.after_change(intent, both_sides=not failures)
            if failures:
                self._settle(op, offset, length, failures)
        finally:
            self.inflight.leave(token)

    def _resend_lost(self, failures, run):
        """The failures left once a change the authoritative side lost with its connection was
        sent again on a new one (see RESEND_FOR). Sending a write, zero or trim twice is harmless:
        the change still holds its range lock, so nothing else touched those bytes meanwhile."""
        for side, e in failures:
            if side is self.reader and connection_lost(e) and self._resend(side, run):
                return [(s, x) for s, x in failures if s is not side]
        return failures

    def _resend(self, side, run):
        """Run `run(handle)` on `side` again, on a new connection, until it succeeds (True), the side
        refuses it (False), or RESEND_FOR passes (False)."""
        log.warning("%s: connection lost; sending the request again", side.name)
        deadline = time.monotonic() + RESEND_FOR
        while time.monotonic() < deadline:
            time.sleep(max(RESEND_EVERY, side.down_until - time.monotonic()))
            try:
                side.call(run)
                return True
            except (nbd.Error, BackendError) as e:
                if not connection_lost(e):
                    return False
        return False

    # Requests larger than the sides accept (max_request; max_effect for zero and trim): split into
    # pieces they accept. A change
    # holds one range lock and one write intent over the whole of it, so no other change gets in
    # between its pieces on either side, and the client's request completes once, after the last.

    def _pieces(self, offset, length, step):
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def _pwrite_in_pieces(self, buf, offset, fua):
        flags = nbd.CMD_FLAG_FUA if fua else 0
        view = memoryview(buf)

        def commands(o, n):
            piece = view[o - offset:o - offset + n]
            data = nbd.Buffer.from_buffer(piece)
            return (lambda h: h.aio_pwrite(data, o, flags=flags),
                    lambda h: h.pwrite(piece, o, flags=flags))
        self._change_in_pieces("write", offset, len(buf), commands, step=self.max_request)

    def _pread_in_pieces(self, buf, offset):
        view = memoryview(buf)
        for o, n in self._pieces(offset, len(buf), self.max_request):
            self.pread(view[o - offset:o - offset + n], o)

    def _change_in_pieces(self, op, offset, length, commands, step, fast_zero=False):
        """`_change` for a request larger than max_request; `commands(offset, length)` returns the
        (start, run) pair of one piece. After the read side failed a piece, the rest is not sent:
        the request fails anyway, and the region is marked as possibly different."""
        token = self.inflight.enter_range(op, offset, offset + length)
        try:
            intent = self.dirty.before_change(offset, offset + length)
            failures = []
            try:
                for o, n in self._pieces(offset, length, step):
                    start, run = commands(o, n)
                    failed = self._on_every_side(op, o, n, start, run)
                    if fast_zero and failed:
                        failed = self._finish_fast_zero(o, n, failed)
                    failures += failed
                    if any(side is self.reader for side, _ in failed):
                        break
            finally:
                self.dirty.after_change(intent, both_sides=not failures)
            if failures:
                self._settle(op, offset, length, failures)
        finally:
            self.inflight.leave(token)

    def _settle(self, op, offset, length, failures):
        """Decide what the client hears when some side failed. The authoritative side's failure
        always fails the request. A mirror side's failure fails it under the "fail" policy; under
        "degrade" the request succeeds: the region is already marked to be copied again (durably,
        before this answer), so nothing diverges silently."""
        for side, e in failures:
            self.stats[side.name].failed(op, offset, length, e)
        primary = [(side, e) for side, e in failures if side is self.reader]
        if op == "flush" and not primary:
            # A mirror that failed a flush may have lost writes it acknowledged: copy them again.
            self.dirty.mark_all()
        if primary or self.policy == "fail":
            side, e = (primary or failures)[0]
            raise RequestError(error_errno(e), f"{side.name} {op}: {describe(e)}")
        for side, _ in failures:
            self.stats[side.name].degrade()

    def _finish_fast_zero(self, offset, length, failures):
        """A fast zero that one side refused would leave the sides different. The side that refused
        zeroes the slow way, so both hold zeros; the client gets success (if every side refused, the
        client gets ENOTSUP and writes zeros itself, as the protocol intends). Returns the failures
        that remain."""
        refused = [side for side, e in failures if error_errno(e) == errno.ENOTSUP]
        if len(refused) == len(self.writers):
            raise RequestError(errno.ENOTSUP, "fast zero not supported")
        others = [(side, e) for side, e in failures if side not in refused]
        flags = nbd.CMD_FLAG_NO_HOLE
        return others + self._on_every_side(
            "zero", offset, length, lambda h: h.aio_zero(length, offset, flags=flags),
            lambda h: h.zero(length, offset, flags=flags), sides=refused)

    def _on_every_side(self, op, offset, length, start, run, sides=None):
        """Run one command on each side at once and wait for all. Returns the failures, as
        (side, exception) pairs: a side that cannot even be reached is one of them.

        The other sides' commands are started (aio) and the last side's runs synchronously, so the
        sides work in parallel at the cost of few libnbd calls: each call releases and retakes the
        GIL, which is what limits small requests. A small command is on the wire once started, so
        waiting for the sides one after the other costs nothing; a large write may not be, so those
        are driven together by one poll loop.
        """
        sides = self.writers if sides is None else sides
        taken, failures = [], []
        for side in sides:
            try:
                taken.append((side, side.acquire()))
            except BackendError as e:
                failures.append((side, e))
        if not taken:
            return failures
        try:
            if op == "write" and length > SEQUENTIAL_WAIT_MAX:
                started, commands = [], []
                for side, h in taken:
                    try:
                        commands.append((h, start(h)))
                        started.append(side)
                    except nbd.Error as e:
                        failures.append((side, e))
                for side, result in zip(started, drive(commands)):
                    if result is not None:
                        failures.append((side, result))
            else:
                # Take turns at being the side that runs synchronously: its latency is measured
                # exactly, so each side's latency is sampled on every other request.
                if len(taken) > 1 and next(self._turn) & 1:
                    taken.reverse()
                started = []
                for side, h in taken[:-1]:
                    try:
                        started.append((side, h, start(h)))
                    except nbd.Error as e:
                        failures.append((side, e))
                last_side, last_h = taken[-1]
                t0 = time.monotonic()
                try:
                    run(last_h)
                except nbd.Error as e:
                    failures.append((last_side, e))
                elapsed = time.monotonic() - t0
                stats = self.stats[last_side.name]
                stats.latencies.append(elapsed)
                stats.histogram.add(elapsed)
                for side, h, cookie in started:
                    try:
                        wait_one(h, cookie)
                    except nbd.Error as e:
                        failures.append((side, e))
        finally:
            failed = {side for side, _ in failures}
            for side, h in taken:
                side.release(h, side in failed)
        return failures
