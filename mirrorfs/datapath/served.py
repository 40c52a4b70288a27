"""The served disk's contract: what nbdkit's callbacks and the data path's service
(datapath.nbdkit) ask of the disk they serve, whichever mode serves it. Both modes implement it:
the mirror's `Disk` (datapath.mirror.disk) and the evacuation's `Evacuee`
(datapath.evacuation.evacuee); the service picks one when it assembles the data path and never
asks again which it holds (tests/unit/test_served.py checks it).

    disk.size, disk.source, disk.dest        the sides (dest None: a mirror with one side)
    disk.capabilities                        what the client is told at connect (Capabilities)
    disk.max_request                         the largest request every side takes
    disk.inflight                            requests in flight: counted, range-locked, holdable
    disk.stats                               per-side counters (side name -> SideStats)
    disk.state, disk.ended                   the state journal (or None), the end it recorded
    disk.writers                             the sides a change goes to now
    disk.pread / pwrite / zero / trim / flush / cache / extents
                                             the client's requests; a failure is a RequestError
                                             with the errno the client gets
    disk.start()                             the disk's own threads, after nbdkit's fork
    disk.watched_sides()                     the sides whose overdue requests the watchdog cuts
    disk.switch(to, end, timeout, commit)    end the mirror on side `to` (SwitchRefused if not)
    disk.read_from(to, timeout, commit)      a group's safety net (SwitchRefused if not)
    disk.compare(seconds)                    the sides compared, or None where that means nothing
    disk.quiesce(timeout)                    before the process stops: hold, drain, flush
    disk.stop()                              the disk's threads stopped, its sides let go
    disk.status()                            the skeleton below, and the mode's own keys

**Capabilities are computed once**, from every side the disk may use, now or later: nbdkit tells a
client its capabilities once, at connect time, and the client keeps them across a switch or the
end of a hydration. A change needs every side it may be written to (`written`: both sides of a
mirror, whichever serves after the switch; the destination alone in an evacuation); a read-side
verb (extents, cache) needs every side a read may come from (both, in either mode); the block
sizes suit every side.

**The status skeleton** (the data path's `status`, read by the supervisor: control/, host/):
`mode`, `size`, `in_flight`, `paused`, `requests`, `request_bytes`, `reader` (where reads come
from, in words), `writers`, `sides` (each side's counters), `ended`, and `state` when there is
one. Each mode adds its own keys: the mirror its switch, copy and lag keys (`synchronized`,
`dirty_bytes`, `policy`, `net`, `lag`, `switch_stalls_ms`, at the top level, where the
supervisor has always read them), the evacuation its `hydration` section. The background copy's
status goes beside it, under its own key (datapath.background).

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

from dataclasses import dataclass

from mirrorfs.datapath.errors import SwitchRefused
from mirrorfs.datapath.inflight import InFlight
from mirrorfs.datapath.sides.commands import Trim, Write, Zero
from mirrorfs.datapath.sides.stats import SideStats

DEFAULT_MAX_REQUEST = 32 * 1024 * 1024  # when no side states a largest request
PREFERRED_AT_LEAST = 4096


@dataclass(frozen=True)
class Capabilities:
    """What a client is told at connect time (nbdkit's can_* callbacks and block_size)."""

    write: bool
    flush: bool
    fua: bool
    trim: bool
    zero: bool
    fast_zero: bool
    multi_conn: bool
    extents: bool
    cache: bool
    rotational: bool
    block_size: tuple               # (minimum, preferred, maximum)

    @classmethod
    def of(cls, written, read):
        """What every side in `written` (a change may go to it) and in `read` (a read may come
        from it) supports; block sizes that suit all of them."""
        every = tuple(dict.fromkeys(written + read))
        return cls(write=all(not b.read_only for b in written),
                   flush=all(b.can_flush for b in written),
                   fua=all(b.can_fua for b in written),
                   trim=all(b.can_trim for b in written),
                   zero=all(b.can_zero for b in written),
                   fast_zero=all(b.can_fast_zero for b in written),
                   multi_conn=all(b.multi_conn for b in written),
                   extents=all(b.can_extents for b in read),
                   cache=all(b.can_cache for b in read),
                   rotational=any(b.is_rotational for b in every),
                   block_size=block_size(every))


def block_size(sides):
    """(minimum, preferred, maximum) for a client of every one of `sides`: the largest minimum,
    the largest preferred (at least the minimum and a page, at most the maximum), the smallest
    maximum stated (DEFAULT_MAX_REQUEST if none states one)."""
    sizes = [b.block_size for b in sides]
    minimum = max(s[0] for s in sizes) or 1
    preferred = max(max(s[1] for s in sizes), minimum, PREFERRED_AT_LEAST)
    maximums = [s[2] for s in sizes if s[2]]
    maximum = min(maximums) if maximums else DEFAULT_MAX_REQUEST
    return minimum, min(preferred, maximum), maximum


class ServedDisk:
    """The contract (above) and what both modes share. A mode sets `mode`, calls this
    constructor with the sides a change may be written to, and implements the requests,
    `quiesce` and `_mode_status`; the rest has a default here."""

    mode = None                     # "mirror" or "evacuation": the status says which
    # Why this mode has no switch (switch, read_from): SwitchRefused with these words.
    no_switch = "this disk has no switch"
    # What the last switch found of the side it retired (mirror.disk.Disk._kept_whole): True when
    # it was flushed whole inside the hold; None when the switch did not look (or there was none).
    retired_complete = None

    def __init__(self, source, dest, written, granularity, state=None):
        self.size = source.size
        self.source, self.dest = source, dest
        self.sides = (source, dest) if dest is not None else (source,)
        self.capabilities = Capabilities.of(tuple(written), self.sides)
        self.max_request = self.capabilities.block_size[2]
        self.inflight = InFlight(granularity)
        self.stats = {b.name: SideStats(b.name) for b in self.sides}
        self.state = state
        self.ended = state.phase if state is not None and state.ended else None
        self.writers = tuple(written)

    # The requests (each mode's own).

    def pread(self, buf, offset):
        raise NotImplementedError

    # A change is one command (datapath.sides.commands), built here once from the client's call;
    # each mode's `_change` is where it goes (mirror/disk.py, evacuation/evacuee.py).

    def pwrite(self, buf, offset, fua):
        # The command holds the client's buffer itself: no copy per side.
        self._change(Write(buf, offset, fua))

    def zero(self, count, offset, may_trim, fua, fast):
        self._change(Zero(count, offset, may_trim, fua, fast))

    def trim(self, count, offset, fua):
        self._change(Trim(count, offset, fua))

    def _change(self, cmd):
        raise NotImplementedError

    def flush(self):
        raise NotImplementedError

    def cache(self, count, offset):
        raise NotImplementedError

    def extents(self, count, offset, req_one):
        raise NotImplementedError

    # Its lifetime.

    def start(self):
        """Start the disk's own threads (after nbdkit's fork, if it forks). None by default."""

    def watched_sides(self):
        """The sides whose requests the request watchdog cuts once overdue (--io-timeout). None
        by default: a slow side that serves is what the client would wait for without mirrorfs."""
        return ()

    def switch(self, to, end, timeout=10.0, commit=None):
        raise SwitchRefused(self.no_switch)

    def read_from(self, to, timeout=10.0, commit=None):
        raise SwitchRefused(self.no_switch)

    def compare(self, seconds=None):
        """(first differing offset or None, bytes compared) between the sides, or None when this
        disk has no two sides holding the same data to compare."""
        return None

    def quiesce(self, timeout=10.0):
        raise NotImplementedError

    def stop(self):
        """At the process's end: the sides written now let go (their connections closed)."""
        for side in set(self.writers):
            side.retire()

    # Its status.

    def reads_from(self):
        """Where reads come from, in words (status `reader`)."""
        raise NotImplementedError

    def status(self):
        status = {
            "mode": self.mode,
            "size": self.size,
            "in_flight": self.inflight.count,
            "paused": self.inflight.paused,     # new requests held: a switch or a stop drains
            "requests": dict(self.inflight.started),
            "request_bytes": dict(self.inflight.bytes),
            "reader": self.reads_from(),
            "writers": [b.name for b in self.writers],
            "sides": {b.name: {**self.stats[b.name].snapshot(), "timeouts": b.timeouts,
                               "available": b.available} for b in self.sides},
            "ended": self.ended,
        }
        if self.state is not None:
            status["state"] = {"directory": str(self.state.directory), "phase": self.state.phase}
        status.update(self._mode_status())
        return status

    def _mode_status(self):
        """The mode's own keys of the status."""
        raise NotImplementedError
