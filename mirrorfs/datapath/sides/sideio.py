"""What an evacuation (evacuation.evacuee, evacuation.hydrator) asks of a side, on the backends' verbs:
read, write, zero, trim, flush, cache, extents. (Its copy of a range from one side to the other is
every copier's: datapath.sides.copy.)

Each function takes a backend and offsets, splits what the side does not take in one request (reads
and writes above its maximum, zeroes and trims above 1 GiB: datapath.sides.commands' `pieces`), and
raises `SideFailure` naming the side, the operation and the range, with the errno the client gets.
A request whose connection was lost (not refused: SideError.lost) is sent again on a new connection
for up to RESEND_FOR seconds by the one resend loop (datapath.sides.resend), as the mirror's
authoritative side's are (datapath.mirror.disk): the side may be restarting, or the whole tree is
going down, and then the client must get no answer rather than an error. Callers hold the range
lock of every change, so sending a change twice is harmless.

This module runs inside nbdkit's embedded interpreter: standard library only (the sides are backends).
"""

from mirrorfs.datapath.sides import resend
from mirrorfs.datapath.sides.commands import FLUSH, Read, Trim, Write, Zero
from mirrorfs.datapath.sides.resend import MAX_EFFECT
from mirrorfs.datapath.errors import SideError, SideFailure


def again(side, op, offset, length, attempt):
    """attempt() until it succeeds, sent again while the connection was lost (resend.again); its
    failure as the SideFailure of `op` on [offset, offset + length) of `side`."""
    try:
        return resend.again(side, attempt, op)
    except SideError as e:
        raise SideFailure(side, op, offset, length, e) from None


def _run(side, cmd, step):
    for piece in cmd.pieces(step) if cmd.length > step else [cmd]:
        again(side, cmd.op, piece.offset, piece.length, lambda piece=piece: side.run(piece))


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
        again(side, "flush", 0, 0, lambda: side.run(FLUSH))


def cache(side, count, offset):
    again(side, "cache", offset, count, lambda: side.cache(count, offset))


def extents(side, count, offset, req_one):
    """(offset, length, flags) of base:allocation over [offset, offset + count)."""
    try:
        return side.extents(count, offset, req_one)
    except SideError as e:
        raise SideFailure(side, "extents", offset, count, e) from None
