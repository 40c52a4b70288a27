"""The registry of named disks: one durable record per disk, the host's memory of which chain each
name *is* (issue #26).

    REGISTRY/                   --registry, $MIRRORFS_REGISTRY, /var/lib/mirrorfs/disks (root), else
                                $XDG_STATE_HOME/mirrorfs/disks (~/.local/state/mirrorfs/disks)
        .lock                   flock(2)ed exclusively around every change, by every process
        NAME.json               the record of the disk NAME

A record (format "mirrorfs-disk/1"):

    name, id                    the name, and a random id made at `add` (the disk's identity: state
                                files of its migrations name it)
    socket, size                where it is served, its virtual size
    chain                       what the disk is now, top first: [{"path", "format"}]
    lent                        null, or the migration it is lent to: {"migration", "pid", "start",
                                "control", "state_dir", "serving": "source"|"destination", "source":
                                chain, "destination": chain, "evacuation"}
    retired                     images no disk may serve again: [{"path", "migration", "time", "why"}]
    history                     the last HISTORY events: [{"time", "event", ...}]
    generation                  +1 per change
    checksum                    sha256 of the rest: a record damaged on disk is refused, never guessed

Why a file per disk, written whole (temp file, fsync, rename, fsync of the directory): a crash leaves
the old record or the new one, and one damaged record takes down one disk, not the host. Why a lock
shared by every process rather than the service alone: a migration records its switch itself (the
switch's commit point), and must be able to while the service is dead or restarting.

Every transition of a loan is recorded *before* anything is served from the chain it leads to, so
after any crash the record names a chain that holds every acknowledged write:

    add ──▶ lend ──▶ switched ──▶ returned          (pivot, hand-back)
              │  ╲──▶ cancelled ──▶ returned        (cancel, hand-back)
              ╰──────▶ taken_back                   (the borrower died; the host serves `serving`)

What a loan leaves behind (the side that lost) is *retired*: `add`, and every check of `owner`, refuse
it with the name of the disk and its chain, so neither a unit file, a script nor a typo can bring old
data back.
"""

import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

from mirrorfs.errors import Error, UsageError
from mirrorfs.host.grouprecord import GroupRecord, GroupRecordError
from mirrorfs.host.rundir import check_dir, process_running, process_start, write_atomically
from mirrorfs.sides import images

FORMAT = "mirrorfs-disk/1"
ENV = "MIRRORFS_REGISTRY"
LOCK = ".lock"
HISTORY = 100
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
SIDES = ("source", "destination")
# Fields every record has, with the type each must be: a record missing one is refused as corrupt.
FIELDS = {"format": str, "name": str, "id": str, "socket": str, "size": int, "chain": list,
          "lent": (dict, type(None)), "retired": list, "history": list, "generation": int}


class RecordError(Error):
    """A record that cannot be trusted (corrupt, unknown format, another name): its disk is not served."""


def default_path():
    """$MIRRORFS_REGISTRY; else /var/lib/mirrorfs/disks for root, else the user's state directory."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if os.geteuid() == 0:
        return Path("/var/lib/mirrorfs/disks")
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "mirrorfs" / "disks"


def check_name(name):
    if not isinstance(name, str) or not NAME.match(name):
        raise UsageError(f"disk name {name!r}: expected 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _real(path):
    """A layer's identity: its canonical path (an RBD spec is its own identity)."""
    path = os.fspath(path)
    return path if path.startswith("rbd:") else os.path.realpath(path)


def paths(chain):
    return [layer["path"] for layer in chain or ()]


def top(record):
    """The image the disk's clients write to now (the top of its current chain)."""
    return record["chain"][0]["path"] if record["chain"] else None


def chain_of(image):
    """The record's spelling of the chain of `image` (an ImageInfo): every layer with its format."""
    formats = image.formats or (image.format,) + ("",) * (len(image.chain) - 1)
    return [{"path": os.fspath(p), "format": f} for p, f in zip(image.chain, formats)]


