"""A side held in memory: a bytearray behind the verbs and capabilities of NbdBackend, and failures
to order. `Disk`, the dirty map and the copier run on it unchanged, so their rules are tested in this
process in milliseconds (tests/unit/test_core.py), as ovirt-imageio tests its copy between memory
backends and a failing one.

    side = MemoryBackend("destination", 16 * MiB)
    side.fail("write", errno.ENOSPC)                    # every write fails: the side refuses it
    side.fail("write", errno.ECONNRESET, times=1)       # the next write loses its connection
    side.fail("zero", errno.ENOTSUP, start=0, end=MiB)  # only where it overlaps [0, 1 MiB)
    side.unreachable = True                             # no connection: every verb fails at once
    side.hold() ... side.let_go()                       # a hung server: commands wait until let go
                                                        # (or until expire() cuts them)
    side.volatile() ... side.power_loss()               # a write cache: what no flush or FUA
                                                        # covered is lost at the power loss

A command that fails changes nothing. `commands` counts, per op, the commands that reached the side.
This module runs inside nbdkit's embedded interpreter (it need not): standard library only.
"""

import collections
import errno
import os
import threading
import time

from mirrorfs.datapath.sides.commands import STATE_HOLE, STATE_ZERO, Verbs
from mirrorfs.datapath.errors import SideError, SideUnreachable, side_error

MiB = 1 << 20
EXTENT = 4096                   # the unit extents() reports allocation in


class Fault:
    __slots__ = ("op", "errno", "start", "end", "times")

    def __init__(self, op, err, start, end, times):
        self.op, self.errno, self.start, self.end, self.times = op, err, start, end, times

    def matches(self, op, offset, length):
        end = offset + max(length, 1)
        return op == self.op and offset < self.end and self.start < end


