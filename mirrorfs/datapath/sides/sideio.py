"""What an evacuation (evacuation.evacuee, evacuation.hydrator) asks of a side, on the backends' verbs:
read, write, zero, trim, flush, cache, extents, and the extent-aware copy of a range from one side
to another.

Each function takes a backend and offsets, splits what the side does not take in one request (reads
and writes above its maximum, zeroes and trims above 1 GiB: datapath.sides.commands' `pieces`), and
raises `SideFailure` naming the side, the operation and the range, with the errno the client gets.
A request whose connection was lost (not refused: SideError.lost) is sent again on a new connection
for up to RESEND_FOR seconds, as the mirror's authoritative side does (datapath.mirror.disk): the side may
be restarting, or the whole tree is going down, and then the client must get no answer rather than
an error. Callers hold the range lock of every change, so sending a change twice is harmless.

This module runs inside nbdkit's embedded interpreter: standard library only (the sides are backends).
"""

import logging
import time

from mirrorfs.datapath.sides.backend import describe
from mirrorfs.datapath.sides.commands import FLUSH, Read, Trim, Write, Zero
from mirrorfs.datapath.sides.resend import MAX_EFFECT, RESEND_EVERY, RESEND_FOR
from mirrorfs.datapath.errors import DataPathError, SideError, lost_again

log = logging.getLogger("mirrorfs")

PIECE = 1024 * 1024             # a copy reads and writes in pieces of this size


class SideFailure(DataPathError):
    """A side refused or failed a request; `errno` is what the client gets, `cause` the SideError."""

    def __init__(self, side, op, offset, length, exc):
        self.side, self.op, self.offset, self.length, self.cause = side, op, offset, length, exc
        self.errno = exc.errno
        super().__init__(f"{side.name} {op} at {offset} length {length}: {describe(exc)}")


def _again(side, op, offset, length, attempt):
    """attempt() until it succeeds; sent again while the connection was lost, for RESEND_FOR."""
    deadline = lost_at = None
    while True:
        try:
            return attempt()
        except SideError as e:
            if not e.lost or (lost_at is not None and lost_again(e, lost_at)):
                raise SideFailure(side, op, offset, length, e) from None
            now = time.monotonic()
            if deadline is None:
                lost_at, deadline = now, now + RESEND_FOR
                log.warning("%s: connection lost; sending the %s again", side.name, op)
            if now >= deadline:
                raise SideFailure(side, op, offset, length, e) from None
            time.sleep(max(RESEND_EVERY, min(side.down_until - now, deadline - now)))


def _run(side, cmd, step):
    for piece in cmd.pieces(step) if cmd.length > step else [cmd]:
        _again(side, cmd.op, piece.offset, piece.length, lambda piece=piece: side.run(piece))


def read(side, buf, offset, maximum):
    """Fill `buf` (a writable buffer) from `side` at `offset`."""
    _run(side, Read(buf, offset), maximum)


def read_once(side, buf, offset, maximum):
    """read(), not sent again if the connection is lost: for a read whose failure has a way
    around it (Evacuee's rare path in place), where waiting to resend only delays the client."""
    cmd = Read(buf, offset)
    for piece in cmd.pieces(maximum) if cmd.length > maximum else [cmd]:
        try:
            side.run(piece)
        except SideError as e:
            raise SideFailure(side, "read", piece.offset, piece.length, e) from None


def run(side, cmd, maximum):
    """One command (datapath.sides.commands: a client's change as it came) on `side`: reads and
    writes split above `maximum`, zeroes and trims above MAX_EFFECT."""
    _run(side, cmd, maximum if cmd.op in ("read", "write") else MAX_EFFECT)


def write(side, buf, offset, fua, maximum):
    _run(side, Write(buf, offset, fua), maximum)


def zero(side, count, offset, may_trim=True, fua=False, fast=False):
    _run(side, Zero(count, offset, may_trim, fua, fast), MAX_EFFECT)


def trim(side, count, offset, fua=False):
    _run(side, Trim(count, offset, fua), MAX_EFFECT)


def flush(side):
    if side.can_flush:
        _again(side, "flush", 0, 0, lambda: side.run(FLUSH))


def cache(side, count, offset):
    _again(side, "cache", offset, count, lambda: side.cache(count, offset))


def extents(side, count, offset, req_one):
    """(offset, length, flags) of base:allocation over [offset, offset + count)."""
    try:
        return side.extents(count, offset, req_one)
    except SideError as e:
        raise SideFailure(side, "extents", offset, count, e) from None


def copy(source, dest, start, end):
    """Copy [start, end) from `source` to `dest`, allocation-aware: data extents read (all in flight
    at once on one source connection) and written (likewise on one destination connection), zero
    extents sent as zero requests. Returns (bytes read, bytes zeroed)."""
    reads, zeroes = [], []
    try:
        spans = list(source.allocation(start, end))
    except SideError as e:
        raise SideFailure(source, "extents", start, end - start, e) from None
    for offset, length, zero_ in spans:
        if zero_:
            zeroes.append(Zero(length, offset, may_trim=True))
        else:
            reads += Read(bytearray(length), offset).pieces(PIECE)
    if reads:
        _again(source, "read", start, end - start, lambda: source.run_all(reads))
    writes = [Write(r.buf, r.offset) for r in reads] + zeroes
    if writes:
        _again(dest, "write", start, end - start, lambda: dest.run_all(writes))
    return sum(r.length for r in reads), sum(z.length for z in zeroes)