def check_chain(chain, what):
    """A chain given by another process: a non-empty list of {"path": absolute, "format": str}."""
    if (not isinstance(chain, list) or not chain
            or not all(isinstance(layer, dict) and isinstance(layer.get("path"), str)
                       and isinstance(layer.get("format"), str) and layer["path"]
                       and (layer["path"].startswith("rbd:") or os.path.isabs(layer["path"]))
                       for layer in chain)):
        raise UsageError(f"{what}: expected a chain, top first: [{{\"path\": ABSOLUTE, \"format\": ...}}]")
    return [{"path": layer["path"], "format": layer["format"]} for layer in chain]


def describe(record):
    """'vm1 (chain /a/top.qcow2 <- /a/base.raw)': how refusals name a disk."""
    return f"{record['name']} (chain {' <- '.join(paths(record['chain'])) or 'empty'})"


# What another user could do with a registry it may write (rundir.check_dir refuses that).
RISK = "another user could change which images a disk serves"


def borrower_alive(lent):
    """Whether the process a loan names still runs: same pid *and* same start time, so a recycled
    pid is not mistaken for the borrower."""
    return bool(lent) and process_running(lent["pid"], lent.get("start"))


def _now():
    return round(time.time(), 3)


class Registry:
    """    reg = Registry(path)                    # created (0755) unless create=False
           reg.add("vm1", "/srv/a/vm1.qcow2", "/run/vm1.sock")
           rec = reg.get("vm1")                    # RecordError if damaged
           good, bad = reg.scan()                  # every record; the damaged ones as (file, error)
           reg.lend(...); reg.switched(...); reg.returned(...)

    Reads need no lock (records are replaced whole); every change holds REGISTRY/.lock.
    """

    def __init__(self, path=None, create=True):
        self.path = Path(path if path is not None else default_path()).absolute()
        if not check_dir(self.path, "registry", RISK):
            if not create:
                raise UsageError(f"registry {self.path} does not exist (no disk was added)") from None
            old = os.umask(0o022)
            try:
                self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"cannot create the registry {self.path}: {e.strerror}") from None
            finally:
                os.umask(old)
            check_dir(self.path, "registry", RISK)

    def file(self, name):
        return self.path / f"{name}.json"

    # Reading.

    def names(self):
        try:
            entries = os.listdir(self.path)
        except OSError as e:
            raise UsageError(f"cannot read the registry {self.path}: {e.strerror}") from None
        return sorted(n[:-5] for n in entries if n.endswith(".json") and not n.startswith("."))

    def get(self, name):
        """The record of `name`; UsageError if there is none, RecordError if it cannot be trusted."""
        check_name(name)
        path = self.file(name)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UsageError(f"no disk named {name} in {self.path}") from None
        except OSError as e:
            raise RecordError(f"{path}: cannot read: {e.strerror}") from None
        return self._parse(path, name, text)

    def _parse(self, path, name, text):
        try:
            record = json.loads(text)
        except ValueError:
            raise RecordError(f"{path}: corrupt record (not JSON); restore it from a backup or "
                              "remove it and add the disk again") from None
        if not isinstance(record, dict):
            raise RecordError(f"{path}: corrupt record (not an object)")
        if record.get("format") != FORMAT:
            raise RecordError(f"{path}: unknown record format {record.get('format')!r} (this mirrorfs "
                              f"reads {FORMAT!r})")
        checksum = record.pop("checksum", None)
        if checksum != _checksum(record):
            raise RecordError(f"{path}: corrupt record (checksum mismatch); restore it from a backup "
                              "or remove it and add the disk again")
        for field, kind in FIELDS.items():
            if not isinstance(record.get(field), kind):
                raise RecordError(f"{path}: corrupt record (field {field!r} missing or wrong)")
        if record["name"] != name:
            raise RecordError(f"{path}: the record is of the disk {record['name']!r}, not {name!r} "
                              "(renamed by hand?); rename it back")
        return record

    def scan(self):
        """(records, damaged): every readable record by name, and (file, one-line error) for the
        others. The service serves the first and reports the second."""
        good, bad = [], []
        for name in self.names():
            try:
                good.append(self.get(name))
            except UsageError as e:
                if self.file(name).exists():    # removed meanwhile: nothing to report
                    bad.append((self.file(name), str(e)))
            except RecordError as e:
                bad.append((self.file(name), str(e)))
        return good, bad

    def records(self):
        return self.scan()[0]

    def owner(self, path, exclude=None):
        """(record, role) of the disk that holds the image `path` — role "current", "lent source",
        "lent destination" or "retired" — or None. A damaged record may own it: refused (RecordError)."""
        want = _real(path)
        good, bad = self.scan()
        for record in good:
            if record["name"] == exclude:
                continue
            role = role_of(record, want)
            if role:
                return record, role
        if bad:
            raise RecordError(f"cannot tell whether {path} belongs to another disk: {bad[0][1]}")
        return None

    # Changing.

    @contextmanager
    def locked(self):
        """The registry's exclusive lock (blocking): every read-modify-write of records holds it."""
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _save(self, record, event, **details):
        record["generation"] += 1
        record["history"] = (record["history"] + [{"time": _now(), "event": event, **details}])[-HISTORY:]
        record.pop("checksum", None)
        try:
            write_atomically(self.file(record["name"]), {**record, "checksum": _checksum(record)})
        except OSError as e:
            raise Error(f"cannot write {self.file(record['name'])}: {e.strerror}") from None
        return record

    def _refuse_owned(self, chain, name, socket=None):
        """Refuse a chain with a layer another disk holds in any role, or a socket another disk uses."""
        good, bad = self.scan()
        if bad:
            raise RecordError(f"cannot check that no other disk holds these images: {bad[0][1]}")
        for record in good:
            if record["name"] == name:
                retired = {_real(r["path"]) for r in record["retired"]}
                for layer in chain:
                    if _real(layer["path"]) in retired:
                        raise UsageError(f"{layer['path']} is a retired image of the disk "
                                         f"{describe(record)}: it does not hold the disk's writes")
                continue
            if socket is not None and _real(record["socket"]) == _real(socket):
                raise UsageError(f"socket {socket} is the disk {describe(record)}'s")
            for layer in chain:
                role = role_of(record, _real(layer["path"]))
                if role:
                    raise UsageError(f"{layer['path']} belongs to the disk {describe(record)} "
                                     f"({role}); it cannot be served as another disk")

    def add(self, name, image, socket):
        """Record a new disk `name` serving `image` (its chain and formats detected) on `socket`."""
        check_name(name)
        socket = os.path.abspath(socket)
        # -U: an image another disk's daemon has open is named as that disk's below, not refused
        # for its lock; an image some other process has open fails when its daemon starts.
        info = images.info(image, force_share=True)
        chain = chain_of(info)
        with self.locked():
            if self.file(name).exists():
                raise UsageError(f"a disk named {name} exists already ({self.file(name)})")
            self._refuse_owned(chain, name, socket)
            record = {"format": FORMAT, "name": name, "id": secrets.token_hex(8), "socket": socket,
                      "size": info.virtual_size, "chain": chain, "lent": None, "retired": [],
                      "history": [], "generation": 0}
            return self._save(record, "added", chain=paths(chain))

    def remove(self, name):
        """Forget the disk (its images are left alone); refused while it is lent to a migration."""
        with self.locked():
            record = self.get(name)
            if record["lent"]:
                raise UsageError(f"the disk {name} is lent to migration {record['lent']['migration']}; "
                                 "end the migration (hand-back or cancel) first")
            try:
                self.file(name).unlink()
            except OSError as e:
                raise Error(f"cannot remove {self.file(name)}: {e.strerror}") from None
            _fsync_dir(self.path)
            return record

    def lend(self, name, *, migration, pid, control, state_dir, source, destination,
             evacuation=False, start=None):
        """Record that migration `migration` (process `pid`) borrows the disk. Refused while a live
        borrower holds it; a dead borrower's loan is resumed only by the same migration."""
        if not isinstance(migration, str) or not migration:
            raise UsageError("lend: the migration's id is missing")
        source = check_chain(source, "lend: source")
        destination = check_chain(destination, "lend: destination")
        start = start if start is not None else process_start(pid)
        if start is None:
            raise UsageError(f"lend: no process {pid}")
        with self.locked():
            record = self.get(name)
            _refuse_taken_back(record, migration)
            lent = record["lent"]
            if lent and lent["migration"] != migration:
                if borrower_alive(lent):
                    raise UsageError(f"the disk {name} is lent to migration {lent['migration']} "
                                     f"(pid {lent['pid']}) already")
                raise UsageError(f"the disk {name} is still lent to migration {lent['migration']}, "
                                 f"whose process (pid {lent['pid']}) died; resume that migration, or "
                                 "wait for the host service to take the disk back")
            if lent and borrower_alive(lent) and lent["pid"] != pid:
                raise UsageError(f"the disk {name} is lent to migration {migration} already, in a "
                                 f"running process (pid {lent['pid']})")
            self._refuse_owned(source + destination, name)
            if lent:        # the same migration, resumed: its side stays what was recorded
                lent.update(pid=pid, start=start, control=control, state_dir=state_dir)
                return self._save(record, "lent", migration=migration, pid=pid, resumed=True)
            record["lent"] = {"migration": migration, "pid": pid, "start": start, "control": control,
                              "state_dir": state_dir, "serving": "source", "source": source,
                              "destination": destination, "evacuation": bool(evacuation)}
            return self._save(record, "lent", migration=migration, pid=pid,
                              source=paths(source), destination=paths(destination))

    def _loan(self, name, migration, what):
        record = self.get(name)
        lent = record["lent"]
        if not lent or lent["migration"] != migration:
            holder = f"migration {lent['migration']}" if lent else "no migration"
            raise UsageError(f"{what}: the disk {name} is lent to {holder}, not to {migration}")
        return record, lent

    def join_group(self, name, migration, group):
        """The loan is one member of a group migration (control.group) whose commit record is the
        file `group`: from now on the side the loan ends on, if its borrower dies, is the one
        that record says (`serving_side`), whatever this record's `serving` says: the members'
        records are updated one after the other, the group's record once for all of them."""
        with self.locked():
            record, lent = self._loan(name, migration, "group")
            if lent.get("group") == str(group):
                return record
            lent["group"] = str(group)
            return self._save(record, "grouped", migration=migration, group=str(group))

    def switched(self, name, migration):
        """The migration switched to the destination: from now on the disk *is* the destination's
        chain. Called inside the switch, before any request is served from the destination."""
        with self.locked():
            record, lent = self._loan(name, migration, "switched")
            lent["serving"] = "destination"
            record["chain"] = lent["destination"]
            return self._save(record, "switched", migration=migration, chain=paths(record["chain"]))

    def reverted(self, name, migration):
        """A revert under the safety net (a named disk's, or a group's: control.group): reads
        come from the source again, which holds every write since the pivot: the disk is the
        source's chain again, the loan goes on. Nothing changes (and nothing is written) when the
        record says so already."""
        with self.locked():
            record, lent = self._loan(name, migration, "reverted")
            if lent["serving"] == "source" and record["chain"] == lent["source"]:
                return record
            lent["serving"] = "source"
            record["chain"] = lent["source"]
            return self._save(record, "reverted", migration=migration, chain=paths(record["chain"]))

    def cancelled(self, name, migration):
        """The migration was cancelled: the disk is the source's chain (the new source overlay)."""
        with self.locked():
            record, lent = self._loan(name, migration, "cancelled")
            lent["serving"] = "source"
            record["chain"] = lent["source"]
            return self._save(record, "cancelled", migration=migration, chain=paths(record["chain"]))

    def returned(self, name, migration, chain):
        """Hand-back: the loan ends on `chain`; every image of the loan not in it is retired."""
        chain = check_chain(chain, "returned: chain")
        with self.locked():
            record, lent = self._loan(name, migration, "returned")
            other = "source" if lent["serving"] == "destination" else "destination"
            loser = lent[other][0]["path"]
            if _real(loser) in {_real(p) for p in paths(chain)}:
                raise UsageError(f"returned: the disk {name} serves the {lent['serving']} since "
                                 f"{'its switch' if other == 'source' else 'the loan'}; {loser} "
                                 "does not hold its writes")
            self._refuse_owned(chain, name)
            self._end_loan(record, lent, chain, "handed back")
            return self._save(record, "handed-back", migration=migration, chain=paths(chain))

    def undone(self, name, migration, chain):
        """The loan's start was undone (a group whose other member failed to start, control.group):
        the disk is `chain` again, the chain from before the loan, and nothing of the loan
        remains (its overlays were removed, what its clients wrote was committed into the chain
        first), so nothing is retired: the record is as it was before the loan but for its
        history."""
        chain = check_chain(chain, "undone: chain")
        with self.locked():
            record, lent = self._loan(name, migration, "undone")
            before = lent["source"][0 if lent["evacuation"] else 1:]
            if lent["serving"] != "source" or paths(chain) != paths(before):
                raise UsageError(f"undone: the disk {name} serves the {lent['serving']} of "
                                 f"migration {migration}, not {' <- '.join(paths(chain))}")
            record["chain"] = chain
            record["lent"] = None
            return self._save(record, "start-undone", migration=migration, chain=paths(chain))

    def taken_back(self, name, migration):
        """The borrower died: the loan ends on the side it was serving (the source's overlay if it
        exists, else the chain from before the loan). A later resume of that migration is refused."""
        with self.locked():
            record, lent = self._loan(name, migration, "take back")
            if borrower_alive(lent):
                raise UsageError(f"the disk {name}'s borrower (pid {lent['pid']}) is alive")
            serving = serving_side(lent)
            chain = lent[serving]
            if serving == "source" and not _exists(chain[0]["path"]):
                chain = record["chain"]
            self._end_loan(record, lent, chain, "taken back")
            return self._save(record, "taken-back", migration=migration, pid=lent["pid"],
                              serving=serving, state_dir=lent["state_dir"],
                              chain=paths(chain))

    def _end_loan(self, record, lent, chain, why):
        keep = {_real(p) for p in paths(chain)}
        retired = {_real(r["path"]) for r in record["retired"]}
        for path in paths(lent["source"]) + paths(lent["destination"]) + paths(record["chain"]):
            if _real(path) not in keep and _real(path) not in retired:
                retired.add(_real(path))
                record["retired"].append({"path": path, "migration": lent["migration"],
                                          "time": _now(), "why": why})
        record["chain"] = chain
        record["lent"] = None


