"""The persistent state of a mirror, in its state directory: what must survive `kill -9`.

One file, `state.json`, replaced atomically (write a temporary file, fsync it, rename it over the old
one, fsync the directory), so a crash leaves either the old state or the new one, never a mixture. It
holds:

- whose it is (`owner`, datapath.statedir): the migration (a random id made once, with the state),
  the disk's name when it has one, and each side's identity (its path or URI, format, size and, for
  a file, its inode); every file of the state directory carries the same owner, and a restart with
  other endpoints, or beside another migration's files, is refused;
- the phase: copying (something may still differ), synchronized, switched, cancelled. The first two
  are not decided by anyone: every save computes them from the cursor and the regions known to
  differ, so the saved phase is always true. The last two end the mirror: once saved, nothing changes
  the phase again (`record` refuses), so a late save from the copier can never turn a switched disk
  back into a mirror whose source is authoritative;
- `cursor`: in full mode, the first pass has copied everything below this offset (and the destination
  was flushed before the cursor was saved);
- `dirty`: the regions that may differ between the sides. A region is saved here *before* a write to
  it is issued (write intent), or before a write that reached only one side is acknowledged, and is
  removed only after both sides were flushed with no write to it in flight.

After a crash, a region may differ between the sides only if it is at or above the cursor or in
`dirty`; resuming copies exactly those from the source. A checksum guards against a file damaged on
disk: a corrupt state is refused, never silently reset.

One owner: the supervisor creates the state (datapath.statedir, which also checks, before anything
starts, that every file of the directory is there and belongs to these endpoints); inside nbdkit
the data path loads it and changes it only through `record`, under one lock, from
the dirty map (intent, cursor) and the switch (the end of the mirror).

This module runs in nbdkit's embedded interpreter too: standard library only.
"""

import hashlib
import json
import os
import threading
from pathlib import Path

from mirrorfs.common.phases import ENDS, Phase
from mirrorfs.datapath.errors import StateError  # noqa: F401 (raised here; the supervisor catches it)
from mirrorfs.datapath.options import COPY_MODES

