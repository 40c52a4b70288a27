"""The bounded lag (`--lag SIZE`): the destination receives the changes in the background, and the
client's write waits for the source alone, until SIZE bytes are acknowledged that the destination
lacks.

What a change does with a lag (Disk._change_lagged):
1. it takes its range lock (whole clusters) and its write intent, as a synchronous change does: the
   regions it touches are in the saved dirty map *before* the source is written, and stay there
   (`DirtyMap.active`) until the destination has it, so after kill -9 everything the destination
   may lack is in the map and a restart copies it;
2. the source runs it; a copy of it is queued here for the destination (`add`), and acknowledged
   there at once ("acked") if the lag has room for its bytes: most changes' whole stay here is
   that one lock round trip, and the client is answered;
3. otherwise the range lock is let go (other changes to those clusters may start on the source),
   and the client is answered in `admit` as soon as the lag has room for it, or once the
   destination has it: the acknowledged bytes the destination lacks (`bytes`) never exceed the
   limit.
A change that finds the lag full, or is larger than it, is not queued (`room_for`): it waits for
the queued changes of its range and goes to both sides at once, as without a lag. That is the
backpressure: the guest goes at the destination's pace only while the lag is full.

The destination gets the queue in order where it matters: each change waits for every earlier
change that touches one of its clusters (`_chains`, one FIFO per cluster), so two changes to one
cluster reach the destination in the order the source got them, and never run on it at once
(QEMU 7.2's qcow2 refcount race, DESIGN.md). Changes to other clusters run in parallel on WORKERS
threads. A write queued right behind a contiguous write that has not started yet is appended to it
(coalesced: one request to the destination instead of many, only ever when the destination is behind).

The hot path is counted in calls: Python calls, lock round trips and libnbd calls (each of which
releases and retakes the GIL) are what a small write costs on a CPU-bound machine, and the workers
run beside the clients on the same interpreter. So a change takes the lag's lock once when there is
room, a worker is woken only when one is idle and a waiter only when one watches, and a batch is
finished under one lock (docs/PERFORMANCE.md has the counts).

Whatever else changes the destination first waits for the queued changes of its range
(`wait_range`, under its range lock so nothing new is queued there meanwhile): the copier's
chunks, a change too large for the lag, every change while the mode is synchronous.

Modes: "lagging", or "synchronous" (every change waits for the destination, as without a lag):
- at a pivot (`converge`): the lag is drained before the switch's hold; once it does not shrink
  (a change found it full, or it did not shrink in CONVERGE_LOOK), the mode is synchronous until
  the switch (or until the switch is refused);
- with --on-dest-error fail, for SETTLE seconds after the destination failed a change: a change the
  destination failed after it was acknowledged can no longer fail its request; it is marked to copy
  again as under degrade, and the requests after it fail as a synchronous mirror's do.
A change the destination fails is counted and logged, its regions are marked to copy again (the
copier's resync), under both policies: the lag becomes the resync.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import collections
import errno
import logging
import threading
import time

from mirrorfs.datapath.sides.backend import describe
from mirrorfs.datapath.sides.commands import FLUSH, Trim, Write, Zero
from mirrorfs.datapath.errors import DrainTimeout, SideError, side_error
from mirrorfs.datapath.options import LAG_CONVERGE_MAX

log = logging.getLogger("mirrorfs")

# Threads that send queued changes to the destination, each a batch of up to BATCH at once on one
# connection (libnbd's aio, backend.run_each): up to WORKERS x BATCH changes in flight. A 2 ms
# destination needs about rate x latency of them (16 small writes in flight take 8,000/s; one at a
# time per thread, 12 threads, could not keep up with 4k writes at qd16). Few threads, few
# connections: some servers take few (qemu-nbd's default --shared is 1, the tests' 16; a
# connection over the limit hangs until its connect timeout), and a pivot's synchronous writes
# need theirs beside them.
WORKERS = 4
BATCH = 16
# ... and at most this many bytes a batch (one change at least): a batch holds its connection until
# its last change is done, and --io-timeout cuts a connection held longer than that.
BATCH_BYTES = 4 << 20
# A small change made ready while a worker has a batch out waits for that worker (it takes what
# is ready when its batch is done) rather than waking another, until a batch of them is ready: a
# wake-up is a thread switch, about what sending a 4 KiB write costs, and at one write at a time a
# worker woke for every write. A change of this size or more, or one a client waits for (not
# lagging), wakes an idle worker at once.
WAKE_BYTES = 64 << 10
# The largest write coalescing builds (the destinations' usual maximum request is 32 MiB).
COALESCE_MAX = 1 << 20
# With --on-dest-error fail: how long after a destination failure the mirror stays synchronous.
SETTLE = 2.0
# A pivot's drain: how often it looks whether the lag shrinks (the longest it may take in all is
# options.LAG_CONVERGE_MAX).
CONVERGE_LOOK = 0.25
# How often a waiter looks again without being woken (a change that finds the lag full counts a
# wait without waking anyone: the drain sees it within this).
POLL = 0.05

LAGGING, SYNCHRONOUS = "lagging", "synchronous"


class Change:
    """One client's change in the queue: acknowledged to the client, or waiting for the
    destination (`admit`)."""

    __slots__ = ("length", "intent", "acked", "done", "error")

    def __init__(self, length, intent):
        self.length, self.intent = length, intent
        self.acked = self.done = False
        self.error = None


class Entry:
    """One command for the destination: one change, or several coalesced writes."""

    __slots__ = ("seq", "cmd", "buf", "first", "last", "changes", "since", "started", "ready")

    def __init__(self, seq, cmd, buf, first, last, change):
        self.seq, self.cmd, self.buf = seq, cmd, buf
        self.first, self.last = first, last         # the clusters it covers, inclusive
        self.changes = [change]
        self.since = time.monotonic()
        self.started = self.ready = False


class Lag:
    def __init__(self, dest, limit, granularity, dirty, stats, policy):
        self.dest = dest
        self.limit = limit
        self.granularity = granularity
        self.dirty = dirty
        self.stats = stats              # the destination's SideStats
        self.policy = policy
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)    # workers wait here
        self._moved = threading.Condition(self._lock)   # clients, the copier and drains wait here
        self._chains = {}               # cluster -> [entries not finished, oldest first]
        self._ready = collections.deque()   # entries first on all their chains, not started (FIFO)
        self._pending = {}              # seq -> entry not finished, oldest first (dicts keep order)
        self._seq = 0
        self._tail = None               # the entry queued last, while not started
        # A client flushed: flush the destination once every change up to this seq reached it;
        # a flush asked for meanwhile waits for the one after (its own seq in `_flush_later`).
        self._flush_after = self._flush_later = None
        self.bytes = 0                  # acknowledged bytes the destination lacks: the lag
        self.peak = 0                   # the most it has been
        self.queued_bytes = 0           # every change queued, acknowledged or not
        self.sent = 0                   # bytes the destination got from the queue
        self.coalesced = 0              # changes appended to the entry before them
        self.waits = 0                  # changes that found the lag full (backpressure)
        self.failures = 0
        self.forced = False             # synchronous until the switch (converge)
        self._failed_at = -SETTLE       # monotonic time of the last destination failure
        self._stopped = False
        # The mode in one number, for the hot path (one comparison a change instead of three
        # property calls): lagging once time.monotonic() reaches it; infinite while forced or
        # stopped, the end of SETTLE after a failure under `fail` (`_set_mode`).
        self._lag_from = 0.0
        # Who sleeps on each condition: a change, or a finished entry, wakes them only if someone
        # does (a notify is a few Python calls under the lock, on every change and every entry).
        self._idle = 0                  # workers waiting for work
        self._sending = 0               # workers with a batch out
        self._watchers = 0              # clients, the copier and drains waiting for progress
        self._flush_due = threading.Event()     # the destination's flush is due (the flusher)
        self._threads = [threading.Thread(target=self._run, name=f"lag {i}", daemon=True)
                         for i in range(WORKERS)]
        self._threads.append(threading.Thread(target=self._flusher, name="lag flush", daemon=True))

    def start(self):
        for t in self._threads:
            t.start()
        return self

    # The mode.

    @property
    def mode(self):
        if self._stopped:
            return "ended"
        return LAGGING if self.lagging else SYNCHRONOUS

    def _set_mode(self):
        """`_lag_from` from the facts it stands for; called under the lock whenever one changes."""
        if self.forced or self._stopped:
            self._lag_from = float("inf")
        elif self.policy == "fail":
            self._lag_from = self._failed_at + SETTLE
        else:
            self._lag_from = 0.0

    @property
    def empty(self):
        """Does the destination have every change queued so far?"""
        return not self._pending

    @property
    def lagging(self):
        return time.monotonic() >= self._lag_from

    # The client's side.

    def add(self, cmd, intent):
        """Queue `cmd` (already applied to the source) for the destination; `intent` is the dirty
        map's token, ended (after_change) once the destination has it. Returns the Change,
        acknowledged already (`acked`) when the lag has room for it (one lock round trip for what
        is most changes' whole stay here), else to pass to `admit`. The caller holds the change's
        range lock: it is queued, in its clusters' order, before anything else may touch them.
        The client's buffer is copied: the request is answered before it is sent."""
        change = Change(cmd.length, intent)
        lagging = time.monotonic() >= self._lag_from
        g = self.granularity
        first, last = cmd.offset // g, (cmd.offset + cmd.length - 1) // g
        # The copy outside the lock: a 1 MiB copy would hold the workers for a tenth of a ms.
        buf = bytearray(cmd.buf) if cmd.op == "write" else None
        with self._lock:
            self.queued_bytes += cmd.length
            tail = self._tail
            if (buf is not None and tail is not None and not tail.started
                    and tail.cmd.op == "write" and tail.cmd.fua == cmd.fua
                    and tail.cmd.offset + tail.cmd.length == cmd.offset
                    and tail.cmd.length + cmd.length <= COALESCE_MAX):
                tail.buf += buf
                tail.cmd = Write(tail.buf, tail.cmd.offset, cmd.fua)
                tail.changes.append(change)
                for c in range(tail.last + 1, last + 1):
                    self._chains.setdefault(c, []).append(tail)
                tail.last = max(tail.last, last)
                self.coalesced += 1
                if lagging and self.bytes + change.length <= self.limit:
                    self._ack(change)
                return change
            self._seq += 1
            if buf is not None:
                dest_cmd = Write(buf, cmd.offset, cmd.fua)
            else:
                # A fast zero the source took: the destination zeroes whatever it costs it.
                dest_cmd = (Zero(cmd.length, cmd.offset, cmd.may_trim, cmd.fua) if cmd.op == "zero"
                            else Trim(cmd.length, cmd.offset, cmd.fua))
            entry = Entry(self._seq, dest_cmd, buf, first, last, change)
            self._pending[entry.seq] = entry
            head = True
            for c in range(first, last + 1):
                chain = self._chains.setdefault(c, [])
                chain.append(entry)
                head = head and len(chain) == 1
            self._tail = entry
            if head:
                self._make_ready(entry)
            if lagging and self.bytes + change.length <= self.limit:
                self._ack(change)
        return change

    def room_for(self, length):
        """Does a change of `length` bytes go through the queue? While lagging, if it can be
        acknowledged at once. When not (the lag is full, or the change larger than it), the change
        goes to both sides at once, as without a lag,
        once the queued changes of its range reached the destination: while the lag is full the
        guest goes at the destination's pace either way, and that path adds no copy and no queue
        to it (1M writes at qd4 to a 2 ms destination: 0.73-0.84x of a local one through the
        queue). Counted as a wait (backpressure)."""
        if not self.lagging:
            # Synchronous (a pivot's drain, or after a failure under `fail`): queued all the same,
            # behind everything, the client waiting for the destination. The backlog keeps the
            # destination first (the workers take ready changes in order), so a pivot drains it
            # in SIZE / bandwidth instead of sharing the bandwidth with new writes.
            return True
        if self.bytes + length <= self.limit:
            return True
        self.waits += 1
        return False

    def admit(self, change):
        """Wait until `change` may be acknowledged: the lag has room for it (lagging), or the
        destination has it. Returns the destination's error (SideError) if it failed the change
        before it was acknowledged, else None."""
        with self._lock:
            if not change.done:
                if self.lagging and self.bytes + change.length <= self.limit:
                    self._ack(change)
                    return None
                self.waits += 1
                while not change.done:
                    if self.lagging and self.bytes + change.length <= self.limit:
                        self._ack(change)
                        return None
                    self._watch(POLL)
            return change.error

    def _ack(self, change):
        change.acked = True
        self.bytes += change.length
        if self.bytes > self.peak:
            self.peak = self.bytes

    def flush_requested(self):
        """A client's flush reached the source: flush the destination once every change queued
        so far reached it (a failed flush marks every region written, as without a lag)."""
        with self._lock:
            if self._pending:
                if self._flush_after is None:
                    self._flush_after = self._seq
                else:
                    self._flush_later = self._seq
                return
        self._flush_due.set()

    # What waits for the queue.

    def wait_range(self, start, end):
        """Wait until no queued change touches [start, end): called under that range's lock, so
        nothing new is queued there meanwhile."""
        g = self.granularity
        clusters = range(start // g, (end - 1) // g + 1)
        with self._lock:
            if not self._pending:
                return
            while any(self._chains.get(c) for c in clusters):
                self._watch()

    def drain(self, timeout):
        """Wait until the queue is empty, at most `timeout` seconds without progress; raises
        DrainTimeout otherwise."""
        with self._lock:
            sent, since = self.sent, time.monotonic()
            while self._pending:
                if self.sent != sent:
                    sent, since = self.sent, time.monotonic()
                left = since + timeout - time.monotonic()
                if left <= 0:
                    raise DrainTimeout(f"the lag of {len(self._pending)} changes did not move "
                                       f"for {timeout:g}s")
                self._watch(min(left, POLL))

    def converge(self, timeout):
        """Before a pivot's hold: drain the lag while the clients go on, and turn synchronous
        while it does not shrink (a writer faster than the destination). Returns once nothing
        acknowledged is missing on the destination (what is still queued is the clients' requests
        in flight, which the hold waits for as it does without a lag), the mode synchronous until
        `release()` or `stop()`; raises DrainTimeout after `timeout` seconds without progress.

        "Not shrinking" is seen two ways: a change found the lag full since the drain began (the
        writer is at least as fast as the destination: known at the next write, not a look
        later), or the lag has not shrunk in CONVERGE_LOOK. Until then the destination's bandwidth
        is shared between the backlog and the writes that find no room, which go to both sides at
        once: every look's wait adds about itself to the drain."""
        with self._lock:
            before, waits = self.bytes, self.waits
            sent, since = self.sent, time.monotonic()
            look = since + CONVERGE_LOOK
            give_up = since + LAG_CONVERGE_MAX
            while self.bytes:
                now = time.monotonic()
                if self.sent != sent:
                    sent, since = self.sent, now
                if now - since >= timeout or now >= give_up:
                    raise DrainTimeout(f"the lag of {len(self._pending)} changes did not drain "
                                       f"(no progress for {timeout:g}s, or {LAG_CONVERGE_MAX:g}s "
                                       "in all)")
                if not self.forced and (self.waits != waits or
                                        (now >= look and self.bytes >= before)):
                    self.forced = True
                    self._set_mode()
                    log.info("the lag (%d bytes) does not shrink: synchronous until the switch",
                             self.bytes)
                if now >= look:
                    before, look = self.bytes, now + CONVERGE_LOOK
                self._watch(POLL)
            # Drained: from here to the switch every change waits for the destination, so the
            # switch's hold finds nothing queued.
            self.forced = True
            self._set_mode()

    def release(self):
        """The switch was refused: lag again."""
        with self._lock:
            self.forced = False
            self._set_mode()

    def stop(self):
        """The mirror ended: nothing is lagged any more; the workers end once the queue is empty."""
        with self._lock:
            self._stopped = True
            self._set_mode()
            self._work.notify_all()
            self._moved.notify_all()

    def status(self):
        with self._lock:
            oldest = next(iter(self._pending.values()), None)
            return {"limit": self.limit, "mode": self.mode, "bytes": self.bytes,
                    "peak_bytes": self.peak, "changes": len(self._pending),
                    "oldest_age_s": round(time.monotonic() - oldest.since, 3) if oldest else 0.0,
                    "queued_bytes": self.queued_bytes, "sent_bytes": self.sent,
                    "coalesced": self.coalesced, "waits": self.waits, "failures": self.failures}

    # The destination's side.

    def _watch(self, timeout=None):
        """Wait (under the lock) until an entry finished or the lag stopped, or `timeout`."""
        self._watchers += 1
        try:
            self._moved.wait(timeout)
        finally:
            self._watchers -= 1

    def _make_ready(self, entry):
        entry.ready = True
        self._ready.append(entry)
        if self._idle and (not self._sending or len(self._ready) >= BATCH
                           or entry.cmd.length >= WAKE_BYTES
                           or time.monotonic() < self._lag_from):
            self._work.notify()

    def _first_everywhere(self, entry):
        if entry.first == entry.last:           # most changes: one cluster
            return self._chains[entry.first][0] is entry
        return all(self._chains[c][0] is entry for c in range(entry.first, entry.last + 1))

    def _take(self):
        """The next entries to send (up to BATCH; no two share a cluster, as each is first in the
        chains of all its clusters), or [] once stopped with nothing left."""
        with self._lock:
            while True:
                batch, size = [], 0
                while self._ready and len(batch) < BATCH and (
                        not batch or size + self._ready[0].cmd.length <= BATCH_BYTES):
                    entry = self._ready.popleft()
                    entry.ready = False
                    if self._first_everywhere(entry):   # a coalesced write may have grown
                        entry.started = True
                        if self._tail is entry:
                            self._tail = None
                        batch.append(entry)
                        size += entry.cmd.length
                if batch:
                    if self._ready and self._idle:
                        self._work.notify()             # more for another worker
                    self._sending += 1
                    return batch
                if self._stopped and not self._pending:
                    return []
                self._idle += 1
                try:
                    self._work.wait(1.0)
                finally:
                    self._idle -= 1

    def _run(self):
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                if len(batch) == 1:
                    # One libnbd call: cheaper than driving a queue of one (a GIL hand-off less).
                    self.dest.run(batch[0].cmd)
                    results = [None]
                else:
                    results = self.dest.run_each([entry.cmd for entry in batch])
            except SideError as e:          # no connection at all: every one failed with it
                results = [e] * len(batch)
            except Exception as e:          # never leave a batch started and unfinished
                log.exception("the lag's destination batch failed unexpectedly")
                results = [side_error(errno.EIO, f"{self.dest.name}: {e}")] * len(batch)
            self._finish(batch, results)

    def _finish(self, batch, results):
        """The destination answered the entries of `batch` (`results`: None or the error of
        each): the regions leave the intent, the chains move on, waiters wake; one lock round
        trip and one wake-up for the whole batch."""
        for entry, error in zip(batch, results):
            if error is not None:
                self.stats.failed(entry.cmd.op, entry.cmd.offset, entry.cmd.length, error)
            for change in entry.changes:
                # The regions stay in the intent until here; a failure marks them to copy again.
                self.dirty.after_change(change.intent, both_sides=error is None)
        with self._lock:
            flush = False
            for entry, error in zip(batch, results):
                flush = self._finished(entry, error) or flush
            # Counted until here: what the batch made ready is this worker's to take next.
            self._sending -= 1
            if self._stopped and not self._pending:
                self._work.notify_all()
            if self._watchers:
                self._moved.notify_all()
        if flush:
            self._flush_due.set()

    def _finished(self, entry, error):
        """`_finish` for one entry, under the lock; returns whether the destination's flush is due."""
        flush = False
        del self._pending[entry.seq]
        self.sent += entry.cmd.length
        for c in range(entry.first, entry.last + 1):
            chain = self._chains[c]
            chain.pop(0)
            if chain:
                head = chain[0]
                if not head.ready and not head.started and self._first_everywhere(head):
                    self._make_ready(head)
            else:
                del self._chains[c]
        if error is not None:
            self.failures += 1
            self._failed_at = time.monotonic()
            self._set_mode()
        for change in entry.changes:
            change.done = True
            if change.acked:
                self.bytes -= change.length
                if error is not None:
                    self.stats.degrade()        # acknowledged without the destination
            else:
                change.error = error
                if error is not None and self.policy == "degrade":
                    self.stats.degrade()
        if self._flush_after is not None and (
                not self._pending or next(iter(self._pending)) > self._flush_after):
            # One flush covers every barrier passed by now.
            later = self._flush_later
            if later is not None and self._pending and next(iter(self._pending)) <= later:
                self._flush_after, self._flush_later = later, None
            else:
                self._flush_after = self._flush_later = None
            flush = True
        return flush

    def _flusher(self):
        """One thread flushes the destination when a client's flush asked for it: the client
        does not wait for it, and flushes asked for meanwhile are covered by the next one."""
        while not self._stopped:
            if self._flush_due.wait(1.0):
                self._flush_due.clear()
                self._flush_dest()

    def _flush_dest(self):
        try:
            self.dest.run(FLUSH)
        except SideError as e:
            # The destination may have lost writes it acknowledged: copy them all again.
            self.stats.failed("flush", 0, 0, e)
            log.error("destination flush behind the lag failed: %s", describe(e))
            self.dirty.mark_all()
            with self._lock:
                self._failed_at = time.monotonic()
                self._set_mode()
