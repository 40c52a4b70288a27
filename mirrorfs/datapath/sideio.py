"""The few verbs an evacuation (datapath.evacuee, datapath.hydrator) asks of a side, and the only
place they touch libnbd handles: read, write, zero, trim, flush, extents, and the extent-aware copy
of a range from one side to another.

Each verb takes an `NbdBackend` and offsets, splits what the side does not take in one request
(reads and writes above its maximum, zeroes and trims above 1 GiB), and raises `SideFailure` naming
the side and the errno the client gets: callers never see `nbd.Error`. A request whose connection
was lost (not refused) is sent again on a new connection for up to RESEND_FOR seconds, as the
mirror's authoritative side does (datapath.disk): the side may be restarting, or the whole tree is
going down, and then the client must get no answer rather than an error. Callers hold the range
lock of every change, so sending a change twice is harmless.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import errno
import logging
import time

import nbd

from mirrorfs.datapath.backend import BackendError, describe, drive, error_errno, wait_one

log = logging.getLogger("mirrorfs")

COPY_READ_MAX = 256 * 1024      # reads up to this are copied out of libnbd's reply
MAX_EFFECT = 1 << 30            # zeroes and trims are split above this (see datapath.disk)
PIECE = 1024 * 1024             # a copy reads and writes in pieces of this size
RESEND_FOR = 30.0
RESEND_EVERY = 0.2
_CONNECTION_LOST = {errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE,
                    errno.ECONNREFUSED, errno.ECONNABORTED}


class SideFailure(Exception):
    """A side refused or failed a request; `errno` is what the client gets."""

    def __init__(self, side, op, offset, length, exc):
        self.side, self.op, self.offset, self.length, self.cause = side, op, offset, length, exc
        self.errno = error_errno(exc)
        super().__init__(f"{side.name} {op} at {offset} length {length}: {describe(exc)}")


def _lost(exc):
    return isinstance(exc, BackendError) or error_errno(exc, None) in _CONNECTION_LOST


def _run(side, op, offset, length, fn):
    """fn(handle) on a handle of `side`; sent again on a new connection if the connection was lost."""
    deadline = None
    while True:
        try:
            return side.call(fn)
        except (nbd.Error, BackendError) as e:
            if not _lost(e):
                raise SideFailure(side, op, offset, length, e) from None
            now = time.monotonic()
            if deadline is None:
                deadline = now + RESEND_FOR
                log.warning("%s: connection lost; sending the %s again", side.name, op)
            if now >= deadline:
                raise SideFailure(side, op, offset, length, e) from None
            time.sleep(max(RESEND_EVERY, min(side.down_until - now, deadline - now)))


def _pieces(offset, length, step):
    return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]


def read(side, buf, offset, maximum):
    """Fill `buf` (a writable buffer) from `side` at `offset`."""
    view = memoryview(buf)
    for o, n in _pieces(offset, len(view), maximum):
        piece = view[o - offset:o - offset + n]
        if n <= COPY_READ_MAX:
            def fn(h, piece=piece, o=o, n=n):
                piece[:] = h.pread(n, o)
        else:
            def fn(h, piece=piece, o=o):
                wait_one(h, h.aio_pread(nbd.Buffer.from_buffer(piece), o))
        _run(side, "read", o, n, fn)


def write(side, buf, offset, fua, maximum):
    flags = nbd.CMD_FLAG_FUA if fua else 0
    view = memoryview(buf)
    for o, n in _pieces(offset, len(view), maximum):
        piece = view[o - offset:o - offset + n]
        _run(side, "write", o, n, lambda h, piece=piece, o=o: h.pwrite(piece, o, flags=flags))


def zero(side, count, offset, may_trim=True, fua=False, fast=False):
    flags = (0 if may_trim else nbd.CMD_FLAG_NO_HOLE) | (nbd.CMD_FLAG_FUA if fua else 0) | \
        (nbd.CMD_FLAG_FAST_ZERO if fast else 0)
    for o, n in _pieces(offset, count, MAX_EFFECT):
        _run(side, "zero", o, n, lambda h, o=o, n=n: h.zero(n, o, flags=flags))


def trim(side, count, offset, fua=False):
    flags = nbd.CMD_FLAG_FUA if fua else 0
    for o, n in _pieces(offset, count, MAX_EFFECT):
        _run(side, "trim", o, n, lambda h, o=o, n=n: h.trim(n, o, flags=flags))


def flush(side):
    if side.can_flush:
        _run(side, "flush", 0, 0, lambda h: h.flush())


def cache(side, count, offset):
    _run(side, "cache", offset, count, lambda h: h.cache(count, offset))


def extents(side, count, offset, req_one):
    """(offset, length, flags) of base:allocation over [offset, offset + count)."""
    try:
        return side.extents(count, offset, req_one)
    except (nbd.Error, BackendError) as e:
        raise SideFailure(side, "extents", offset, count, e) from None


def is_zero(flags):
    return bool(flags & nbd.STATE_ZERO)


def copy(source, dest, start, end):
    """Copy [start, end) from `source` to `dest`, allocation-aware: data extents read (all in flight
    at once on one source connection) and written (likewise on one destination connection), zero
    extents sent as zero requests. Returns (bytes read, bytes zeroed)."""
    pieces, zeroes = [], []
    for offset, length, zero_ in _extents(source, start, end):
        if zero_:
            zeroes.append((offset, length))
        else:
            for pos in range(offset, offset + length, PIECE):
                pieces.append((pos, nbd.Buffer(min(PIECE, offset + length - pos))))
    if pieces:
        def reads(h):
            _wait(h, [h.aio_pread(buf, pos) for pos, buf in pieces])
        _run(source, "read", start, end - start, reads)

    def writes(h):
        _wait(h, [h.aio_pwrite(buf, pos) for pos, buf in pieces]
              + [h.aio_zero(length, offset) for offset, length in zeroes])
    if pieces or zeroes:
        _run(dest, "write", start, end - start, writes)
    return sum(len(buf) for _, buf in pieces), sum(length for _, length in zeroes)


def _extents(source, start, end):
    if not source.can_extents:
        yield start, end - start, False
        return
    pos = start
    while pos < end:
        found = extents(source, end - pos, pos, req_one=False)
        if not found:
            yield pos, end - pos, False
            return
        for offset, length, flags in found:
            stop = min(offset + length, end)
            if stop > pos:
                yield pos, stop - pos, is_zero(flags)
                pos = stop
            if pos >= end:
                break


def _wait(h, cookies):
    failures = [r for r in drive([(h, c) for c in cookies]) if r is not None]
    if failures:
        raise failures[0]
