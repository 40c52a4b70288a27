"""Do the two sides of a mirror hold the same bytes? Asked while clients write.

`serve --copy none` takes the operator's word that the sides start equal: nothing was copied, so
"synchronized" only says that every change since went to both. Before the disk switches to the
destination, `pivot` asks this module (the data path's `compare` command), which reads the whole
disk from both sides and answers with the first offset where they differ, if any. A destination
created empty by mistake is found at the first byte the source holds, before a client reads its
zeros.

While clients write: each chunk is compared under its range lock (datapath.inflight), so no change
to it is in flight while both sides are read, and a change either reached both sides before or
comes after (with --lag, what the lag still holds for the chunk reaches the destination first).
Every change goes to both sides, so a chunk found equal stays equal; a change that reached one
side only is the dirty map's to know, and the switch refuses then.

Allocation-aware, as `qemu-img compare`: a chunk that both sides say reads as zeros
(base:allocation) is equal without reading it.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import time

from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.errors import SideError

CHUNK = 4 * 1024 * 1024


def all_zero(side, start, end):
    """Whether `side` says [start, end) reads as zeros (False when it cannot say)."""
    try:
        return all(zero for _, _, zero in side.allocation(start, end))
    except SideError:
        return False


def compare(disk, timeout=None, chunk=CHUNK):
    """(first differing offset or None, bytes compared) between `disk`'s source and destination,
    from offset 0. After `timeout` seconds it gives up, returning what it compared so far (fewer
    bytes than the disk: the rest is not known), so that a comparison nobody waits for any more
    does not go on reading the disk. Raises sideio.SideFailure when a side cannot be read."""
    source, dest, size = disk.source, disk.dest, disk.size
    deadline = time.monotonic() + timeout if timeout is not None else None
    a, b = bytearray(chunk), bytearray(chunk)
    pos = 0
    while pos < size:
        if deadline is not None and time.monotonic() >= deadline:
            break
        end = min(pos + chunk, size)
        token = disk.inflight.enter_range("compare", pos, end)
        try:
            if disk.lag_in_force():
                # --lag: a change the source acknowledged may still be on its way to the
                # destination; under the range lock no new one is queued, so wait for those.
                disk.lag.wait_range(pos, end)
            if not (all_zero(source, pos, end) and all_zero(dest, pos, end)):
                n = end - pos
                ba, bb = memoryview(a)[:n], memoryview(b)[:n]
                sideio.read(source, ba, pos, disk.max_request)
                sideio.read(dest, bb, pos, disk.max_request)
                if ba != bb:
                    return pos + _first_difference(ba, bb), pos
        finally:
            disk.inflight.leave(token)
        pos = end
    return None, pos


def _first_difference(a, b):
    lo, hi = 0, len(a)
    while hi - lo > 4096:               # halve down to a page, then byte by byte
        mid = (lo + hi) // 2
        if a[lo:mid] != b[lo:mid]:
            hi = mid
        else:
            lo = mid
    return next(i for i in range(lo, hi) if a[i] != b[i])