class MemoryBackend(Verbs):
    def __init__(self, name, size, **capabilities):
        """`capabilities` override the defaults below (a side without fast zero: can_fast_zero=False)."""
        self.name = name
        self.size = size
        self.data = bytearray(size)
        self.read_only = False
        self.multi_conn = True
        self.can_flush = self.can_fua = self.can_trim = self.can_zero = True
        self.can_fast_zero = self.can_cache = self.can_extents = True
        self.is_rotational = False
        self.block_size = (1, 4096, 32 * MiB)
        for key, value in capabilities.items():
            if not hasattr(self, key):
                raise TypeError(f"unknown capability {key!r}")
            setattr(self, key, value)
        self.timeouts = 0
        self.down_until = 0.0
        self.unreachable = False
        self.closed = False
        self.commands = collections.Counter()
        self.faults = []
        self._lock = threading.Lock()
        self._going = threading.Event()
        self._going.set()
        self._held = {}                 # token of a held command -> when it began to wait
        self._cut = set()               # held commands expire() cut
        self._tokens = iter(range(1 << 62))
        self._stable = None             # volatile(): what survives a power loss

    def volatile(self):
        """From now on the side has a write cache: a write, zero or trim reaches stable storage
        only with FUA or at a later flush, and `power_loss()` forgets every other one. The rules
        "flushed before saved" (the hydration map, the copy's cursor) are tested against it: a
        side whose data survives everything cannot tell a save after the flush from one before."""
        with self._lock:
            self._stable = bytearray(self.data)

    def power_loss(self):
        """The host lost power: the side holds what reached stable storage, nothing more."""
        with self._lock:
            if self._stable is None:
                raise RuntimeError(f"{self.name}: power_loss() needs volatile() first")
            self.data[:] = self._stable

    @property
    def available(self):
        return not self.unreachable

    # Failures to order.

    def fail(self, op, err=errno.EIO, start=0, end=None, times=None):
        """Fail commands `op` ("read", "write", "zero", "trim", "flush", "cache", "extents",
        "depth") that
        overlap [start, end) with errno `err`, `times` times (None: until cleared)."""
        self.faults.append(Fault(op, err, start, self.size if end is None else end, times))

    def clear_faults(self):
        self.faults = []

    def hold(self):
        """Commands from now on wait, as on a server that stopped answering."""
        self._going.clear()

    def let_go(self):
        self._going.set()

    def held(self):
        """How many commands are waiting because of hold()."""
        return len(self._held)

    def cache(self, length, offset):
        self._arrive("cache", offset, length)

    def extents(self, length, offset, req_one=False):
        """Runs of EXTENT-sized blocks that hold data (flags 0) or only zeros (a hole)."""
        self._arrive("extents", offset, length)
        found = []
        end = min(offset + length, self.size)
        zeros = bytes(EXTENT)
        pos = offset
        while pos < end:
            n = min(EXTENT - pos % EXTENT, end - pos)
            flags = STATE_HOLE | STATE_ZERO if self.data[pos:pos + n] == zeros[:n] else 0
            if found and found[-1][2] == flags:
                start, size, _ = found[-1]
                found[-1] = (start, size + n, flags)
            else:
                if req_one and found:
                    break
                found.append((pos, n, flags))
            pos += n
        return found

    def allocation_depth(self, length, offset):
        """qemu:allocation-depth as a destination in place would answer: `depths` (set by a test:
        [(offset, length, depth)]) where given, 2 (its backing's) elsewhere."""
        self._arrive("depth", offset, length)
        found, pos, end = [], offset, offset + length
        for a, n, d in sorted(getattr(self, "depths", ())):
            if a + n <= pos or a >= end:
                continue
            if a > pos:
                found.append((pos, a - pos, 2))
            found.append((max(a, pos), min(a + n, end) - max(a, pos), d))
            pos = min(a + n, end)
        if pos < end:
            found.append((pos, end - pos, 2))
        return found

    def reserve(self):
        if self.unreachable or self.closed:
            raise SideUnreachable(f"{self.name}: unreachable")
        return self

    def run(self, cmd, reserved=None):
        self._arrive(cmd.op, cmd.offset, cmd.length)
        self._apply(cmd)

    def start(self, cmd, reserved=None):
        """Runs the command at once, unless the side is held: then it runs (waits) in `wait()`."""
        if self.unreachable or self.closed:
            raise SideUnreachable(f"{self.name}: unreachable")
        pending = MemoryPending(self, cmd)
        if self._going.is_set():
            pending.finish()
        return pending

    def run_all(self, cmds):
        failures = [p.error for p in map(self.start, cmds) if p.finish() is not None]
        if failures:
            raise failures[0]

    def run_each(self, cmds):
        results = []
        for cmd in cmds:
            try:
                self.run(cmd)
                results.append(None)
            except SideError as e:
                results.append(e)
        return results

    # What NbdBackend offers the rest of the data path.

    def check(self, timeout):
        if self.unreachable:
            raise SideUnreachable(f"{self.name}: unreachable")
        if not self._going.wait(timeout):
            raise SideUnreachable(f"{self.name}: no answer after {timeout:g}s")
        try:
            self.flush()
        except SideError as e:
            raise SideUnreachable(f"{self.name}: {e}") from None

    def retire(self):
        try:
            self.flush()
        except SideError:
            pass
        self.close()

    def close(self):
        self.closed = True

    def oldest_wait(self):
        held = list(self._held.values())
        return time.monotonic() - min(held) if held else 0.0

    def expire(self, timeout):
        """Cut the commands held for `timeout` seconds or more: they fail with ConnectionLost."""
        now = time.monotonic()
        due = timeout
        for token, since in list(self._held.items()):
            if now - since >= timeout:
                self._cut.add(token)
                self.timeouts += 1
            else:
                due = min(due, since + timeout - now)
        return due

    # Inside.

    def _arrive(self, op, offset, length):
        """A command reaches the side: unreachable, held, or failed by a fault (raised); else it is
        counted and may be applied."""
        if self.unreachable or self.closed:
            raise SideUnreachable(f"{self.name}: unreachable")
        if not self._going.is_set():
            token = next(self._tokens)
            self._held[token] = time.monotonic()
            try:
                while not self._going.wait(0.01):
                    if token in self._cut:
                        self._cut.discard(token)
                        raise side_error(errno.ESHUTDOWN, f"{op}: connection cut")
            finally:
                self._held.pop(token, None)
        with self._lock:
            self.commands[op] += 1
            for fault in self.faults:
                if fault.matches(op, offset, length):
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self.faults.remove(fault)
                    raise side_error(fault.errno, f"{op}: {os.strerror(fault.errno)}")
            if offset + length > self.size:
                raise side_error(errno.EINVAL, f"{op}: beyond the end of the disk")

    def _apply(self, cmd):
        op, start, end = cmd.op, cmd.offset, cmd.offset + cmd.length
        with self._lock:
            if op == "read":
                cmd.buf[:] = self.data[start:end]
            elif op == "write":
                self.data[start:end] = cmd.buf
            elif op in ("zero", "trim"):
                self.data[start:end] = bytes(cmd.length)
            stable = self._stable
            if stable is None:
                return
            if op == "flush":
                stable[:] = self.data
            elif op in ("write", "zero", "trim") and cmd.fua:
                stable[start:end] = self.data[start:end]


class MemoryPending:
    __slots__ = ("backend", "cmd", "error", "done")

    def __init__(self, backend, cmd):
        self.backend, self.cmd, self.error, self.done = backend, cmd, None, False

    def finish(self):
        """Run the command if it has not run; returns its SideError or None."""
        if not self.done:
            self.done = True
            try:
                self.backend.run(self.cmd)
            except SideError as e:
                self.error = e
        return self.error

    def wait(self):
        if self.finish() is not None:
            raise self.error
