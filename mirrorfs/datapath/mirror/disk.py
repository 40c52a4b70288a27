"""The served disk: what happens to each request. Read this file to know what happens to a write.

- read, extents, cache → the read side (the source until the switch).
- write, zero, trim → every write side (source and destination while mirroring), issued to both at
  once; the client's request completes only when both have answered. Overlapping changes are ordered
  by `InFlight` so both sides apply them in the same order.
- flush → every write side, at once. FUA is passed through where every side supports it, otherwise
  emulated with a flush.
- A failure on any side fails the client's request with that side's errno (the source's first), and is
  counted and logged with the side, the offset and the length; under the degrade policy a
  destination's failure is acknowledged and its regions marked to copy again instead.
- A fast zero that only one side refuses is completed on that side the slow way, so the sides never
  differ; if every side refuses, the client gets ENOTSUP, as the protocol intends.
- The switch (`switch`, `read_from` for a group's net) holds new requests, waits for those in
  flight to drain, changes sides and lets the held requests go.
- With --lag (datapath.mirror.lag): a write, zero or trim runs on the source under its range lock and
  write intent, is queued for the destination, and is answered once the lag has room for it (at
  most SIZE bytes acknowledged that the destination lacks) or the destination has it. A flush is
  answered by the source; the destination is flushed behind the lag. The switch drains the lag
  first (`_change_lagged`, `switch`, `quiesce`).

Each request becomes one command (mirrorfs.datapath.sides.commands: `Write(buf, offset, fua)`, ...) that
every side's backend runs with its verbs (`start` / `run`); this module never sees a connection.

This module runs inside nbdkit's embedded interpreter: standard library only (the sides are backends).
"""

import errno
import itertools
import logging
import threading
import time

from mirrorfs.datapath.sides.backend import describe, wait_all
from mirrorfs.datapath.sides import resend
from mirrorfs.datapath.sides.resend import MAX_EFFECT
from mirrorfs.datapath.sides.commands import FLUSH, Read, Zero
from mirrorfs.datapath.mirror import compare
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.errors import (DrainTimeout, RequestError, SideError, SideUnreachable,
                                      SwitchRefused)
from mirrorfs.datapath.options import DEFAULT_REGION, LOCK_GRANULARITY
from mirrorfs.common.sizes import human_size
from mirrorfs.datapath.mirror.lag import Lag
from mirrorfs.datapath.served import ServedDisk

log = logging.getLogger("mirrorfs")

# Writes larger than this may not fit the socket buffer at once; both sides are then polled together.
SEQUENTIAL_WAIT_MAX = 128 * 1024


