"""The served disk of an evacuation (--switch-first): what happens to each request when the
destination is authoritative from the first second and the source is only read. Read this file to
know what happens to a write in that mode (datapath.mirror.disk is the mirror's).

- write, zero, trim → the destination alone. A change to a region that is not hydrated
  (datapath.evacuation.hydration) first copies the rest of that region from the source, under the range lock
  of the whole region, unless the change covers the region whole; then the change; then the
  region is committed (destination flushed, map saved, group commit) and only then is the client
  answered. A partial write therefore never leaves the destination's zeros where the source had
  data: the region is complete on the destination before the map says so.
- The rare path: if the source cannot be read for that copy, only the change is written, and its
  byte range is committed as **held** in the region (the same flush and save, before the answer).
  Reads take held ranges from the destination and the rest of the region from the source, so the
  destination's zeros around the change are never read; copying the region later (the hydrator,
  the next partial change) copies only what is not held, and a change that completes the region
  makes it hydrated.
- read, extents, cache → cut where the side that holds the bytes changes: hydrated regions (and
  held ranges) from the destination, the rest from the source (which nothing writes, so a read of
  it needs no lock).
- flush → the destination. The map never holds an unsaved hydrated region, so nothing more.
- A source failure fails only what needs the source: reads of bytes the destination does not
  hold. It is counted, with its offset (status: `source_read_errors`); the bytes at risk are the
  ones the destination does not hold. In place, a failed read of a region not hydrated is counted
  the same way (the destination's daemon read the source for it).
- With copy-on-read (datapath.evacuation.copyonread), a read of a region not hydrated also hands it to be
  hydrated, after the client's answer.

Range locks (InFlight) order every change and every hydration copy on the same bytes: a copy never
puts the source's older data over a client's newer write.

Each change is one command (datapath.sides.commands: `Write(buf, offset, fua)`, ...) from nbdkit's
callback to the destination, as in the mirror. A request that fails (a side's SideFailure, or a
commit's HydrationError) is converted once, in `_refused`: there the client's errno is decided and
the failure counted against the side that failed. The Evacuee is a served disk like the mirror's
(datapath.served: capabilities, in flight, statistics, the status skeleton; its status adds
`hydration`); the hydration map flushes the destination itself (given the flush when opened).

**In place** (`in_place`, when both sides are image files and the destination a qcow2 without a
backing file of its own): the destination's storage daemon has the source chain as its runtime
backing (daemons.storage, never written to the image's header). Then every request goes to the
destination as to any disk: qcow2 reads what it does not hold yet from the source and fills the
rest of a cluster a write touches from it (no zeros ever hide the source's data, since the
backing is there until every region is hydrated), and a change needs no commit. Hydrating a
region is an NBD_CMD_CACHE to the destination (copy-on-read in its daemon: the bytes go from the
source file to the destination file without crossing nbdkit), then the usual commit (flush, map
saved). The map only says which regions no longer need the source; once complete, the supervisor
drops the backing (tree.release_source).

The rare path in place: while the source fails, QEMU cannot fill the rest of a cluster a write
touches, and the write fails. It is then written around (`_write_around`): each partial cluster
at its ends whole, with what the destination holds of it, what the source still reads, and zeros
for the rest, which the map saves as **holes** before the write (datapath.evacuation.hydration); reads of
holes go to the source, a later change fills them (committed before its answer), hydration copies
them through nbdkit.

This module runs inside nbdkit's embedded interpreter: standard library and libnbd only.
"""

import collections
import errno
import logging
import threading
import time

from mirrorfs.datapath.sides import sideio
from mirrorfs.datapath.sides.copy import copy_range
from mirrorfs.datapath.evacuation.copyonread import CopyOnRead
from mirrorfs.datapath.errors import (DrainTimeout, RequestError, SideError, SideRefused)
from mirrorfs.datapath.evacuation.hydration import HydrationError, subtract
from mirrorfs.datapath.served import ServedDisk

log = logging.getLogger("mirrorfs")

# Source read failures kept for status, with their offsets (the count is exact, the list recent).
FAILED_READS_KEPT = 64


