"""A state directory as a whole: which files it holds, and whose they are.

    owner.json      written once, first, when the state is made: the owner and the files it keeps
    hydration.map   an evacuation's (--switch-first) hydration map (datapath.evacuation.hydration), next
    state.json      the state journal (datapath.state; the dirty map is saved in it), last

The **owner** is the same in every file: the migration (a random id made once, with the state), the
disk's name when it has one (None otherwise), and each side's identity as the supervisor names it
(daemons.tree.identity: the image's path, format, size and inode, or the URI and size). A restart
refuses, in one line and before any process starts (the supervisor calls `open_for` or `load` before
it starts a storage daemon), a state directory in which

- a file is **missing**: `owner.json` lists what the state keeps, so a `state.json` or a
  `hydration.map` that is gone is seen, and nothing starts a copy or a hydration from zero over a
  destination that holds changes the source lacks;
- a file is **corrupt** (its checksum, its fields);
- a file is **someone else's**: another migration's id (a map copied from another disk's state
  directory, or left by an earlier migration of the same images), other images (another path, or
  the same path now holding another file: its inode changed), or another disk's name.

The image files mirrorfs writes (the destination; the source too unless it is an evacuation's,
which is only read) are also **marked** when the state is made: the extended attribute
`user.mirrorfs.migration` holds the migration's id and its state directory (where the file system
refuses it, the state says the file is not marked and only its path, size and inode are checked).
The mark works both ways:
- a restart with an earlier migration's state directory of the same images is refused: a later
  migration marked the files again, and the earlier state's regions no longer describe them;
- a new state (a new or mistyped `--state-dir`) is refused for an image whose mark names a state
  directory that still holds that migration's state: starting over would copy the source over a
  destination that may hold the disk, or take stale sides for equal. When that directory is gone,
  or its migration was handed back, the mark is stale and the new state takes the image; and the
  side an ended migration left the disk on (the destination after a switch, the source after a
  cancel) may be the *source* of a new one.

Why a separate owner.json, written once: state.json alone cannot tell "never made" from "lost". With
owner.json written first and state.json last, a directory holding owner.json without state.json lost
it (or a start was killed in the instant between the two writes, before anything served: then, and
only then, the directory may be removed). A migration that is over and was handed back to its export
leaves `state.json.handed-back` instead of `state.json`: nothing is resumed from it.

The data path reads the directory with the same code (`load`), as a second line of defence.
This module runs in nbdkit's embedded interpreter too: standard library only.
"""

import hashlib
import json
import os
import secrets
from pathlib import Path

from mirrorfs.common.phases import Phase
from mirrorfs.datapath.errors import StateError
from mirrorfs.datapath.evacuation.hydration import FILE as HYDRATION, HydrationError, HydrationMap
from mirrorfs.datapath.state import FILE as STATE, State, write_atomically

OWNER = "owner.json"
HANDED_BACK = STATE + ".handed-back"
# Every name a state directory may hold (besides the ".tmp" of a write a crash interrupted).
FILES = (OWNER, HYDRATION, STATE)
FORMAT = 1
# The extended attribute of the destination image that names the migration that last made a state
# for it.
MARK = "user.mirrorfs.migration"
# Where the operator reads what to do about a refusal.
SEE = 'see OPERATING.md, "Nothing resets silently"'


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def describe(identity):
    name = identity.get("image") or identity.get("uri")
    return f"{name} ({identity.get('size')} bytes)"


def create(directory, *, copy, source, dest, size, region_size, switch_first=False,
           in_place=False, disk=None, migration=None):
    """A new state in `directory` (made if its parent exists), owned by a new migration: owner.json,
    then the hydration map of an evacuation, then state.json. Returns the State. `migration`: the
    id the migration already has (a named disk's record names it since the borrow), else a new
    one."""
    directory = Path(directory)
    if not directory.is_dir():
        if not directory.parent.is_dir():
            raise StateError(f"state directory {directory}: {directory.parent} does not exist")
        try:
            directory.mkdir(mode=0o700)
        except OSError as e:
            raise StateError(f"cannot create the state directory {directory}: {e.strerror}") from None
    if switch_first:
        phase = Phase.HYDRATING
    else:
        phase = Phase.COPYING if copy == "full" else Phase.SYNCHRONIZED
    refuse_taken(directory, source=source, dest=dest, switch_first=switch_first)
    migration = migration or secrets.token_hex(16)
    if not switch_first:
        source = _mark(source, migration, directory)
    state = State(directory, copy=copy, source=source, dest=_mark(dest, migration, directory),
                  size=size,
                  region_size=region_size, phase=phase, cursor=0 if copy == "full" else size,
                  switch_first=switch_first, in_place=in_place, migration=migration, disk=disk)
    files = [HYDRATION, STATE] if switch_first else [STATE]
    fields = {"format": FORMAT, "owner": state.owner, "files": files}
    try:
        write_atomically(directory, OWNER,
                         json.dumps({**fields, "checksum": _checksum(fields)}, indent=1).encode())
        if switch_first:
            HydrationMap.open(directory, size, region_size, in_place=in_place, owner=state.owner)
        state.save()
    except OSError as e:
        # A directory that exists but takes no file (/proc/x): one line, not a traceback.
        raise StateError(f"cannot write the state in {directory}: {e.strerror}") from None
    return state


