"""Which parts of the disk may differ between the sides, and the rule that keeps that knowledge
durable before it matters.

Regions (64 MiB by default) are the unit of bookkeeping:
- `needs_copy`: regions known to differ (a write reached only one side, or a crash left them unknown);
  the copier copies them from the source.
- `intent`: regions that may differ *right now*, saved in the state before a write to them is issued
  (a write-intent map, as md's bitmap): a crash in the middle of a write leaves the sides different
  only in regions the saved state names. A region stays in `intent` while it is written and is cleared
  only after both sides were flushed with no write to it in flight (`clean`).
- `cursor` (full mode): the first pass has copied everything below it. Writes at or above it need no
  intent: the copier has not been there yet and will copy whatever is there when it arrives, after the
  write (the range lock orders them).

Without a state directory the same bookkeeping runs in memory, for the degrade policy's resync.
This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import collections
import threading


class DirtyMap:
    def __init__(self, size, region_size, state=None, full=False):
        """`state`: the loaded state (mirrorfs.datapath.state), whose regions and cursor resume;
        `full`: the first pass starts at the state's cursor (0 without a state)."""
        self.size = size
        self.region_size = region_size
        self.state = state
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        resumed = set(state.dirty) if state else set()
        self.needs_copy = set(resumed)
        self.copying = set()                    # taken from needs_copy, being copied right now
        self.intent = set(resumed)
        self.saved = set(resumed)
        self.active = collections.Counter()     # changes in flight, per region
        self.written = set()                    # regions changed since the last clean() began
        if full:
            self.cursor = state.cursor if state else 0
        else:
            self.cursor = size
        self.saved_cursor = self.cursor
        self.changed = threading.Event()        # wakes the copier

    # Helpers.

    def regions(self, start, end):
        return range(start // self.region_size, (end - 1) // self.region_size + 1)

    @property
    def durable(self):
        return self.state is not None

    # The write path.

    def before_change(self, start, end):
        """Call before issuing a change to [start, end) on the sides; returns a token for
        `after_change`. Blocks until the intent is saved when it must be."""
        if not self.durable:
            return (start, end)     # in memory only: nothing to count for clean()
        regions = self.regions(start, end)
        need = ()
        with self._lock:
            for r in regions:
                self.active[r] += 1
            self.written.update(regions)
            if start < self.cursor:
                # "not in intent": clean() may have just cleared it, its save still pending.
                need = [r for r in regions if r not in self.intent or r not in self.saved]
                self.intent.update(need)
        if need:
            self._save(need)
        return (start, end)

    def after_change(self, token, both_sides):
        """Call when the change completed; `both_sides` False if it may have reached only one side.
        Such regions must be copied again; they are already in the saved intent when it matters
        (below the cursor), so the client may be answered."""
        if both_sides and not self.durable:
            return                  # the hot path without a state directory: nothing to do
        regions = self.regions(*token)
        with self._lock:
            if self.durable:
                for r in regions:
                    self.active[r] -= 1
                    if not self.active[r]:
                        del self.active[r]
            if not both_sides:
                self.needs_copy.update(regions)
                self.intent.update(regions)
        if not both_sides:
            # The regions were in the saved intent before the change was issued (below the
            # cursor); saving again keeps the saved phase true: something is known to differ now.
            if self.durable:
                self._save(())
            self.changed.set()

    # The copier's side.

    def advance(self, end):
        """The first pass copied everything below `end`."""
        with self._lock:
            self.cursor = max(self.cursor, min(end, self.size))
            done = self.cursor >= self.size
        if done:
            self.changed.set()          # the copier that watches for synchronized may be idle

    def take_region(self):
        """A region to copy again, moved from needs_copy to copying; None if there is none. The
        copier ends it with `region_done` or, after a failure, `give_back`. Until then the region
        still counts as differing: a switch between two of its chunks must be refused."""
        with self._lock:
            if not self.needs_copy:
                return None
            r = min(self.needs_copy)
            self.needs_copy.discard(r)
            self.copying.add(r)
            return r

    def region_done(self, region):
        with self._lock:
            self.copying.discard(region)
            synchronized = self._synchronized()
        if synchronized and self.durable:
            self._save(())          # the saved phase says synchronized as soon as it is true

    def give_back(self, region):
        with self._lock:
            self.copying.discard(region)
            self.needs_copy.add(region)

    def mark_all(self):
        """Every region that may have been written must be copied again: a side lost writes it had
        acknowledged (a failed flush). Without a state, that is every region."""
        with self._lock:
            regions = self.intent | self.written if self.durable else range(
                (self.size + self.region_size - 1) // self.region_size)
            self.needs_copy.update(regions)
            self.intent.update(regions)
        if self.durable:
            self._save(())
        self.changed.set()

    def dirty_bytes(self):
        """How many bytes may still differ: what the first pass has not reached, and the regions
        to copy again below it (each counted once, the last one only up to the disk's end)."""
        with self._lock:
            cursor, regions = self.cursor, self.needs_copy | self.copying
        total = self.size - cursor
        for r in regions:
            start = r * self.region_size
            total += max(0, min(start + self.region_size, cursor) - start)
        return total

    def synchronized(self):
        with self._lock:
            return self._synchronized()

    def _synchronized(self):
        return self.cursor >= self.size and not self.needs_copy and not self.copying

    # Keeping the saved state small and current.

    def save_cursor(self, flush_dest):
        """Save the first pass's progress. The destination is flushed first, so what the saved
        cursor claims is on stable storage."""
        with self._lock:
            cursor = self.cursor
        if cursor == self.saved_cursor or not self.durable:
            return
        flush_dest()
        self._save((), cursor=cursor)

    def clean(self, flush_sides):
        """Clear the intent of regions whose writes are all done and flushed on both sides.

        Only regions idle when this starts and not written since qualify: every write to them
        completed before the flush below was issued, so the flush covers it."""
        if not self.durable:
            return
        with self._lock:
            idle = {r for r in self.intent
                    if r not in self.active and r not in self.needs_copy and r not in self.copying}
            self.written = set()
        if not idle:
            return
        flush_sides()
        with self._lock:
            cleared = {r for r in idle if r not in self.written and r not in self.active
                       and r not in self.needs_copy and r not in self.copying}
            self.intent -= cleared
        if cleared:
            self._save(())

    def save(self):
        """Save the current picture: the copier calls this when it finds the sides synchronized, so
        that the saved phase says so."""
        if self.durable:
            self._save(())

    def _save(self, need, cursor=None):
        """Save the current intent (and cursor); the state derives its phase from `synchronized`.
        Snapshots are taken under the save lock, so a later save never writes an older picture
        over a newer one."""
        with self._save_lock:
            with self._lock:
                if need and all(r in self.saved for r in need) and cursor is None:
                    return          # another thread's save already holds them
                snapshot = self.intent | self.needs_copy | self.copying
                synchronized = not self.needs_copy and not self.copying and (
                    (cursor if cursor is not None else self.saved_cursor) >= self.size)
            self.state.record(dirty=snapshot, cursor=cursor, synchronized=synchronized)
            with self._lock:
                self.saved = snapshot
                if cursor is not None:
                    self.saved_cursor = cursor
