"""The host run directory: where every mirrorfs process of the host says it exists, and what it copies.

    RUN_DIR/                    --run-dir, $MIRRORFS_RUN_DIR, /run/mirrorfs (root) or
                                $XDG_RUNTIME_DIR/mirrorfs; mode 0755, never writable by others
        disks/PID.json          one per process (export, serve, start): kind, control socket, uris
        copies/PID.json         one per copy running or queued (mirrorfs.host.budget)
        budget.json             the host's budget: rate, max copies, floor (mirrorfs.host.budget)

Every file is written whole (temp file, fsync, rename, fsync of the directory), so a reader sees the
old entry or the new one, never half of one. An entry names its process by pid *and* the process's
start time (/proc/PID/stat, field 22): an entry whose process is gone, or whose pid now belongs to
another process, is stale; readers skip it and remove it. So a process killed with SIGKILL
disappears from `mirrorfs list` at the next look, with nobody left to clean up after it.
"""

import json
import os
import stat
import tempfile
import time
from pathlib import Path

from mirrorfs.errors import UsageError

ENV = "MIRRORFS_RUN_DIR"
DISKS = "disks"
COPIES = "copies"


def default_path():
    """$MIRRORFS_RUN_DIR; else /run/mirrorfs for root, $XDG_RUNTIME_DIR/mirrorfs for others (or
    /tmp/mirrorfs-UID without one)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    if os.geteuid() == 0:
        return Path("/run/mirrorfs")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "mirrorfs"
    return Path(tempfile.gettempdir()) / f"mirrorfs-{os.getuid()}"


def process_start(pid):
    """The start time of process `pid` (clock ticks since boot), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after its end.
    return int(text[text.rindex(")") + 2:].split()[19])


def process_running(pid, start):
    """Whether process `pid` still runs and is the one that started at `start` (a pid reused since
    is another process). A zombie does not run: it has exited, and only waits for its parent."""
    if start is None or process_start(pid) != start:
        return False
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return text[text.rindex(")") + 2:].split()[0] != "Z"


def write_atomically(path, data):
    """Write `data` (a dict, as JSON) to `path` so that a reader sees the old content or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def check_dir(path, what, risk="another user could register disks or change the budget"):
    """Whether the directory `path` exists (False if not); UsageError if it is not a directory,
    is writable by others (`risk` says what they could do) or belongs to another user."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{what} {path} is not a directory")
    if st.st_mode & stat.S_IWOTH:
        raise UsageError(f"{what} {path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                         f"{risk}")
    if st.st_uid not in (0, os.geteuid()):
        raise UsageError(f"{what} {path} belongs to uid {st.st_uid}, not to this user or root")
    return True


class RunDir:
    """    run = RunDir(path)                 # checked; created (0755) with create=True
           run.register(DISKS, {...})         # this process's entry; run.unregister(DISKS)
           for entry in run.entries(DISKS):   # live entries only, oldest first
    """

    def __init__(self, path=None, create=True):
        self.path = Path(path) if path is not None else default_path()
        self.path = self.path.absolute()
        if not check_dir(self.path, "run directory"):
            if not create:
                raise UsageError(f"run directory {self.path} does not exist (no mirrorfs process "
                                 "registered here)")
            old = os.umask(0o022)
            try:
                self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
            finally:
                os.umask(old)
            check_dir(self.path, "run directory")
        for sub in (DISKS, COPIES):
            d = self.path / sub
            if not check_dir(d, "run directory entry") and create:
                d.mkdir(mode=0o755, exist_ok=True)

    def file(self, name):
        return self.path / name

    def register(self, kind, entry, pid=None):
        """Write this process's entry of `kind` (DISKS or COPIES); the identity fields are added."""
        pid = pid or os.getpid()
        write_atomically(self.path / kind / f"{pid}.json",
                         {**entry, "pid": pid, "process_start": process_start(pid)})

    def unregister(self, kind, pid=None):
        (self.path / kind / f"{pid or os.getpid()}.json").unlink(missing_ok=True)

    def entries(self, kind):
        """The live entries of `kind`, ordered by their "since" field (then pid); stale ones removed."""
        found = []
        directory = self.path / kind
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            path = directory / name
            try:
                entry = json.loads(path.read_text())
                pid = int(entry["pid"])
            except FileNotFoundError:
                continue                # removed meanwhile
            except (ValueError, KeyError, TypeError):
                continue                # not ours to judge or remove
            if process_start(pid) != entry.get("process_start"):
                try:
                    path.unlink()
                except (FileNotFoundError, PermissionError):
                    pass
                continue
            found.append(entry)
        return sorted(found, key=lambda e: (e.get("since", 0), e["pid"]))


class Registration:
    """A served disk's entry in the run directory, for as long as the `with` block runs."""

    def __init__(self, rundir, kind, control, uris, **extra):
        self.rundir = rundir
        self.entry = {"kind": kind, "control": str(control) if control else None,
                      "uris": list(uris), "since": time.time(), **extra}

    def __enter__(self):
        self.rundir.register(DISKS, self.entry)
        return self

    def __exit__(self, *exc):
        self.rundir.unregister(DISKS)
