"""The commands a backend takes: what to do, where, how much, and with which flags.

A request of the client becomes one command (a `Write` of its buffer at its offset), which `Disk`
hands to every side: `backend.start(cmd)` (asynchronous, returns a pending command to `wait()` for)
or `backend.run(cmd)` (synchronous). The command is plain data, so the offset a write goes to is in
plain sight all the way from nbdkit's callback to the libnbd call; each backend maps the command to
its own verb (NbdBackend: libnbd, MemoryBackend: a bytearray).

A command larger than the sides accept is cut with `pieces(step)` into commands for consecutive
ranges, same flags.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""


class Command:
    __slots__ = ("offset", "length")
    op = None                       # "read", "write", "zero", "trim", "flush": for messages, dispatch

    def pieces(self, step):
        """This command as commands of at most `step` bytes each, in order."""
        end = self.offset + self.length
        return [self._piece(o, min(step, end - o)) for o in range(self.offset, end, step)]

    def __repr__(self):
        return f"{type(self).__name__}({self.length} bytes at {self.offset})"


class Read(Command):
    """Read len(buf) bytes at `offset` into `buf` (a writable buffer)."""

    __slots__ = ("buf",)
    op = "read"

    def __init__(self, buf, offset):
        self.buf, self.offset, self.length = buf, offset, len(buf)

    def _piece(self, offset, length):
        start = offset - self.offset
        return Read(memoryview(self.buf)[start:start + length], offset)


class Write(Command):
    """Write `buf` at `offset`; `fua`: on stable storage before it completes."""

    __slots__ = ("buf", "fua")
    op = "write"

    def __init__(self, buf, offset, fua=False):
        self.buf, self.offset, self.length, self.fua = buf, offset, len(buf), fua

    def _piece(self, offset, length):
        start = offset - self.offset
        return Write(memoryview(self.buf)[start:start + length], offset, self.fua)


class Zero(Command):
    """Make `length` bytes at `offset` read as zeros. `may_trim`: the side may deallocate them;
    `fast`: only if that is faster than writing zeros, else fail with ENOTSUP."""

    __slots__ = ("may_trim", "fua", "fast")
    op = "zero"

    def __init__(self, length, offset, may_trim=False, fua=False, fast=False):
        self.offset, self.length = offset, length
        self.may_trim, self.fua, self.fast = may_trim, fua, fast

    def _piece(self, offset, length):
        return Zero(length, offset, self.may_trim, self.fua, self.fast)


class Trim(Command):
    """Discard `length` bytes at `offset` (their content is then unspecified)."""

    __slots__ = ("fua",)
    op = "trim"

    def __init__(self, length, offset, fua=False):
        self.offset, self.length, self.fua = offset, length, fua

    def _piece(self, offset, length):
        return Trim(length, offset, self.fua)


class Flush(Command):
    """Put every write completed so far on stable storage."""

    __slots__ = ()
    op = "flush"

    def __init__(self):
        self.offset = self.length = 0


FLUSH = Flush()

# What `extents()` says of a range, as the NBD protocol spells it (nbd.STATE_HOLE, nbd.STATE_ZERO).
STATE_HOLE = 1
STATE_ZERO = 2


class Verbs:
    """The offset-based verbs every backend has, written once on top of the two it implements
    itself: `run(cmd)` (one command, to completion) and `extents(length, offset, req_one)`.
    Failures are the backend's SideError."""

    def pread(self, buf, offset):
        self.run(Read(buf, offset))

    def pwrite(self, buf, offset, fua=False):
        self.run(Write(buf, offset, fua))

    def zero(self, length, offset, may_trim=False, fua=False, fast=False):
        self.run(Zero(length, offset, may_trim, fua, fast))

    def trim(self, length, offset, fua=False):
        self.run(Trim(length, offset, fua))

    def flush(self):
        """Flush the side (on one connection: with multi-conn, a flush covers them all); nothing
        where the side offers no flush."""
        if self.can_flush:
            self.run(FLUSH)

    def allocation(self, start, end):
        """[start, end) as consecutive (offset, length, is_zero) spans, from base:allocation (all
        data where the side does not say): what a copy reads, and what it sends as zeroes."""
        if not self.can_extents:
            yield start, end - start, False
            return
        pos = start
        while pos < end:
            found = self.extents(end - pos, pos, req_one=False)
            before = pos
            for offset, length, flags in found:
                stop = min(offset + length, end)
                if stop > pos:
                    yield pos, stop - pos, bool(flags & STATE_ZERO)
                    pos = stop
                if pos >= end:
                    break
            if pos == before:
                # Nothing said of `pos` (no extent, or none past it): the rest is data, rather
                # than asking the same question forever.
                yield pos, end - pos, False
                return