class Disk(ServedDisk):
    """The mirror's served disk (datapath.served: the contract the service holds it to)."""

    mode = "mirror"

    def __init__(self, source, dest=None, dirty=None, policy="fail", granularity=LOCK_GRANULARITY,
                 net=False, lag=0):
        dirty = dirty if dirty is not None else DirtyMap(source.size, DEFAULT_REGION)
        # Every side this disk may write, now or after a switch (both: the one that serves after
        # it is either); capabilities are what all can do (datapath.served).
        super().__init__(source, dest, (source, dest) if dest is not None else (source,),
                         granularity, dirty.state)
        self.reader = source            # the authoritative side: reads, and its errors fail requests
        if net:         # a group's safety net, restarted: the destination reads, both are written
            self.reader, self.writers = dest, (dest, source)
        self.dirty = dirty
        self.policy = policy            # a destination failure: "fail" the request, or "degrade"
        self._turn = itertools.count()
        self.switches = []
        self._switching = threading.Lock()
        # The largest request every side accepts (max_request: the maximum clients are told).
        # nbdkit 1.32 does not enforce it on clients that did not negotiate block sizes; larger
        # requests are split (see _change), and one comparison is all they cost a
        # request of ordinary size.
        self.max_effect = max(MAX_EFFECT, self.max_request)
        # --lag: changes reach the destination in the background (datapath.mirror.lag); its threads are
        # started with the data path's (after nbdkit's fork).
        self.lag = (Lag(dest, lag, granularity, self.dirty, self.stats[dest.name], policy)
                    if lag and dest is not None else None)

    def start(self):
        if self.lag is not None:
            self.lag.start()

    def watched_sides(self):
        """The mirror sides: written, not read. A handle of the authoritative side is lent for
        the whole request, so it looks as old as the slowest side; and a slow source is what the
        client would wait for without mirrorfs too."""
        return [side for side in self.writers if side is not self.reader]

    def compare(self, seconds=None):
        """The sides compared byte by byte under range locks (datapath.mirror.compare: serve's
        pivot with --copy none); None once the mirror ended, or with one side."""
        if self.dest is None or self.ended:
            return None
        return compare.compare(self, seconds)

    # Switching sides, without disconnecting clients.

    def switch(self, to, end, timeout=10.0, commit=None):
        """End the mirror: serve side `to` ("source" or "destination") alone, without disconnecting
        clients, and record `end` ("switched" or "cancelled") in the state.

        One switch at a time, and only one ever: a second one is refused (SwitchRefused) whether it
        comes during the first or after it, so a pivot and a cancel cannot both win. New requests
        wait, those in flight (the copier's too) drain; then, while nothing is in flight:
        - to the destination: refused unless the sides are synchronized, and unless the destination
          answers on the connections it will serve with (a dead destination keeps the source
          serving);
        - at the commit of a safety net, the source (kept as the disk at this instant) is flushed,
          and `retired_complete` says whether it holds every change (_kept_whole; else None);
        - `commit(retired_complete)`, when given, is called: the supervisor records the end where
          the host looks (a named disk's record, mirrorfs.host.registry; a group's record, with
          its snapshot). It is the switch's commit point for the host: an exception from it
          refuses the switch, nothing changed here;
        - the end is saved in the state *before* the sides change, so a crash at any point
          restarts on the right side; the sides change, and the held requests go on.
        The side no longer used is flushed and disconnected after requests resume. Returns the
        stall in seconds: how long new requests were held."""
        side = {b.name: b for b in self.sides}.get(to)
        if side is None:
            raise ValueError(f"unknown side {to!r}")
        if not self._switching.acquire(blocking=False):
            raise SwitchRefused("another switch is in progress")
        try:
            if self.ended:
                raise SwitchRefused(f"the mirror already ended ({self.ended})")
            lag = self.lag if self.reader is self.source else None
            ended = False
            try:
                if lag is not None and side is self.dest:
                    # Drained while the clients go on (synchronous if it does not shrink): the
                    # hold below then finds the lag empty, as today's finds nothing in flight.
                    try:
                        lag.converge(timeout)
                    except DrainTimeout as e:
                        raise SwitchRefused(f"{e}; still mirroring") from None
                started = time.monotonic()
                self.inflight.pause(timeout)
                try:
                    if lag is not None:
                        lag.drain(timeout)
                    if side is self.dest and self.reader is not self.dest:
                        if not self.dirty.synchronized():
                            raise SwitchRefused(
                                f"{human_size(self.dirty.dirty_bytes())} may still differ "
                                "between the sides; wait until synchronized")
                        try:
                            side.check(timeout)
                        except SideError as e:
                            raise SwitchRefused(f"the destination does not answer ({e}); still "
                                                "serving the source") from None
                    self.retired_complete = None
                    if side is self.dest and self.reader is side:
                        self.retired_complete = self._kept_whole(self.source, timeout)
                    if commit is not None:
                        commit(self.retired_complete)
                    if self.dirty.state is not None:
                        self.dirty.state.record(end=end)
                    if lag is not None:
                        lag.stop()
                    ended = True
                    self.ended = end
                    retired = [b for b in self.sides if b is not side]
                    self.reader, self.writers = side, (side,)
                finally:
                    self.inflight.resume()
            finally:
                if lag is not None and not ended:
                    lag.release()           # refused: the mirror lags again
        finally:
            self._switching.release()
        stall = time.monotonic() - started
        self.switches.append(stall)
        for b in retired:
            b.retire()
            log.info("%s released", b.name)
        return stall

    def _kept_whole(self, source, timeout):
        """The commit of a safety net (reads from the destination, changes to both) keeps the
        retired source as the disk at this instant: a group's crash-consistent snapshot. True
        only if it holds every change: none of its writes failed (degraded, left to copy again)
        and it flushed them, on every connection, within `timeout`. Flushed here, inside the
        hold, not after it (Backend.retire): a source daemon killed after the hold lost the
        changes it had not yet flushed (qcow2's metadata is in its memory), and the record
        already called the source consistent."""
        if not self.dirty.synchronized():
            return False
        try:
            source.check(timeout)
        except SideError as e:
            log.error("%s: not flushed at the commit, kept incomplete: %s", source.name, describe(e))
            return False
        return True

    def read_from(self, to, timeout=10.0, commit=None):
        """A group's safety net (control.group): read from side `to` from now on, and go on
        writing both sides, `to` first (its failures fail the client's request; the other's are
        degraded: recorded, the region marked to copy again). To the destination after a pivot; to
        the source again at a revert, which needs the sides synchronized (nothing to copy: every
        change since the pivot reached both). The same hold as `switch`: new requests wait, those
        in flight drain, `commit()` runs, the state records the reader, then the sides change."""
        side = {b.name: b for b in self.sides}.get(to)
        if side is None or self.dest is None:
            raise ValueError(f"unknown side {to!r}")
        if self.lag is not None:
            # The net writes both sides synchronously, the lag writes one in the background: a
            # disk has one or the other (a group refuses --lag).
            raise SwitchRefused("a disk with --lag has no safety net")
        if not self._switching.acquire(blocking=False):
            raise SwitchRefused("another switch is in progress")
        try:
            if self.ended:
                raise SwitchRefused(f"the mirror already ended ({self.ended})")
            started = time.monotonic()
            self.inflight.pause(timeout)
            try:
                if side is self.reader:
                    raise SwitchRefused(f"reads come from the {to} already")
                if not self.dirty.synchronized():
                    raise SwitchRefused(
                        f"{human_size(self.dirty.dirty_bytes())} may still differ between the "
                        f"sides; the {to} does not hold every change")
                try:
                    side.check(timeout)
                except SideError as e:
                    raise SwitchRefused(f"the {to} does not answer ({e})") from None
                if commit is not None:
                    commit(None)
                if self.dirty.state is not None:
                    self.dirty.state.record(reader=to)
                other = self.source if side is self.dest else self.dest
                self.reader, self.writers = side, (side, other)
            finally:
                self.inflight.resume()
        finally:
            self._switching.release()
        stall = time.monotonic() - started
        self.switches.append(stall)
        return stall

    def quiesce(self, timeout=10.0):
        """Before the process stops: hold every new request for good, let those in flight finish
        on every side, flush every side. Afterwards nothing is between the sides. Waits for a
        switch in progress to end first."""
        if not self._switching.acquire(timeout=timeout):
            raise DrainTimeout(f"a switch still runs after {timeout}s")
        self.inflight.pause(timeout)
        if self.lag is not None and self.reader is self.source and not self.ended:
            # A graceful stop leaves the sides equal: what the destination lacks reaches it now
            # (kill -9 instead leaves it to the dirty map).
            self.lag.drain(timeout)
            self.lag.stop()
        for b in set(self.writers):
            try:
                b.flush()
            except Exception as e:      # a dead side: nothing more can be done for it here
                log.error("%s: flush before stopping failed: %s", b.name, describe(e))

    def reads_from(self):
        return self.reader.name

    def _mode_status(self):
        return {
            "switch_stalls_ms": [round(s * 1000, 3) for s in self.switches],
            "policy": self.policy,
            "net": self.reader is self.dest and self.dest is not None and self.ended is None,
            "synchronized": self.dirty.synchronized(),
            "dirty_bytes": self.dirty.dirty_bytes(),
            "lag": self.lag.status() if self.lag is not None else None,
        }

    # Reads.

    def pread(self, buf, offset):
        if len(buf) > self.max_request:
            return self._pread_in_pieces(buf, offset)
        self.inflight.enter("read", len(buf))
        try:
            side = self.reader
            try:
                side.pread(buf, offset)
            except SideUnreachable as e:
                raise RequestError(errno.EIO, str(e)) from None
            except SideError as e:
                if not (e.lost and self._resend(side, Read(buf, offset), e)):
                    self.stats[side.name].failed("read", offset, len(buf), e)
                    raise RequestError(e.errno, describe(e)) from None
        finally:
            self.inflight.leave()

    def extents(self, count, offset, req_one):
        self.inflight.enter("extents")
        try:
            return self.reader.extents(count, offset, req_one)
        except SideError as e:
            raise RequestError(e.errno, describe(e)) from None
        finally:
            self.inflight.leave()

    def cache(self, count, offset):
        self.inflight.enter("cache")
        try:
            self.reader.cache(count, offset)
        except SideError as e:
            raise RequestError(e.errno, describe(e)) from None
        finally:
            self.inflight.leave()

    # Changes (pwrite, zero, trim: ServedDisk's, one command each): to every write side at once,
    # ordered against overlapping changes.

    def flush(self):
        self.inflight.enter("flush")
        try:
            if self.lag_in_force():
                # The client needs its writes on stable storage where it reads them: the source.
                # The destination is flushed once the lag queued so far reached it.
                failures = self._on_every_side(FLUSH, sides=(self.reader,))
                if failures:
                    self._settle(FLUSH, failures)
                self.lag.flush_requested()
                return
            failures = self._on_every_side(FLUSH)
            if failures:
                self._settle(FLUSH, failures)
        finally:
            self.inflight.leave()

    def lag_in_force(self):
        """Is the lag in force (--lag, mirroring, source authoritative)? Asked under a range
        lock or an `enter`: a switch changes the sides only while nothing is in flight."""
        lag = self.lag
        return lag is not None and not self.ended and self.reader is self.source

    def _change(self, cmd):
        """Apply one change to every write side, holding its range lock and its write intent. A
        change larger than the sides accept (max_request; max_effect for zero and trim) is sent in
        pieces they accept, under that one lock and intent: no other change gets in between its
        pieces on either side, and the client's request completes once, after the last. After the
        read side failed a piece the rest is not sent: the request fails anyway, and the region
        is marked as possibly different."""
        step = self.max_request if cmd.op == "write" else self.max_effect
        token = self.inflight.enter_range(cmd.op, cmd.offset, cmd.offset + cmd.length)
        lagged = self.lag_in_force()
        if cmd.length <= step and lagged and self.lag.room_for(cmd.length):
            return self._change_lagged(cmd, token)
        try:
            if lagged:
                # Earlier changes to these clusters reach the destination first.
                self.lag.wait_range(*token)
            intent = self.dirty.before_change(cmd.offset, cmd.offset + cmd.length)
            failures = []
            try:
                for piece in cmd.pieces(step) if cmd.length > step else (cmd,):
                    failed = self._on_every_side(piece)
                    if failed and piece.op == "zero" and piece.fast:
                        failed = self._finish_fast_zero(piece, failed)
                    if failed:
                        failed = self._resend_lost(failed, piece)
                    failures += failed
                    if any(side is self.reader for side, _ in failed):
                        break
            finally:
                # Anything short of success on every side may leave the sides different.
                self.dirty.after_change(intent, both_sides=not failures)
            if failures:
                self._settle(cmd, failures)
        finally:
            self.inflight.leave(token)

    def _change_lagged(self, cmd, token):
        """`_change` with a lag (datapath.mirror.lag): the source runs the change under its range lock
        and intent; the destination gets a copy in the background. The client is answered once
        the lag has room for it, or once the destination has it."""
        ranged = True
        try:
            intent = self.dirty.before_change(cmd.offset, cmd.offset + cmd.length)
            source = self.reader
            failures = self._on_every_side(cmd, sides=(source,))
            if failures and failures[0][1].lost and self._resend(source, cmd, failures[0][1]):
                failures = []
            if failures:
                if cmd.op == "zero" and cmd.fast and failures[0][1].errno == errno.ENOTSUP:
                    self.dirty.after_change(intent, both_sides=True)    # nothing changed
                    raise RequestError(errno.ENOTSUP, "fast zero not supported")
                # The destination has not got it; the source may have part of it.
                self.dirty.after_change(intent, both_sides=False)
                self._settle(cmd, failures)
                return
            change = self.lag.add(cmd, intent)
            if change.acked:
                return          # the lag had room: answered now (the range lock ends below)
            # Other changes to these clusters may start on the source; on the destination the
            # lag keeps their order.
            self.inflight.release_range(token)
            ranged = False
            error = self.lag.admit(change)
            if error is not None and self.policy == "fail":
                raise RequestError(error.errno, f"{self.dest.name} {cmd.op}: {describe(error)}")
        finally:
            if ranged:
                self.inflight.leave(token)
            else:
                self.inflight.leave()

    def _resend_lost(self, failures, cmd):
        """The failures left once a change the authoritative side lost with its connection was
        sent again on a new one (see RESEND_FOR). Sending a write, zero or trim twice is harmless:
        the change still holds its range lock, so nothing else touched those bytes meanwhile."""
        for side, e in failures:
            if side is self.reader and e.lost and self._resend(side, cmd, e):
                return [(s, x) for s, x in failures if s is not side]
        return failures

    def _resend(self, side, cmd, lost):
        """Run `cmd` on `side` again, on a new connection, after its first try failed with `lost`
        (a SideError whose connection was lost): True once it succeeded, False if the side refused
        it, lost a fresh connection too, or RESEND_FOR passed (the one resend loop,
        datapath.sides.resend)."""
        try:
            resend.again(side, lambda: side.run(cmd), cmd.op, lost=lost)
        except SideError:
            return False
        return True

    # Reads larger than the sides accept (max_request): split into pieces they accept (a change
    # too large is split in `_change`).

    def _pread_in_pieces(self, buf, offset):
        for piece in Read(buf, offset).pieces(self.max_request):
            self.pread(piece.buf, piece.offset)

    def _settle(self, cmd, failures):
        """Decide what the client hears when some side failed `cmd`. The authoritative side's
        failure always fails the request. A mirror side's failure fails it under the "fail" policy;
        under "degrade" the request succeeds: the region is already marked to be copied again
        (durably, before this answer), so nothing diverges silently."""
        for side, e in failures:
            self.stats[side.name].failed(cmd.op, cmd.offset, cmd.length, e)
        primary = [(side, e) for side, e in failures if side is self.reader]
        if cmd.op == "flush" and not primary:
            # A mirror that failed a flush may have lost writes it acknowledged: copy them again.
            self.dirty.mark_all()
        # Under a group's safety net (the destination reads) the source is the mirror, and its
        # failures are always degraded: the destination holds the write, and the source is only
        # what a revert would go back to (refused while they differ).
        net = self.reader is self.dest and self.dest is not None
        if primary or (self.policy == "fail" and not net):
            side, e = (primary or failures)[0]
            raise RequestError(e.errno, f"{side.name} {cmd.op}: {describe(e)}")
        for side, _ in failures:
            self.stats[side.name].degrade()

    def _finish_fast_zero(self, cmd, failures):
        """A fast zero that one side refused would leave the sides different. The side that refused
        zeroes the slow way, so both hold zeros; the client gets success (if every side refused, the
        client gets ENOTSUP and writes zeros itself, as the protocol intends). Returns the failures
        that remain."""
        refused = [side for side, e in failures if e.errno == errno.ENOTSUP]
        if len(refused) == len(self.writers):
            raise RequestError(errno.ENOTSUP, "fast zero not supported")
        others = [(side, e) for side, e in failures if side not in refused]
        return others + self._on_every_side(Zero(cmd.length, cmd.offset), sides=refused)

    def _on_every_side(self, cmd, sides=None):
        """Run one command on each side at once and wait for all. Returns the failures, as
        (side, SideError) pairs: a side that cannot even be reached is one of them.

        The other sides' commands are started (aio) and the last side's runs synchronously, so the
        sides work in parallel at the cost of few libnbd calls: each call releases and retakes the
        GIL, which is what limits small requests. A small command is on the wire once started, so
        waiting for the sides one after the other costs nothing; a large write may not be, so those
        are driven together by one poll loop (backend.wait_all).
        """
        sides = self.writers if sides is None else sides
        failures = []
        if cmd.op == "write" and cmd.length > SEQUENTIAL_WAIT_MAX:
            started, pendings = [], []
            for side in sides:
                try:
                    pendings.append(side.start(cmd))
                    started.append(side)
                except SideError as e:
                    failures.append((side, e))
            for side, result in zip(started, wait_all(pendings)):
                if result is not None:
                    failures.append((side, result))
            return failures
        # A connection of each side, taken in the writers' order whatever the turn (see
        # NbdBackend.reserve: in another order, requests can deadlock on the bounded pools).
        reserved = []
        for side in sides:
            try:
                reserved.append((side, side.reserve()))
            except SideError as e:
                failures.append((side, e))
        if not reserved:
            return failures
        # Take turns at being the side that runs synchronously: its latency is measured exactly,
        # so each side's latency is sampled on every other request.
        if len(reserved) > 1 and next(self._turn) & 1:
            reserved.reverse()
        started = []
        for side, connection in reserved[:-1]:
            try:
                started.append((side, side.start(cmd, connection)))
            except SideError as e:
                failures.append((side, e))
        last, connection = reserved[-1]
        t0 = time.monotonic()
        try:
            last.run(cmd, connection)
        except SideError as e:
            failures.append((last, e))
        elapsed = time.monotonic() - t0
        stats = self.stats[last.name]
        stats.latencies.append(elapsed)
        stats.histogram.add(elapsed)
        for side, pending in started:
            try:
                pending.wait()
            except SideError as e:
                failures.append((side, e))
        return failures
