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

import errno
import logging
import threading

import nbd

from mirrorfs.backend import describe, error_errno, wait_all, wait_one
from mirrorfs.inflight import InFlight

log = logging.getLogger("mirrorfs")

# Reads up to this size are copied out of libnbd's reply; larger ones land in nbdkit's buffer directly.
COPY_READ_MAX = 256 * 1024
# Writes larger than this may not fit the socket buffer at once; both sides are then polled together.
SEQUENTIAL_WAIT_MAX = 128 * 1024


class RequestError(Exception):
    """A request failed; `errno` is what the client gets."""

    def __init__(self, err, message):
        super().__init__(message)
        self.errno = err


class SideStats:
    """Per-side counters, for status and for the logs."""

    def __init__(self, name):
        self.name = name
        self.errors = 0
        self._lock = threading.Lock()

    def failed(self, op, offset, length, exc):
        with self._lock:
            self.errors += 1
        log.error("%s %s failed at offset %d length %d: %s", self.name, op, offset, length,
                  describe(exc))


class Disk:
    def __init__(self, source, dest=None):
        self.source = source
        self.dest = dest
        self.size = source.size
        self.inflight = InFlight()
        self.reader = source
        self.writers = (source, dest) if dest is not None else (source,)
        self.stats = {b.name: SideStats(b.name) for b in self.writers}

    # Capabilities: what both write sides can do, so a request never needs emulation on one side only.

    def can_write(self):
        return all(not b.read_only for b in self.writers)

    def can_flush(self):
        return all(b.can_flush for b in self.writers)

    def can_fua(self):
        return all(b.can_fua for b in self.writers)

    def can_trim(self):
        return all(b.can_trim for b in self.writers)

    def can_zero(self):
        return all(b.can_zero for b in self.writers)

    def can_fast_zero(self):
        return all(b.can_fast_zero for b in self.writers)

    def can_multi_conn(self):
        return all(b.multi_conn for b in self.writers) and self.reader.multi_conn

    def block_size(self):
        sides = [b.block_size for b in self.writers]
        minimum = max(s[0] for s in sides) or 1
        preferred = max(max(s[1] for s in sides), minimum, 4096)
        maximums = [s[2] for s in sides if s[2]]
        maximum = min(maximums) if maximums else 32 * 1024 * 1024
        return minimum, min(preferred, maximum), maximum

    # Reads.

    def pread(self, buf, offset):
        self.inflight.enter()
        try:
            side = self.reader
            h = side.acquire()
            try:
                if len(buf) <= COPY_READ_MAX:
                    # One libnbd call (one GIL release) beats three, and copying a few KiB is cheap.
                    buf[:] = h.pread(len(buf), offset)
                else:
                    # Large: let libnbd read straight into nbdkit's buffer.
                    wait_one(h, h.aio_pread(nbd.Buffer.from_buffer(buf), offset))
            except nbd.Error as e:
                self.stats[side.name].failed("read", offset, len(buf), e)
                raise RequestError(error_errno(e), describe(e)) from None
            finally:
                side.release(h)
        finally:
            self.inflight.leave()

    def extents(self, count, offset, req_one):
        self.inflight.enter()
        try:
            return self.reader.extents(count, offset, req_one)
        except nbd.Error as e:
            raise RequestError(error_errno(e), describe(e)) from None
        finally:
            self.inflight.leave()

    def cache(self, count, offset):
        self.inflight.enter()
        try:
            self.reader.call(lambda h: h.cache(count, offset))
        except nbd.Error as e:
            raise RequestError(error_errno(e), describe(e)) from None
        finally:
            self.inflight.leave()

    # Changes: to every write side at once, ordered against overlapping changes. Each command comes
    # in two forms, `start` (libnbd aio: returns a cookie) and `run` (synchronous).

    def pwrite(self, buf, offset, fua):
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
        self._change("zero", offset, count,
                     lambda h: h.aio_zero(count, offset, flags=flags),
                     lambda h: h.zero(count, offset, flags=flags), fast_zero=fast)

    def trim(self, count, offset, fua):
        flags = nbd.CMD_FLAG_FUA if fua else 0
        self._change("trim", offset, count,
                     lambda h: h.aio_trim(count, offset, flags=flags),
                     lambda h: h.trim(count, offset, flags=flags))

    def flush(self):
        self.inflight.enter()
        try:
            self._on_every_side("flush", 0, 0, lambda h: h.aio_flush(), lambda h: h.flush())
        finally:
            self.inflight.leave()

    def _change(self, op, offset, length, start, run, fast_zero=False):
        token = self.inflight.enter_range(offset, offset + length)
        try:
            failures = self._on_every_side(op, offset, length, start, run, check=not fast_zero)
            if fast_zero and failures:
                self._finish_fast_zero(offset, length, failures)
        finally:
            self.inflight.leave(token)

    def _finish_fast_zero(self, offset, length, failures):
        """A fast zero that one side refused would leave the sides different. The side that refused
        zeroes the slow way, so both hold zeros; the client gets success (if both refused, the client
        gets ENOTSUP and writes zeros itself, as the protocol intends)."""
        refused = [side for side, e in failures if error_errno(e) == errno.ENOTSUP]
        if len(failures) == len(self.writers) and len(refused) == len(failures):
            raise RequestError(errno.ENOTSUP, "fast zero not supported")
        for side, e in failures:
            if side not in refused:
                self._raise_first("zero", offset, length, [(side, e)])
        flags = nbd.CMD_FLAG_NO_HOLE
        self._on_every_side("zero", offset, length,
                            lambda h: h.aio_zero(length, offset, flags=flags),
                            lambda h: h.zero(length, offset, flags=flags), sides=refused)

    def _on_every_side(self, op, offset, length, start, run, check=True, sides=None):
        """Run one command on each side at once and wait for all. Returns or raises the failures.

        The other sides' commands are started (aio) and the last side's runs synchronously, so the
        sides work in parallel at the cost of few libnbd calls: each call releases and retakes the
        GIL, which is what limits small requests. A small command is on the wire once started, so
        waiting for the sides one after the other costs nothing; a large write may not be, so those
        are driven together by one poll loop.
        """
        sides = self.writers if sides is None else sides
        taken = []
        try:
            for side in sides:
                taken.append((side, side.acquire()))
        except Exception as e:
            for side, h in taken:
                side.release(h)
            log.error("%s failed at offset %d length %d: %s", op, offset, length, e)
            raise RequestError(errno.EIO, str(e)) from None
        failures = []
        try:
            if op == "write" and length > SEQUENTIAL_WAIT_MAX:
                started, commands = [], []
                for side, h in taken:
                    try:
                        commands.append((h, start(h)))
                        started.append(side)
                    except nbd.Error as e:
                        failures.append((side, e))
                for side, result in zip(started, wait_all(commands)):
                    if result is not None:
                        failures.append((side, result))
            else:
                started = []
                for side, h in taken[:-1]:
                    try:
                        started.append((side, h, start(h)))
                    except nbd.Error as e:
                        failures.append((side, e))
                last_side, last_h = taken[-1]
                try:
                    run(last_h)
                except nbd.Error as e:
                    failures.append((last_side, e))
                for side, h, cookie in started:
                    try:
                        wait_one(h, cookie)
                    except nbd.Error as e:
                        failures.append((side, e))
        finally:
            for side, h in taken:
                side.release(h)
        if failures and check:
            # The source's failure first: it is the one the client's data depends on.
            failures.sort(key=lambda f: self.writers.index(f[0]) if f[0] in self.writers else 0)
            self._raise_first(op, offset, length, failures)
        return failures

    def _raise_first(self, op, offset, length, failures):
        for side, e in failures:
            self.stats[side.name].failed(op, offset, length, e)
        side, e = failures[0]
        raise RequestError(error_errno(e), f"{side.name} {op}: {describe(e)}")