def load(directory):
    """The state saved in `directory` with every file of it checked against the others (present,
    intact, one owner); None if the directory holds none of them. Raises StateError naming the
    file, what is wrong with it and what to do."""
    directory = Path(directory)
    present = {name for name in (*FILES, HANDED_BACK) if _exists(directory / name)}
    if not present:
        return None
    if STATE not in present and HANDED_BACK in present:
        raise StateError(f"the migration in {directory} is over and was handed back to its export "
                         f"({HANDED_BACK}): nothing to resume; a new migration needs a new or "
                         "empty --state-dir")
    if OWNER not in present:
        if STATE in present:
            State.load(directory)           # a state of format 1 is refused with its own reason
            raise StateError(f"{directory / OWNER} is missing beside {STATE}: the directory does "
                             f"not say whose it is any more; restore the file ({SEE})")
        raise StateError(f"{directory / HYDRATION} is a hydration map without its state ({STATE} "
                         f"and {OWNER} are missing): it belongs to another evacuation, or to one "
                         "whose state was lost; refusing to guess which regions the destination "
                         f"holds ({SEE})")
    owner, files = _read_owner(directory / OWNER)
    for name in files:
        if name not in present:
            raise StateError(_missing(directory, name, owner))
    if HYDRATION in present and HYDRATION not in files:
        raise StateError(f"{directory / HYDRATION} does not belong in {directory}: the state there "
                         "is a mirror's, which has no hydration map; it was copied or left there "
                         f"by another evacuation ({SEE})")
    state = State.load(directory)
    _same_owner(directory / STATE, state.owner, directory / OWNER, owner)
    if HYDRATION in files:
        found = open_map(state)
        _same_owner(directory / HYDRATION, found.owner, directory / OWNER, owner)
    return state


def open_map(state, create=False):
    """The hydration map of the evacuation `state` is for; StateError if it is missing or corrupt."""
    try:
        return HydrationMap.open(state.directory, state.size, state.region_size,
                                 in_place=state.in_place, owner=state.owner, create=create)
    except HydrationError as e:
        if str(e).endswith(" is missing"):
            raise StateError(_missing(state.directory, HYDRATION, state.owner)) from None
        raise StateError(f"{e} ({SEE})") from None


def check(state, *, copy, source, dest, switch_first, disk=None):
    """Refuse `state` (StateError) unless it is the state of this mirror or evacuation of these
    images (identities as daemons.tree.identity makes them) and, when both name one, this disk."""
    directory = state.directory
    for label, saved, given in (("source", state.source, source), ("destination", state.dest, dest)):
        marked = saved.get("marked")
        saved = {k: v for k, v in saved.items() if k != "marked"}
        if saved == given:
            if marked:
                _check_mark(state, label, saved["image"])
            continue
        if saved.get("image") is not None and saved.get("image") == given.get("image") and \
                saved.get("inode") != given.get("inode") and saved.get("size") == given.get("size"):
            raise StateError(f"the state in {directory} is for the {label} {saved['image']} as it "
                             f"was when migration {state.migration} began (inode "
                             f"{saved.get('inode')}); that path now holds another file (inode "
                             f"{given.get('inode')}): it was replaced, and the state's regions "
                             "describe the old one. Put the original back, or give a new "
                             f"--state-dir to start a new migration ({SEE})")
        raise StateError(f"the state in {directory} belongs to another {label}: "
                         f"{describe(saved)}, not {describe(given)}")
    if disk is not None and state.disk is not None and disk != state.disk:
        raise StateError(f"the state in {directory} belongs to disk {state.disk}, not {disk}")
    if state.switch_first != switch_first:
        names = {True: "--switch-first", False: "a mirror (without --switch-first)"}
        raise StateError(f"the state in {directory} is for {names[state.switch_first]}, not "
                         f"{names[switch_first]}: the sides hold different things in the two modes")
    if state.copy != copy:
        raise StateError(f"the state in {directory} is for --copy {state.copy}, not --copy {copy}")
    return state