def serving_side(lent):
    """The side a loan serves: its `serving`, unless it is a member of a group whose commit record
    (control.group) ended the group: then the group's end, for every member alike. A group record
    that cannot be read is an error: guessing could put members on different sides."""
    group = lent.get("group")
    if not group:
        return lent["serving"]
    try:
        saved = GroupRecord(group).load()
    except GroupRecordError as e:
        raise RecordError(f"migration {lent['migration']}: {e}") from None
    if saved is None:
        return lent["serving"]          # not written yet: no member switched
    ends = {"switched": "destination", "cancelled": "source"}
    return ends.get(saved["end"]) or (saved.get("serving") if saved.get("serving") in SIDES
                                      else lent["serving"])


def role_of(record, real):
    """The role the image `real` (a canonical path) plays for the disk of `record`, or None."""
    if real in {_real(p) for p in paths(record["chain"])}:
        return "current"
    lent = record.get("lent")
    if lent:
        for side in SIDES:
            if real in {_real(p) for p in paths(lent[side])}:
                return f"lent {side}"
    if real in {_real(r["path"]) for r in record["retired"]}:
        return "retired"
    return None


def _refuse_taken_back(record, migration):
    for event in reversed(record["history"]):
        if event.get("event") == "taken-back" and event.get("migration") == migration:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
            raise UsageError(
                f"the disk {record['name']} was taken back from migration {migration} at {when} "
                f"after its process died; the state in {event.get('state_dir') or '(no state directory)'} "
                f"is stale: the disk took writes the migration never saw; remove that state and "
                "start a new migration")


def _exists(path):
    return path.startswith("rbd:") or os.path.exists(path)


def _fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