class Evacuee(ServedDisk):
    """The evacuation's served disk (datapath.served: the contract the service holds it to)."""

    mode = "evacuation"
    no_switch = ("with --switch-first the destination serves the disk from the start and the "
                 "source never had the writes made since; nothing to switch")

    def __init__(self, source, dest, hydration, state=None, granularity=64 * 1024, in_place=False,
                 copy_on_read=False, unit=0):
        if not dest.can_flush:
            raise ValueError("the destination cannot flush: hydration could never be made durable")
        if in_place and not dest.can_cache:
            raise ValueError("the destination cannot cache: it cannot hydrate in place")
        if hydration.flush is None:
            raise ValueError("the hydration map was opened without the destination's flush")
        # Capabilities: writes are the destination's alone; reads need both sides.
        super().__init__(source, dest, (dest,), granularity, state)
        self.in_place = in_place
        # In place: the destination image's allocation unit, what a write is widened to on the
        # rare path in place (0: none, such a write fails). It divides the range locks' unit.
        self.unit = unit if in_place and unit and granularity % unit == 0 else 0
        self.map = hydration
        self.source_read_errors = 0
        self.held_changes = 0           # changes kept as held ranges: the source could not be read
        self.written_around = 0         # in place: changes written around holes (the rare path)
        self.copy_on_read = CopyOnRead(self) if copy_on_read else None
        self.failed_reads = collections.deque(maxlen=FAILED_READS_KEPT)
        self.last_client_request = 0.0  # monotonic: the hydrator yields to recent client I/O
        self._ending = threading.Lock()

    def start(self):
        if self.copy_on_read is not None:
            self.copy_on_read.start()

    def stop(self):
        if self.copy_on_read is not None:
            self.copy_on_read.stop()
        super().stop()

    # Reads: each run of regions from the side that holds it.

    def _side(self, hydrated):
        return self.dest if hydrated else self.source

    def _runs(self, start, end):
        """[start, end) cut where the side that holds it changes: (offset, length, hydrated)."""
        if self.ended:
            return [(start, end - start, True)]
        if self.in_place:
            if not self.map.holes:
                return [(start, end - start, True)]
            return self.map.runs_in_place(start, end)
        return self.map.runs(start, end)

    def pread(self, buf, offset):
        self.last_client_request = time.monotonic()
        view = memoryview(buf)
        self.inflight.enter("read")
        try:
            for pos, length, hydrated in self._runs(offset, offset + len(view)):
                sideio.read(self._side(hydrated), view[pos - offset:pos - offset + length], pos,
                            self.max_request)
        except sideio.SideFailure as e:
            raise self._refused(e) from None
        finally:
            self.inflight.leave()
        if self.copy_on_read is not None and not self.ended:
            self.copy_on_read.offer(offset, view)

    def extents(self, count, offset, req_one):
        self.inflight.enter("extents")
        try:
            found = []
            for pos, length, hydrated in self._runs(offset, offset + count):
                found += sideio.extents(self._side(hydrated), length, pos, req_one)
                if req_one and found:
                    break
            return found
        except sideio.SideFailure as e:
            raise self._refused(e) from None
        finally:
            self.inflight.leave()

    def cache(self, count, offset):
        self.inflight.enter("cache")
        try:
            for pos, length, hydrated in self._runs(offset, offset + count):
                sideio.cache(self._side(hydrated), length, pos)
        except sideio.SideFailure as e:
            raise self._refused(e) from None
        finally:
            self.inflight.leave()

    def flush(self):
        self.last_client_request = time.monotonic()
        self.inflight.enter("flush")
        try:
            sideio.flush(self.dest)
        except sideio.SideFailure as e:
            raise self._refused(e) from None
        finally:
            self.inflight.leave()

    def _refused(self, e, cmd=None):
        """A client's request failed with `e`: count it, and return the RequestError the client
        gets. The one place a request's failure is converted, and its errno decided: a side's
        failure (sideio.SideFailure) gives the side's errno, counted against the side that
        failed (a source read with its offset: that data exists nowhere else; in place, a read
        of a region not hydrated is the source's, which the destination's daemon read from its
        backing); a hydration map that could not be saved (HydrationError: a change's commit,
        its flush or its save; or the holes saved before a write around) gives EIO, counted
        against the destination."""
        if isinstance(e, HydrationError):
            self.stats[self.dest.name].failed("flush", cmd.offset, cmd.length, e)
            return RequestError(errno.EIO, str(e))
        side = e.side
        if side is self.dest and self._through_backing(e):
            side = self.source
        self.stats[side.name].failed(e.op, e.offset, e.length, e.cause)
        if side is self.source:
            self.source_read_errors += 1
            self.failed_reads.append({"offset": e.offset, "length": e.length,
                                      "errno": errno.errorcode.get(e.errno, str(e.errno)),
                                      "time": time.time()})
        return RequestError(e.errno, str(e))

    def _through_backing(self, e):
        """Whether the destination's failure `e` is a read it served from its runtime backing (in
        place): a read, extents or cache touching a region not hydrated, and not a full
        destination (a cache writes what it reads)."""
        if not self.in_place or self.ended or e.op not in ("read", "extents", "cache") or \
                e.errno in (errno.ENOSPC, errno.EDQUOT):
            return False
        return any(not self.map.hydrated(r)
                   for r in self.map.regions(e.offset, e.offset + max(e.length, 1)))

    # Changes (pwrite, zero, trim: ServedDisk's, one command each): the destination alone, after
    # the regions they touch are complete there.

    def _change(self, cmd):
        self.last_client_request = time.monotonic()
        try:
            if self.in_place and not self.ended:
                self._change_in_place(cmd)
            else:
                self._change_hydrating(cmd)
        except (sideio.SideFailure, HydrationError) as e:
            raise self._refused(e, cmd) from None

    def _change_hydrating(self, cmd):
        """A change through nbdkit (or once hydrated): the regions it touches completed on the
        destination first, the change, then the regions committed before the answer. Raises
        SideFailure or HydrationError."""
        offset, end = cmd.offset, cmd.offset + cmd.length
        todo = [] if self.in_place else [r for r in self.map.regions(offset, end)
                                         if not self.map.hydrated(r)]
        if not todo:
            token = self.inflight.enter_range(cmd.op, offset, end)
            try:
                sideio.run(self.dest, cmd, self.max_request)
            finally:
                self.inflight.leave(token)
            return
        # The whole of every region touched is locked: its copy and this change must not
        # interleave with another change or with the hydrator.
        start = min(offset, self.map.span(todo[0])[0])
        token = self.inflight.enter_range(cmd.op, start, max(end, self.map.span(todo[-1])[1]))
        held = {}                       # region -> the change's range, kept as held
        try:
            for r in todo:
                if not self._prepare(r, offset, end):
                    lo, hi = self.map.span(r)
                    held[r] = (max(lo, offset), min(hi, end))
            sideio.run(self.dest, cmd, self.max_request)
            for r, (a, b) in held.items():
                self.map.mark_held(r, a, b)
            complete = [r for r in todo if r not in held]
            self.map.mark_copied(complete)
        finally:
            self.inflight.leave(token)
        if held:
            self.held_changes += 1
        self.map.commit(complete, held)

    # In place: every change to the destination, whose daemon fills the rest of a cluster it
    # touches from the source (its runtime backing). The rare path: when the source cannot be read
    # for that, the write is widened to whole allocation units around the unreadable bytes, which
    # the map keeps as holes (read from the source).

    def _change_in_place(self, cmd):
        """Raises SideFailure or HydrationError."""
        offset, end = cmd.offset, cmd.offset + cmd.length
        token = self.inflight.enter_range(cmd.op, offset, end)
        filled = {}
        try:
            try:
                sideio.run(self.dest, cmd, self.max_request)
            except sideio.SideFailure as e:
                if not self._may_write_around(e, cmd):
                    raise
                self._write_around(e, cmd)
            if cmd.op != "trim":        # trimmed bytes are anyone's: the holes may stay
                for r in self.map.holes_in(offset, end):
                    lo, hi = self.map.span(r)
                    filled[r] = (max(lo, offset), min(hi, end))
                    self.map.mark_filled(r, *filled[r])
        finally:
            self.inflight.leave(token)
        if filled:
            self.map.commit((), filled=filled)

    def _may_write_around(self, e, cmd):
        """Whether the destination's failure `e` of a change in place may be the source's: a
        write or zero, not a full destination, into part of an allocation unit of a region not
        hydrated (the daemon then reads the rest of the unit from the source)."""
        u = self.unit
        offset, end = cmd.offset, cmd.offset + cmd.length
        if not u or e.side is not self.dest or cmd.op not in ("write", "zero") or \
                e.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOTSUP):
            return False
        if not offset % u and (not end % u or end == self.size):
            return False                # whole units: nothing was read from the source
        return any(not self.map.hydrated(r) for r in self.map.regions(offset, end))

    def _write_around(self, failed, cmd):
        """The rare path in place: the change `cmd` (a write, or zeros) failed with `failed`:
        the destination's daemon could not read the rest of a unit it touches from the source.
        Each partial unit at its ends is written whole instead: what the destination holds of it
        (qemu:allocation-depth 1) read from there, what the source does read from the source
        (once: QEMU's server drops the connection on a failed read, and sending it again would
        only cost the client RESEND_EVERY), and where the source fails, zeros, saved as holes
        *before* anything is written. The whole units between go as the change itself. Called
        under the change's range lock (whole units: the lock's unit is a multiple). Raises
        SideFailure (`failed` when the destination cannot say who holds a unit) or
        HydrationError."""
        u = self.unit
        offset, end, fua = cmd.offset, cmd.offset + cmd.length, cmd.fua
        data = cmd.buf if cmd.op == "write" else None
        head, tail = offset - offset % u, (end - 1) - (end - 1) % u
        edges = [head] if offset % u or (end < head + u and end != self.size) else []
        if tail != head and end % u and end != self.size:
            edges.append(tail)
        pieces, holes = [], {}
        for lo in edges:
            hi = min(lo + u, self.size)
            buf = bytearray(hi - lo)
            for a, b, depth in self._depths(lo, hi, failed):
                if a >= b or (offset <= a and b <= end) or depth == 0:
                    continue            # the change's own bytes, or zeros in every layer
                view = memoryview(buf)[a - lo:b - lo]
                if depth == 1:
                    sideio.read(self.dest, view, a, self.max_request)
                    continue
                if depth is not None:
                    try:
                        sideio.read_once(self.source, view, a, self.max_request)
                        continue
                    except sideio.SideFailure as e:
                        if e.side is not self.source:
                            raise
                        self.stats[self.source.name].failed("copy", e.offset, e.length, e.cause)
                for gap in subtract(a, b, ((offset, end),)):
                    for r in self.map.regions(*gap):
                        rlo, rhi = self.map.span(r)
                        holes.setdefault(r, []).append((max(rlo, gap[0]), min(rhi, gap[1])))
            a, b = max(lo, offset), min(hi, end)
            if data is not None:
                buf[a - lo:b - lo] = memoryview(data)[a - offset:b - offset]
            else:
                buf[a - lo:b - lo] = bytes(b - a)
            pieces.append((lo, buf))
        if holes:
            self.map.add_holes(holes)
        for lo, buf in pieces:
            sideio.write(self.dest, buf, lo, fua, self.max_request)
        inner_lo = head + u if head in edges else head
        inner_hi = tail if tail in edges and tail != head else min(end, self.size)
        if inner_lo < inner_hi:
            if data is not None:
                sideio.write(self.dest, memoryview(data)[inner_lo - offset:inner_hi - offset],
                             inner_lo, fua, self.max_request)
            else:
                sideio.zero(self.dest, inner_hi - inner_lo, inner_lo, True, fua)
        self.written_around += 1
        if holes:
            log.warning("destination: a change at %d length %d written around %d bytes the "
                        "source cannot be read for (kept as holes)", offset, end - offset,
                        sum(b - a for spans in holes.values() for a, b in spans))

    def _depths(self, lo, hi, failed):
        """[(start, end, depth)] over the allocation unit [lo, hi) from the destination: 1 its
        own, 2 or more the source's, 0 no layer's. One (lo, hi, None) when the destination
        answers the question with an error: QEMU asks the layers from the top down and stops at
        the first that holds the bytes, so an error means the destination's own image does not
        hold the unit (a unit is all or nothing) and the source failed the question. Anything
        else (no answer, no such context) raises `failed`: nothing is known, nothing is written."""
        try:
            found = self.dest.allocation_depth(hi - lo, lo)
        except SideRefused as e:
            if e.errno in (errno.ENOTSUP, errno.EINVAL):
                raise failed from None
            return [(lo, hi, None)]
        except SideError:
            raise failed from None
        return [(max(lo, a), min(hi, a + n), d) for a, n, d in found]

    def _prepare(self, r, start, end):
        """Before a change to [start, end): the rest of region `r` on the destination, unless
        the change covers it (with what the destination holds of it already: hydrated, copied and
        not saved, or held ranges). Returns True if the region will be complete on the
        destination after the change, False if the source could not be read for it: then the
        change goes alone and its range is held (the rare path). Raises SideFailure for the
        destination's failures."""
        if self.map.hydrated(r) or self.map.is_copied(r):
            return True
        if not self.map.missing(r, start, end):
            return True
        try:
            self.copy_region(r)
        except sideio.SideFailure as e:
            if e.side is not self.source:
                raise
            # Counted (and logged, at most once a second); the change goes alone, held.
            self.stats[self.source.name].failed("copy", e.offset, e.length, e.cause)
            return False
        return True

    def copy_region(self, r):
        """Copy region `r` from the source to the destination. Callers hold its range lock.
        Raises SideFailure."""
        return self.copy_range(*self.map.span(r))

    def copy_range(self, lo, hi):
        """Copy the regions [lo, hi) (region-aligned) from the source to the destination, and
        remember them as copied. Of a region with held ranges, only the rest is copied. Callers
        hold their range lock. Raises SideFailure."""
        regions = self.map.regions(lo, hi)
        if self.in_place:
            try:
                sideio.cache(self.dest, hi - lo, lo)
            except sideio.SideFailure as e:
                if self._through_backing(e):    # the source's failure: the hydrator says so
                    raise sideio.SideFailure(self.source, e.op, e.offset, e.length,
                                             e.cause) from None
                raise
            read, zeroed = hi - lo, 0
            # Holes (the rare path in place) are in units the destination holds, which a cache
            # leaves alone: copied from the source through here.
            for r in regions:
                for a, b in self.map.holes_to_copy(r):
                    done = copy_range(self.source, self.dest, a, b, resend=True)
                    read, zeroed = read + done.read, zeroed + done.zeroed
        elif any(self.map.on_destination(r) for r in regions):
            read = zeroed = 0
            for r in regions:
                for a, b in self.map.missing(r):
                    done = copy_range(self.source, self.dest, a, b, resend=True)
                    read, zeroed = read + done.read, zeroed + done.zeroed
        else:
            read, zeroed, _ = copy_range(self.source, self.dest, lo, hi, resend=True)
        self.map.mark_copied(regions)
        return read, zeroed

    # The end: once every region is hydrated, the source is let go.

    def finish(self, timeout=10.0):
        """Called by the hydrator once the map is complete: record the end (the destination
        alone, `switched`) in the state with nothing in flight, then release the source. Reads
        of the source still in flight drain first. Returns True if this call ended it."""
        with self._ending:
            if self.ended:
                return False
            self.inflight.pause(timeout)
            try:
                sideio.flush(self.dest)
                if self.state is not None:
                    self.state.record(end="switched")
                self.ended = "switched"
            finally:
                self.inflight.resume()
        self.source.retire()
        log.info("hydrated: the destination holds the whole disk; source released")
        return True

    def quiesce(self, timeout=10.0):
        """Before the process stops: hold new requests for good, drain, flush the destination."""
        if not self._ending.acquire(timeout=timeout):
            raise DrainTimeout(f"the end still runs after {timeout}s")
        self.inflight.pause(timeout)
        try:
            sideio.flush(self.dest)
        except sideio.SideFailure as e:
            log.error("destination: flush before stopping failed: %s", e)

    def reads_from(self):
        if self.ended:
            return "destination"
        return "destination (the source as its backing)" if self.in_place else \
            "destination and source"

    def _mode_status(self):
        held = self.map.held
        return {
            "hydration": {"region_size": self.map.region_size, "regions": self.map.count,
                          "hydrated_regions": self.map.hydrated_count,
                          "bytes_hydrated": self.map.hydrated_bytes(), "bytes_total": self.size,
                          "complete": self.map.complete, "commits": self.map.commits,
                          "bytes_held": self.map.held_bytes(), "held_regions": len(held),
                          "held_changes": self.held_changes,
                          "bytes_in_holes": self.map.hole_bytes(), "hole_regions": len(self.map.holes),
                          "written_around": self.written_around,
                          "copy_on_read": (self.copy_on_read.status()
                                           if self.copy_on_read is not None else None),
                          "in_place": self.in_place,
                          "source_read_errors": self.source_read_errors,
                          "failed_reads": list(self.failed_reads)},
        }
