"""A group migration's commit record (control.group): STATE_DIR/group.json.

    {"format": "mirrorfs-group/1", "members": [names], "migrations": {name: id},
     "end": null | "switched" | "cancelled", "serving": "source" | "destination", ...,
     "checksum": sha256 of the rest}

The one fact that puts every member of a group on the same side: the group writes it durably, once
per switch, while every member holds its requests, and only then lets them go; a restart of the
group applies it to every member, and the host service's take-back of a dead group reads it
(registry.serving_side). Two readers, one owner: both read it through `GroupRecord.load`, which
refuses a record that is corrupt (checksum), of another format or of the wrong shape, because
guessing could put members on different sides.

Written whole (temp file, fsync, rename, fsync of the directory: rundir.write_atomically).
"""

import hashlib
import json
from pathlib import Path

from mirrorfs.errors import Error
from mirrorfs.host.rundir import write_atomically

FORMAT = "mirrorfs-group/1"
NAME = "group.json"
ENDS = (None, "switched", "cancelled")


class GroupRecordError(Error):
    """A group record that cannot be read or trusted."""


def _checksum(fields):
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class GroupRecord:
    """The record at `path` (a file: STATE_DIR/group.json)."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self):
        """The record's fields (without format and checksum), or None if there is none yet."""
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise GroupRecordError(f"{self.path}: cannot read the group's record ({e}); refusing "
                                   "to guess which side its members are on") from None
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise GroupRecordError(f"{self.path}: not a group's record ({FORMAT}); refusing to "
                                   "guess which side its members are on")
        checksum = saved.pop("checksum", None)
        if checksum != _checksum(saved):
            raise GroupRecordError(f"{self.path}: the group's record is corrupt (checksum "
                                   "mismatch); refusing to guess which side its members are on")
        if not isinstance(saved.get("members"), list) or saved.get("end") not in ENDS:
            raise GroupRecordError(f"{self.path}: not a group's record (no members, or an end "
                                   f"of {saved.get('end')!r}); refusing to guess which side its "
                                   "members are on")
        del saved["format"]
        return saved

    def write(self, fields):
        record = {"format": FORMAT, **fields}
        try:
            write_atomically(self.path, {**record, "checksum": _checksum(record)})
        except OSError as e:
            raise GroupRecordError(f"cannot write the group's record {self.path}: "
                                   f"{e.strerror or e}") from None