def refuse_taken(directory, *, source, dest, switch_first):
    """Before a new state in `directory`: refuse (StateError) an image another migration's state
    directory still names (its mark, see above); the source of an evacuation is only read."""
    directory = Path(directory).absolute()
    sides = (("destination", dest),) if switch_first else (("source", source), ("destination", dest))
    for label, identity in sides:
        if "inode" not in identity:
            continue
        found = _read_mark(identity["image"])
        if found is None:
            continue
        other = Path(found.get("state") or "")
        if not found.get("state") or other == directory or not _exists(other / STATE):
            continue                    # gone, handed back, or this very directory (empty)
        try:
            state = State.load(other)
            if state.migration != found.get("migration"):
                continue                # that directory holds another migration now
            # The side an ended migration left the disk on may be the source of the next one
            # (A -> B, then B -> C): it holds the disk, and a source is only read from.
            holds = {Phase.SWITCHED: state.dest, Phase.CANCELLED: state.source}.get(state.phase)
            if label == "source" and holds is not None and \
                    holds.get("image") == identity["image"]:
                continue
            what = f"phase {state.phase}"
        except StateError as e:
            what = f"its state cannot be read: {e}"
        raise StateError(f"the {label} {identity['image']} belongs to migration "
                         f"{found.get('migration')}, whose state is in {other} ({what}): a new "
                         "migration over it would copy or serve a side that may be stale. Resume "
                         f"that migration with --state-dir {other}; or, if it is over, remove "
                         f"{other} first ({SEE})")


def open_for(directory, *, copy, source, dest, size, region_size, switch_first=False,
             in_place=False, disk=None, migration=None):
    """The state for these sides: loaded if the directory has one (and it is theirs), created
    otherwise. Returns (state, resumed)."""
    state = load(directory)
    if state is not None:
        return check(state, copy=copy, source=source, dest=dest, switch_first=switch_first,
                     disk=disk), True
    return create(directory, copy=copy, source=source, dest=dest, size=size,
                  region_size=region_size, switch_first=switch_first, in_place=in_place,
                  disk=disk, migration=migration), False


# Helpers.

def _mark(identity, migration, directory):
    """Mark an image file with the migration's id and state directory; the identity says whether
    it is marked."""
    if "inode" not in identity:
        return identity
    value = json.dumps({"migration": migration, "state": str(Path(directory).absolute())})
    try:
        os.setxattr(identity["image"], MARK, value.encode())
    except OSError:
        return identity                 # a file system without user xattrs: path, size, inode
    return {**identity, "marked": True}


def _read_mark(path):
    """The mark of an image file ({"migration", "state"}), or None."""
    try:
        found = json.loads(os.getxattr(path, MARK))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _check_mark(state, label, path):
    found = (_read_mark(path) or {}).get("migration")
    if found == state.migration:
        return
    if found is None:
        why = "it carries no mark of this migration (was it restored or copied since?)"
    else:
        why = f"a later migration ({found}) has taken it since"
    raise StateError(f"the state in {state.directory} is migration {state.migration}'s, and the "
                     f"{label} {path} is no longer its: {why}; the state's regions do not describe "
                     "what that image holds now. Use the state directory of the migration that "
                     f"marked it, or a new --state-dir to start a new migration ({SEE})")


def _exists(path):
    try:
        path.lstat()
        return True
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None


def _read_owner(path):
    try:
        saved = json.loads(path.read_bytes())
        if saved.pop("checksum") != _checksum(saved):
            raise ValueError("checksum mismatch")
        if saved["format"] != FORMAT:
            raise ValueError(f"unknown format {saved['format']}")
        owner, files = saved["owner"], saved["files"]
        if not isinstance(owner, dict) or not owner.get("migration") or \
                not set(files) <= {HYDRATION, STATE} or STATE not in files:
            raise ValueError("no migration, or unknown files")
    except OSError as e:
        raise StateError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise StateError(f"{path} is corrupt ({e}); refusing to guess whose the state is "
                         f"({SEE})") from None
    return owner, files


def _same_owner(path, found, owner_path, owner):
    if found == owner:
        return
    if not isinstance(found, dict) or not found.get("migration"):
        raise StateError(f"{path} names no owner (written by an older mirrorfs?): it cannot be "
                         f"told from another migration's; refusing it ({SEE})")
    if found.get("migration") != owner.get("migration"):
        raise StateError(f"{path} belongs to another migration ({found['migration']}, of "
                         f"{describe(found['source'])} -> {describe(found['dest'])}) than "
                         f"{owner_path} ({owner['migration']}): files of two migrations are mixed "
                         f"in one state directory; put back this migration's own file ({SEE})")
    raise StateError(f"{path} and {owner_path} name migration {owner['migration']} with other "
                     f"images or disk; refusing it ({SEE})")


def _missing(directory, name, owner):
    what = f"migration {owner['migration']} of {describe(owner['source'])} -> " \
           f"{describe(owner['dest'])}"
    if name == HYDRATION:
        return (f"{directory / name} is missing ({OWNER} says {what} keeps it there): the "
                "destination holds changes the source lacks and only the map says where; "
                "hydrating again from zero would overwrite them with the source's data. Restore "
                f"the file; nothing restarts without it ({SEE})")
    return (f"{directory / name} is missing ({OWNER} says {what} keeps it there): nothing says "
            "which side holds which writes. Restore the file; if the migration was killed as it "
            "started, before it served anything, remove the directory to start over; else "
            f"recover by hand (GUARANTEES.md) ({SEE})")
