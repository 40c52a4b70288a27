"""The persistent state of a mirror, in its state directory: what must survive `kill -9`.

One file, `state.json`, replaced atomically (write a temporary file, fsync it, rename it over the old
one, fsync the directory), so a crash leaves either the old state or the new one, never a mixture. It
holds:

- which source and destination it belongs to (a restart with other endpoints is refused);
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

One owner: the supervisor creates the state (`open_for`, which checks it belongs to these
endpoints); inside nbdkit the data path loads it and changes it only through `record`, under one
lock, from the dirty map (intent, cursor) and the switch (the end of the mirror).

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

FORMAT = 1
FILE = "state.json"
# The saved phase of a mirror: derived from its cursor and dirty map while mirroring, else its end.
MIRRORING = (Phase.COPYING, Phase.SYNCHRONIZED)
# An evacuation (--switch-first) is hydrating until it ends as switched (the destination alone).
PHASES = MIRRORING + (Phase.HYDRATING,) + ENDS

# Format 1 spelled copy mode none as "mirror".
_LEGACY_COPY = {"mirror": "none"}


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class State:
    def __init__(self, directory, *, copy, source, dest, size, region_size, phase=Phase.COPYING,
                 cursor=0, dirty=(), switch_first=False, in_place=False, reader="source"):
        self.directory = Path(directory)
        # The side reads come from while the mirror goes on: "destination" after a group's pivot
        # with its safety net (control.group), until its commit or revert.
        self.reader = reader
        # How the disk is served until its end: a mirror (changes to both sides), or an evacuation
        # (--switch-first: changes to the destination alone, the source read-only; datapath.evacuee).
        self.switch_first = switch_first
        # An evacuation hydrating in place (datapath.evacuee): the destination holds every change,
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
        return {"format": FORMAT, **mode, "copy": self.copy, "source": self.source, "dest": self.dest,
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
            if saved["format"] != FORMAT:
                raise ValueError(f"unknown format {saved['format']}")
            copy = saved.get("copy") or _LEGACY_COPY.get(saved.get("mode"), saved.get("mode"))
            switch_first = saved.get("switch_first", False)
            in_place = saved.get("in_place", False)
            reader = saved.get("reader", "source")
            if reader not in ("source", "destination"):
                raise ValueError(f"unknown reader {reader}")
            if saved["phase"] not in PHASES or copy not in COPY_MODES or \
                    not isinstance(switch_first, bool) or not isinstance(in_place, bool):
                raise ValueError("unknown phase, copy mode or switch_first")
            state = cls(directory, copy=copy, source=saved["source"], dest=saved["dest"],
                        size=int(saved["size"]), region_size=int(saved["region_size"]),
                        phase=saved["phase"],
                        cursor=int(saved["cursor"]) if copy == "full" else int(saved["size"]),
                        dirty=[int(r) for r in saved["dirty"]], switch_first=switch_first,
                        in_place=in_place, reader=reader)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{path} is corrupt ({e}); refusing to guess. Inspect it, or move it "
                             "away to start over with a full copy") from None
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


def open_for(directory, *, copy, source, dest, size, region_size, switch_first=False,
             in_place=False):
    """The state for this source and destination: loaded if the directory has one (and it is theirs),
    created otherwise. `source` and `dest` are identities (dicts) as the supervisor names them;
    `switch_first`: an evacuation's state; a state of the other mode is refused."""
    directory = Path(directory)
    if not directory.is_dir():
        if not directory.parent.is_dir():
            raise StateError(f"state directory {directory}: {directory.parent} does not exist")
        try:
            directory.mkdir(mode=0o700)
        except OSError as e:
            raise StateError(f"cannot create the state directory {directory}: {e.strerror}") from None
    state = State.load(directory)
    if state is None:
        if switch_first:
            phase = Phase.HYDRATING
        else:
            phase = Phase.COPYING if copy == "full" else Phase.SYNCHRONIZED
        state = State(directory, copy=copy, source=source, dest=dest, size=size,
                      region_size=region_size, phase=phase, cursor=0 if copy == "full" else size,
                      switch_first=switch_first, in_place=in_place)
        try:
            state.save()
        except OSError as e:
            raise StateError(f"cannot write the state in {directory}: {e.strerror}") from None
        return state, False
    for label, saved, given in (("source", state.source, source), ("destination", state.dest, dest)):
        if saved != given:
            raise StateError(f"the state in {directory} belongs to another {label}: "
                             f"{_describe(saved)}, not {_describe(given)}")
    if state.switch_first != switch_first:
        names = {True: "--switch-first", False: "a mirror (without --switch-first)"}
        raise StateError(f"the state in {directory} is for {names[state.switch_first]}, not "
                         f"{names[switch_first]}: the sides hold different things in the two modes")
    if state.copy != copy:
        raise StateError(f"the state in {directory} is for --copy {state.copy}, not --copy {copy}")
    return state, True


def _describe(identity):
    name = identity.get("image") or identity.get("uri")
    return f"{name} ({identity.get('size')} bytes)"
