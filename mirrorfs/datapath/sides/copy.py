"""The one extent-aware copy of a range from one side to another, for every copy mirrorfs makes:
the mirror's copier (its first pass and the regions it copies again, datapath.mirror.copier), the
evacuation's hydration and copy-on-read (Evacuee.copy_range, datapath.evacuation), and the
migration's base copy, in the supervisor (mirrorfs.control.basecopy).

    done = copy_range(source, dest, lo, hi)                 # one chunk, at once
    done = copy_range(source, dest, lo, hi, chunk=4 << 20, smallest=256 << 10, pacer=pacer,
                      stop=stop, guard=held, after=count)
    done.read, done.zeroed                                  # bytes read (and written), zeroed
    done.end                                                # < hi: stopped between two chunks

The range is copied in chunks, one after the other; each chunk:
1. is `chunk` bytes (None: the whole range), or under the pacer's limit about a sixteenth of a
   second's worth (Pacer.chunk), not below `smallest`;
2. is paid for before it is copied (`pacer.reserve`), outside the guard: a chunk that waits for
   its rate holds no lock. A `stop` set meanwhile (or, without a pacer, set before the chunk) ends
   the copy there, between two chunks: `done.end` says how far it got;
3. is copied under `guard(lo, hi)`, a context manager (the copier's range lock and write intent),
   as the source's block status (base:allocation) splits it:
   - data is read, every piece in flight at once on one source connection, then written, every
     piece at once on one destination connection: the servers see a queue, not one request at a
     time. Pieces are PIECE bytes, or less where a side's maximum is smaller; one buffer per
     copy, reused by its chunks, as large as the most data in one;
   - zeros (a hole, or allocated zeros) become zero requests that may trim, sent with the writes
     and split at MAX_EFFECT; skipped where the destination is known to read zeros there
     (`dest_zero`: a new image). Not fast zeros: the copy must zero those bytes whatever it costs,
     and a side may only refuse a fast one;
4. is settled with the pacer: what the sides carried (the data) is paid, the rest given back (zero
   extents cost the sides next to nothing; a chunk that failed copied nothing);
5. is handed to `after(lo, hi, read, zeroed)`, outside the guard: the caller's bookkeeping.

A side's failure raises SideFailure (datapath.sides.sideio) naming the side, the operation and the
chunk. With `resend`, a command whose connection was lost is sent again first
(datapath.sides.resend): the evacuation's copies, which a client may be waiting for. What a failed
or stopped copy means (a chunk to retry, a region to copy again, a region listed as unreadable, a
base copy that failed) is the caller's, as is what a finished one means (the dirty map's
`region_done`, the hydration map's commit): after the copy, never before.

This module runs inside nbdkit's embedded interpreter, and in the supervisor (the base copy, on
two NbdBackends): standard library and libnbd only.
"""

import contextlib
import threading
from typing import NamedTuple

from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.sides.commands import Read, Write, Zero
from mirrorfs.datapath.sides.resend import MAX_EFFECT
from mirrorfs.datapath.errors import SideError, SideFailure

PIECE = 1 << 20                 # one read or write request of a chunk's data, at most

__all__ = ["Copied", "SideFailure", "copy_range"]


class Copied(NamedTuple):
    read: int                   # data bytes read from the source and written to the destination
    zeroed: int                 # bytes sent as zero requests
    end: int                    # where the copy stopped: the range's end unless stopped


def copy_range(source, dest, start, end, chunk=None, smallest=None, pacer=None, stop=None,
               guard=None, after=None, dest_zero=False, resend=False):
    """Copy [start, end) from `source` to `dest` (backends), chunk by chunk (see the module
    docstring). Returns Copied; raises SideFailure."""
    largest = chunk or max(end - start, 1)
    smallest = min(smallest or largest, largest)
    if stop is None:
        stop = threading.Event()
    piece = _piece(source, dest)
    buf = []                    # the copy's one buffer, as large as the most data in a chunk
    read = zeroed = 0
    pos = start
    while pos < end:
        hi = min(pos + (pacer.chunk(largest, smallest) if pacer is not None else largest), end)
        if pacer is not None:
            if not pacer.reserve(hi - pos, stop):
                break
        elif stop.is_set():
            break
        got = (0, 0)
        try:
            with guard(pos, hi) if guard is not None else contextlib.nullcontext():
                got = _chunk(source, dest, pos, hi, buf, piece, dest_zero, resend)
        finally:
            if pacer is not None:
                pacer.settle(hi - pos, got[0])
        read, zeroed = read + got[0], zeroed + got[1]
        if after is not None:
            after(pos, hi, *got)
        pos = hi
    return Copied(read, zeroed, min(pos, end))


def _chunk(source, dest, lo, hi, buf, piece, dest_zero, resend):
    """Copy [lo, hi), its data through `buf` (a list holding the buffer, or empty: made here, only
    as large as the data, which a new bytearray must fill with zeros first): (bytes read, bytes
    zeroed)."""
    try:
        spans = list(source.allocation(lo, hi))
    except SideError as e:
        raise SideFailure(source, "extents", lo, hi - lo, e) from None
    data = sum(length for _, length, zero in spans if not zero)
    if data and (not buf or len(buf[0]) < data):
        buf[:] = [memoryview(bytearray(data))]
    reads, zeroes, used = [], [], 0
    for offset, length, zero in spans:
        if not zero:
            reads += Read(buf[0][used:used + length], offset).pieces(piece)
            used += length
        elif not dest_zero:
            zeroes += Zero(length, offset, may_trim=True).pieces(MAX_EFFECT)
    if reads:
        _run_all(source, "read", lo, hi, reads, resend)
    writes = [Write(r.buf, r.offset) for r in reads] + zeroes
    if writes:
        _run_all(dest, "write", lo, hi, writes, resend)
    return used, sum(z.length for z in zeroes)


def _run_all(side, op, lo, hi, cmds, resend):
    """Every command of `cmds` on one connection of `side` at once; SideFailure for the chunk."""
    if resend:
        sideio.again(side, op, lo, hi - lo, lambda: side.run_all(cmds))
        return
    try:
        side.run_all(cmds)
    except SideError as e:
        raise SideFailure(side, op, lo, hi - lo, e) from None


def _piece(source, dest):
    """The largest read or write both sides take: PIECE, or a side's smaller maximum (0: none
    advertised)."""
    maxima = [s.block_size[2] for s in (source, dest) if s.block_size[2]]
    return min([PIECE] + maxima)
