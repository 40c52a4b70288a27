"""The hydration map of an evacuation (--switch-first): which regions the destination holds.

A region is **hydrated** when the destination holds its whole content durably: the source's data
copied there (or a change that covered all of it) and the destination *flushed* since. Reads of a
hydrated region go to the destination, reads of any other region to the source, which is never
written. The rule:

> A region is saved as hydrated only after the destination was flushed with its copy on it, and
> a change to a region that is not hydrated is acknowledged only once the region is saved as
> hydrated.

So after `kill -9` of any process, every acknowledged change is in a hydrated region (on the
destination) and every region the map does not name still reads the source's data, which nothing
changed. A client's FLUSH needs nothing of the map: it never holds a hydrated region that is not
saved (bits are set in memory only after the save).

Regions go through three states, only the last one saved:
- unhydrated: the source has the data, the destination may hold anything there;
- copied (memory only): the destination holds the region's content, not yet flushed or saved. A
  crash forgets it, which is harmless: no change to it was acknowledged yet;
- hydrated: saved in `hydration.map`.

An unhydrated region may also have **held** byte ranges: parts the destination holds because a
change covering only part of the region was made while the source could not be read (the rare
path, datapath.evacuation.evacuee). They follow the same rule (saved only after the destination was flushed
with the change, and before the change is acknowledged), and reads of the region take them from
the destination and the rest from the source. Copying the region later copies only what is not
held; once it is hydrated its held ranges are dropped from the file. Unsaved held ranges (the
change applied, its commit not done yet) are kept in memory so a copy never goes over them.

`commit(regions)` makes regions hydrated with **group commit**: whoever finds no commit running
flushes the destination once and saves the map once for every region handed in so far;
the others wait for that batch (or the next). A commit costs one flush and one fsync'd save per
batch, however many writes wait in it. If the flush or the save fails, every request of the batch
fails and its regions go back to unhydrated (their copy may not have survived).

In place (the destination's daemon reads what it does not hold from its runtime backing, the
source), a region not hydrated may have **holes** instead: ranges the destination's image holds
zeros for although the source has the data there. They come from the rare path in place
(datapath.evacuation.evacuee): a write into part of a qcow2 cluster the destination does not hold, while the
source cannot be read, is written as the whole cluster (the client's bytes, zeros around them).
The rule is the other way round from held ranges: holes are saved *before* that write (a crash
after it must not leave the zeros readable), and reads of them go to the source. A change that
covers part of a hole fills it (`mark_filled`, then `commit(filled=...)`: saved after the
destination was flushed with the change, before the change is acknowledged); copying the region
copies its holes from the source (NBD_CMD_CACHE leaves an allocated cluster alone).

The file, `hydration.map` in the state directory, replaced atomically (state.write_atomically):
JSON with its owner (the migration, the disk and the sides it belongs to, as state.json names them:
datapath.statedir), the disk size, region size, the bitmap (one bit per region, zlib, base64), the
held ranges if any, and a SHA-256 checksum. A file that disagrees with the disk or its checksum is
refused, never reset; so is a missing one (`open(create=False)`): the supervisor makes the map with
the state, before anything starts, so a map that is gone was lost, and starting the hydration
over would read the source over the changes the destination holds. While any range is held the
file has another format (FORMAT_HELD), so a mirrorfs that does not know held ranges refuses it
rather than read the source over them; while
there are holes, likewise (FORMAT_IN_PLACE_HOLES): one that does not know them would read the
destination's zeros.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import base64
import hashlib
import json
import threading
import zlib
from pathlib import Path

from mirrorfs.datapath.errors import HydrationError
from mirrorfs.datapath.state import write_atomically

FILE = "hydration.map"
FORMAT = 1
# A map of a hydration in place (the destination reads the source through its runtime backing, and
# client changes are not committed here): another format, so that nothing that routes reads of
# unhydrated regions to the source can open it and miss the changes the destination holds there.
FORMAT_IN_PLACE = 2
# A map through nbdkit that holds sub-region ranges ("held"): only while it does.
FORMAT_HELD = 3
# A map in place with holes: only while it has them.
FORMAT_IN_PLACE_HOLES = 4
# What each kind of hydration reads, and which of its formats has sub-region ranges ("held" or
# "holes" in the file).
FORMATS = {False: (FORMAT, FORMAT_HELD, "held"), True: (FORMAT_IN_PLACE, FORMAT_IN_PLACE_HOLES,
                                                       "holes")}


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def merge(ranges):
    """[start, end) ranges as a sorted tuple of disjoint ones (touching ones joined)."""
    out = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def subtract_all(ranges, taken):
    """The sorted disjoint `ranges` without the parts any of `taken` covers."""
    taken = merge(taken)
    return tuple(gap for a, b in ranges for gap in subtract(a, b, taken))


def subtract(lo, hi, ranges):
    """The parts of [lo, hi) that none of the sorted disjoint `ranges` covers."""
    gaps, pos = [], lo
    for a, b in ranges:
        if b <= pos or a >= hi:
            continue
        if a > pos:
            gaps.append((pos, a))
        pos = max(pos, b)
    if pos < hi:
        gaps.append((pos, hi))
    return gaps


class HydrationMap:
    def __init__(self, directory, size, region_size, bits=None, in_place=False, held=None,
                 holes=None, owner=None, flush=None):
        self.directory = Path(directory) if directory is not None else None
        self.owner = owner              # whose the map is (datapath.statedir), saved with it
        # How the destination is made durable before a save says it holds something: given at
        # construction (the data path's service gives sideio.flush of the evacuation's
        # destination), so a commit calls nothing above the map. None: a map opened to be read
        # (datapath.statedir's checks), which cannot commit.
        self.flush = flush
        self.format = FORMAT_IN_PLACE if in_place else FORMAT
        self.size = size
        self.region_size = region_size
        self.count = (size + region_size - 1) // region_size
        self.bits = bytearray(bits) if bits is not None else bytearray((self.count + 7) // 8)
        self.hydrated_count = sum(bin(b).count("1") for b in self.bits)
        self.copied = set()             # regions whose content the destination holds, unsaved
        # Unhydrated region -> its saved held ranges (a sorted tuple); replaced, never changed in
        # place, so readers need no lock.
        self.held = dict(held or {})
        self._unsaved_held = {}         # region -> ranges applied on the destination, not saved
        self._pending_held = {}         # region -> ranges handed to commit() for the next batch
        # In place: unhydrated region -> its saved holes (a sorted tuple), read from the source;
        # replaced, never changed in place. Changes into them not saved yet are kept apart, so a
        # copy of the region never goes over them.
        self.holes = dict(holes or {})
        self._unsaved_filled = {}       # region -> ranges changed on the destination, not saved
        self._pending_filled = {}       # region -> such ranges handed to commit()
        self._cond = threading.Condition()
        # Held while the file is written and while what it will say is worked out: the map's
        # writers (a commit's batch, add_holes) each start from what the file says.
        self._save_lock = threading.RLock()
        self._file_bits = bytes(self.bits)
        self._pending = set()           # regions handed to commit() for the next batch
        self._filling = 1               # the number of the batch being filled
        self._done = 0                  # the last batch finished
        self._committing = False
        self._failures = {}             # batch number -> exception, for its waiters
        self.commits = 0                # batches saved (status)

    @classmethod
    def open(cls, directory, size, region_size, in_place=False, owner=None, create=True,
             flush=None):
        """The saved map; if the directory holds none, a new empty one owned by `owner` (saved at
        once), or with `create` False, HydrationError: the map is missing. `flush` flushes the
        destination (see __init__)."""
        path = Path(directory) / FILE
        plain, ranged, field = FORMATS[in_place]
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            if not create:
                raise HydrationError(f"{path} is missing") from None
            found = cls(directory, size, region_size, in_place=in_place, owner=owner,
                        flush=flush)
            found._write(bytes(found.bits))
            return found
        except OSError as e:
            raise HydrationError(f"cannot read {path}: {e.strerror}") from None
        try:
            saved = json.loads(raw)
            if saved.pop("checksum") != _checksum(saved):
                raise ValueError("checksum mismatch")
            if saved["format"] not in (*FORMATS[False][:2], *FORMATS[True][:2]):
                raise ValueError(f"unknown format {saved['format']}")
            if saved["format"] not in (plain, ranged):
                made, now = ("through nbdkit", "in place") if in_place else ("in place",
                                                                           "through nbdkit")
                raise HydrationError(f"{path} was made by a hydration {made}, not {now}; "
                                     "refusing to guess where the changes are")
            if saved["size"] != size or saved["region_size"] != region_size:
                raise ValueError(f"it is for a {saved['size']}-byte disk in regions of "
                                 f"{saved['region_size']}, not {size} in {region_size}")
            bits = zlib.decompress(base64.b64decode(saved["bits"]))
            found = cls(directory, size, region_size, bits, in_place=in_place,
                        owner=saved.get("owner"), flush=flush)
            if len(bits) != len(found.bits) or found.hydrated_count != saved["hydrated"]:
                raise ValueError("bitmap length or count mismatch")
            ranges = found._parse_ranges(field, saved.get(field, {}))
            if bool(ranges) != (saved["format"] == ranged) or \
                    FORMATS[not in_place][2] in saved:
                raise ValueError(f"{field} ranges and format disagree")
            if in_place:
                found.holes = ranges
            else:
                found.held = ranges
        except (ValueError, KeyError, TypeError, zlib.error) as e:
            raise HydrationError(f"{path} is corrupt ({e}); refusing to guess") from None
        return found

    def _parse_ranges(self, field, saved):
        parsed = {}
        for key, ranges in saved.items():
            r = int(key)
            lo, hi = self.span(r)
            if not 0 <= r < self.count or self.hydrated(r) or not ranges:
                raise ValueError(f"{field} ranges of region {key}: not an unhydrated region")
            found = tuple((int(a), int(b)) for a, b in ranges)
            if merge(found) != found or any(not lo <= a < b <= hi for a, b in found):
                raise ValueError(f"{field} ranges of region {key}: not sorted, disjoint, inside it")
            parsed[r] = found
        return parsed

    # Questions (lock-free: a bytearray read is atomic under the GIL, and bits are only ever set).

    def regions(self, start, end):
        return range(start // self.region_size, (end - 1) // self.region_size + 1)

    def span(self, r):
        start = r * self.region_size
        return start, min(start + self.region_size, self.size)

    def hydrated(self, r):
        return bool(self.bits[r >> 3] & (1 << (r & 7)))

    @property
    def complete(self):
        return self.hydrated_count >= self.count

    def hydrated_bytes(self):
        last = self.count - 1
        tail = self.size - last * self.region_size
        full = self.hydrated_count - (1 if self.count and self.hydrated(last) else 0)
        return full * self.region_size + (tail if self.count and self.hydrated(last) else 0)

    def next_unhydrated(self, start=0):
        """The first region at or after `start` that is not hydrated, or None."""
        r = start
        while r < self.count:
            byte = self.bits[r >> 3]
            if byte == 0xFF and not r & 7:
                r += 8
                continue
            if not byte & (1 << (r & 7)):
                return r
            r += 1
        return None

    def runs(self, start, end):
        """[start, end) cut where the side that holds it changes: (offset, length, on the
        destination) pieces. Hydrated regions and saved held ranges are on the destination."""
        held = self.held

        def held_of(r):
            # Hydrated first: a commit sets the bits, then drops the region's ranges, so a
            # region is read whole from the destination or cut by its ranges, never neither.
            return held.get(r) if held and not self.hydrated(r) else None

        pos = start
        while pos < end:
            r = pos // self.region_size
            ranges = held_of(r)
            if ranges:
                stop = min(end, (r + 1) * self.region_size)
                yield from _cut(pos, stop, ranges)
                pos = stop
                continue
            state = self.hydrated(r)
            stop = pos
            while stop < end and self.hydrated(stop // self.region_size) == state and not \
                    held_of(stop // self.region_size):
                stop = min(end, (stop // self.region_size + 1) * self.region_size)
            yield pos, stop - pos, state
            pos = stop

    def runs_in_place(self, start, end):
        """Like runs(), in place: everything on the destination but the holes of regions not
        hydrated, which are on the source."""
        holes = self.holes
        if not holes:
            yield start, end - start, True
            return
        pos = start
        while pos < end:
            r = pos // self.region_size
            ranges = holes.get(r) if not self.hydrated(r) else None
            stop = min(end, (r + 1) * self.region_size)
            if ranges:
                for offset, length, hole in _cut(pos, stop, ranges):
                    yield offset, length, not hole
                pos = stop
                continue
            while stop < end and not (holes.get(stop // self.region_size) and
                                      not self.hydrated(stop // self.region_size)):
                stop = min(end, stop + self.region_size)
            yield pos, stop - pos, True
            pos = stop

    def holes_in(self, start, end):
        """{region: ranges}: the saved holes [start, end) overlaps."""
        if not self.holes:
            return {}
        found = {}
        for r in self.regions(start, end):
            ranges = self.holes.get(r)
            if ranges and not self.hydrated(r) and any(a < end and b > start for a, b in ranges):
                found[r] = ranges
        return found

    def holes_to_copy(self, r):
        """The holes of region `r` a copy of it must read from the source: the saved ones, but
        for what changes wrote into them since (not saved yet)."""
        ranges = self.holes.get(r, ())
        if not ranges or self.hydrated(r):
            return ()
        with self._cond:
            filled = tuple(self._unsaved_filled.get(r, ()))
        return subtract_all(ranges, filled) if filled else ranges

    def hole_bytes(self):
        return sum(b - a for ranges in self.holes.values() for a, b in ranges)

    def on_destination(self, r):
        """The ranges of unhydrated region `r` the destination holds, saved or not (sorted)."""
        if not self.held and not self._unsaved_held:
            return ()
        return merge(self.held.get(r, ()) + tuple(self._unsaved_held.get(r, ())))

    def missing(self, r, start=0, end=0):
        """The parts of region `r` the destination does not hold, and [start, end) does not
        cover: what a copy of it must read from the source."""
        lo, hi = self.span(r)
        return subtract(lo, hi, merge(self.on_destination(r) + ((start, end),)))

    def held_bytes(self):
        """Bytes of unhydrated regions the destination holds (saved held ranges)."""
        return sum(b - a for ranges in self.held.values() for a, b in ranges)

    # Changing it.

    def mark_copied(self, regions):
        with self._cond:
            self.copied.update(r for r in regions if not self.hydrated(r))

    def is_copied(self, r):
        return r in self.copied

    def mark_held(self, r, start, end):
        """The destination holds [start, end) of unhydrated region `r` (a change applied under
        its range lock), not saved yet: copies of the region leave it alone."""
        with self._cond:
            self._unsaved_held.setdefault(r, []).append((start, end))

    def add_holes(self, new):
        """Save `new` ({region: [(start, end)]}, in regions not hydrated) as holes, now: before
        the destination's zeros are written there (the rare path in place). Raises
        HydrationError if the save failed (then nothing may be written)."""
        with self._save_lock:
            holes = dict(self.holes)
            for r, ranges in new.items():
                if not self.hydrated(r):
                    holes[r] = merge(holes.get(r, ()) + tuple(ranges))
            try:
                self._write(self._file_bits, self.held, holes)
            except Exception as e:
                raise HydrationError(f"the hydration map could not be saved: {e}") from e
            self.holes = holes

    def mark_filled(self, r, start, end):
        """A change wrote [start, end) of region `r`'s holes on the destination (under its range
        lock), not saved yet: copies of the region leave it alone."""
        with self._cond:
            self._unsaved_filled.setdefault(r, []).append((start, end))

    def commit(self, regions, held=None, filled=None):
        """Return once every one of `regions` is saved as hydrated, every range of `held`
        ({region: (start, end)}, marked with mark_held) is saved as held, and every range of
        `filled` (likewise, marked with mark_filled) is no longer saved as a hole, each batch
        saved after the map's `flush()` made the destination durable. Raises HydrationError if
        the batch's flush or save failed, or the map was opened without a flush."""
        if self.flush is None:
            raise HydrationError("a hydration map opened to be read cannot commit")
        missing = {r for r in regions if not self.hydrated(r)}
        held = {r: span for r, span in (held or {}).items() if not self.hydrated(r)}
        filled = {r: span for r, span in (filled or {}).items() if not self.hydrated(r)}
        if not missing and not held and not filled:
            return
        with self._cond:
            self._pending |= missing
            for r, span in held.items():
                self._pending_held.setdefault(r, []).append(span)
            for r, span in filled.items():
                self._pending_filled.setdefault(r, []).append(span)
            mine = self._filling
            while self._done < mine:
                if not self._committing:
                    self._lead()
                else:
                    self._cond.wait()
            failure = self._failures.get(mine)
        if failure is not None:
            raise HydrationError(f"the hydration map could not be saved: {failure}") from failure

    def _lead(self):
        """Commit the batch being filled (called and returning with the condition held)."""
        self._committing = True
        number, batch = self._filling, self._pending
        batch_held, batch_filled = self._pending_held, self._pending_filled
        self._filling, self._pending = number + 1, set()
        self._pending_held, self._pending_filled = {}, {}
        self._cond.release()
        failure = None
        try:
            self.flush()
            with self._save_lock:
                bits = bytearray(self._file_bits)
                for r in batch:
                    bits[r >> 3] |= 1 << (r & 7)

                def kept(r):
                    return not bits[r >> 3] & (1 << (r & 7))

                held = dict(self.held)
                for r, spans in batch_held.items():
                    held[r] = merge(held.get(r, ()) + tuple(spans))
                held = {r: v for r, v in held.items() if kept(r)}
                holes = {r: subtract_all(v, batch_filled.get(r, ())) for r, v in
                         self.holes.items()}
                holes = {r: v for r, v in holes.items() if v and kept(r)}
                self._write(bytes(bits), held, holes)
                # Holes may go before the bits are set (reads of the region then go to the
                # destination, which has it, flushed); held ranges may not (see runs).
                self.holes = holes
        except Exception as e:          # the flush or the save: the batch is not durable
            failure = e
        finally:
            self._cond.acquire()
        # Saved now, or not durable: no longer unsaved.
        for pending, unsaved_of in ((batch_held, self._unsaved_held),
                                    (batch_filled, self._unsaved_filled)):
            for r, spans in pending.items():
                unsaved = unsaved_of.get(r, [])
                for span in spans:
                    if span in unsaved:
                        unsaved.remove(span)
                if not unsaved:
                    unsaved_of.pop(r, None)
        if failure is None:
            for r in batch:
                if not self.hydrated(r):
                    self.bits[r >> 3] |= 1 << (r & 7)
                    self.hydrated_count += 1
                self._unsaved_held.pop(r, None)
                self._unsaved_filled.pop(r, None)
            self.held = held                # after the bits (see runs)
            self.commits += 1
        else:
            self._failures[number] = failure
            for old in [n for n in self._failures if n < number - 64]:
                del self._failures[old]
        self.copied -= batch
        self._done = number
        self._committing = False
        self._cond.notify_all()

    def _write(self, bits, held=None, holes=None):
        """Save `bits` (the whole map), `held` and `holes` (region -> ranges) atomically."""
        with self._save_lock:
            self._write_locked(bytes(bits), held, holes)
            self._file_bits = bytes(bits)

    def _write_locked(self, bits, held, holes):
        if self.directory is None:
            return
        fmt = FORMAT_HELD if held else FORMAT_IN_PLACE_HOLES if holes else self.format
        fields = {"format": fmt, "owner": self.owner, "size": self.size,
                  "region_size": self.region_size,
                  "hydrated": sum(bin(b).count("1") for b in bits),
                  "bits": base64.b64encode(zlib.compress(bits)).decode()}
        for name, ranges in (("held", held), ("holes", holes)):
            if ranges:
                fields[name] = {str(r): [list(span) for span in v]
                                for r, v in sorted(ranges.items())}
        write_atomically(self.directory, FILE,
                         json.dumps({**fields, "checksum": _checksum(fields)}).encode())


def _cut(start, end, held):
    """[start, end) inside one region cut by its sorted `held` ranges: (offset, length, held)."""
    pos = start
    for a, b in held:
        if b <= pos:
            continue
        if a >= end:
            break
        if a > pos:
            yield pos, a - pos, False
        stop = min(b, end)
        yield max(a, pos), stop - max(a, pos), True
        pos = stop
    if pos < end:
        yield pos, end - pos, False