# Format 2 names its owner; format 1 did not, and is refused (there is no conversion: see load).
FORMAT = 2
FILE = "state.json"
# The saved phase of a mirror: derived from its cursor and dirty map while mirroring, else its end.
MIRRORING = (Phase.COPYING, Phase.SYNCHRONIZED)
# An evacuation (--switch-first) is hydrating until it ends as switched (the destination alone).
PHASES = MIRRORING + (Phase.HYDRATING,) + ENDS


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class State:
    def __init__(self, directory, *, copy, source, dest, size, region_size, phase=Phase.COPYING,
                 cursor=0, dirty=(), switch_first=False, in_place=False, migration=None, disk=None,
                 reader="source"):
        self.directory = Path(directory)
        # Whose the state is (datapath.statedir): a random id made once, when the state was made,
        # and the disk's name when it has one (None: a disk without a name).
        self.migration = migration
        self.disk = disk
        # The side reads come from while the mirror goes on: "destination" after a group's pivot
        # with its safety net (control.group), until its commit or revert.
        self.reader = reader
        # How the disk is served until its end: a mirror (changes to both sides), or an evacuation
        # (--switch-first: changes to the destination alone, the source read-only; datapath.evacuation.evacuee).
        self.switch_first = switch_first
        # An evacuation hydrating in place (datapath.evacuation.evacuee): the destination holds every change,
        # also in regions not hydrated; only this mode may resume it.
        self.in_place = in_place
        self.copy = copy                # "full": copy everything first; "none": sides start equal
        self.source = source            # identities: {"spec": ..., "size": ...}
        self.dest = dest
        self.size = size
        self.region_size = region_size
        self.phase = phase
        self.cursor = cursor
        self.dirty = set(dirty)         # region numbers
        self._lock = threading.Lock()

    @property
    def owner(self):
        """What every file of the state directory names as its owner."""
        return {"migration": self.migration, "disk": self.disk, "source": self.source,
                "dest": self.dest}

    @property
    def ended(self):
        return self.phase in ENDS

    def record(self, *, dirty=None, cursor=None, synchronized=None, end=None, reader=None):
        """Change the state and save it before returning: the regions that may differ, the first
        pass's cursor, whether anything is known to differ (`synchronized`, from the dirty map,
        which tells regions being written from regions to copy again), or the end of the mirror
        (switched, cancelled). Raises StateError if the mirror already ended otherwise: a pivot and
        a cancel cannot both win. Once ended, the phase stays."""
        with self._lock:
            if end is not None:
                if end not in ENDS:
                    raise ValueError(f"not an end of a mirror: {end}")
                if self.ended and self.phase != end:
                    raise StateError(f"the mirror was already {self.phase}")
                self.phase = end
            if reader is not None:
                if reader not in ("source", "destination"):
                    raise ValueError(f"not a side: {reader}")
                self.reader = reader
            if dirty is not None:
                self.dirty = set(dirty)
            if cursor is not None:
                self.cursor = cursor
            if not self.ended and synchronized is not None:
                self.phase = (Phase.SYNCHRONIZED if synchronized and self.cursor >= self.size
                              else Phase.COPYING)
            self.save()

    @property
    def path(self):
        return self.directory / FILE

    def fields(self):
        # Only when set: a mirror's state.json (and its checksum) is as before.
        mode = {"switch_first": True} if self.switch_first else {}
        if self.in_place:
            mode["in_place"] = True
        if self.reader != "source":
            mode["reader"] = self.reader
        return {"format": FORMAT, "owner": self.owner, **mode, "copy": self.copy,
                "size": self.size, "region_size": self.region_size, "phase": self.phase,
                "cursor": self.cursor, "dirty": sorted(self.dirty)}

    def save(self):
        fields = self.fields()
        write_atomically(self.directory, FILE,
                         json.dumps({**fields, "checksum": _checksum(fields)}, indent=1).encode())

    @classmethod
    def load(cls, directory):
        """The saved state, or None if the directory holds none."""
        path = Path(directory) / FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        try:
            saved = json.loads(raw)
            checksum = saved.pop("checksum")
            if checksum != _checksum(saved):
                raise ValueError("checksum mismatch")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{path} is corrupt ({e}); refusing to guess. Inspect it; see "
                             "OPERATING.md, \"Nothing resets silently\"") from None
        if saved.get("format") == 1:
            raise StateError(f"{path} was written by an older mirrorfs (state format 1), which did "
                             "not record which migration and images it belongs to; this one cannot "
                             "tell whose it is and refuses it (there is no conversion): finish or "
                             "cancel that migration with the mirrorfs that started it")
        try:
            if saved["format"] != FORMAT:
                raise ValueError(f"unknown format {saved['format']}")
            owner = saved["owner"]
            copy = saved["copy"]
            switch_first = saved.get("switch_first", False)
            in_place = saved.get("in_place", False)
            reader = saved.get("reader", "source")
            if reader not in ("source", "destination"):
                raise ValueError(f"unknown reader {reader}")
            if saved["phase"] not in PHASES or copy not in COPY_MODES or \
                    not isinstance(switch_first, bool) or not isinstance(in_place, bool):
                raise ValueError("unknown phase, copy mode or switch_first")
            if not isinstance(owner["migration"], str) or not owner["migration"] or \
                    not isinstance(owner["source"], dict) or not isinstance(owner["dest"], dict):
                raise ValueError("its owner names no migration or no sides")
            state = cls(directory, copy=copy, source=owner["source"], dest=owner["dest"],
                        size=int(saved["size"]), region_size=int(saved["region_size"]),
                        phase=saved["phase"],
                        cursor=int(saved["cursor"]) if copy == "full" else int(saved["size"]),
                        dirty=[int(r) for r in saved["dirty"]], switch_first=switch_first,
                        in_place=in_place, migration=owner["migration"], disk=owner.get("disk"),
                        reader=reader)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{path} is corrupt ({e}); refusing to guess. Inspect it; see "
                             "OPERATING.md, \"Nothing resets silently\"") from None
        return state


def write_atomically(directory, name, data):
    """Replace `directory/name` by `data` so that a crash leaves the old file or the new one: a
    temporary file written and fsynced, renamed over the old one, the directory fsynced."""
    directory = Path(directory)
    tmp = directory / (name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / name)
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
