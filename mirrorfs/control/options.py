"""What the operator asks of a served disk: one object from the CLI (or the Python API) to the
process tree, validated once, when it is made, on the values the operator gave.

Every rule of an operator's option lives here, in `ServeOptions`, the class that defines the
option (the data path's allowed values, COPY_MODES, POLICIES, MIN_REGION, are stated once in
mirrorfs.datapath.options and used here). The two rules that need what only the sides can say run
once too, when the process tree knows it: `check_sides` (is there a destination) and `datapath()`
(the destination's cluster size, against an evacuation's --region). `datapath()` builds the data
path's options (`DataPathOptions`) from the real URIs; its `to_params()` become nbdkit's
parameters, which the data path parses without checking the operator's rules again.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from mirrorfs.common.sizes import rate_value
from mirrorfs.system import sockets
from mirrorfs.system.access import Access
from mirrorfs.datapath.options import (COPY_MODES, DEFAULT_HYDRATION_REGION, DEFAULT_IO_TIMEOUT,
                                       DEFAULT_REGION, MIN_REGION, POLICIES, DataPathOptions)
from mirrorfs.errors import UsageError
from mirrorfs.daemons.storage import check_cache

# nbdkit worker threads per client connection: 16 keep a client's queue depth of 16 in parallel.
DEFAULT_THREADS = 16
MAX_THREADS = 1024


@dataclass
class ServeOptions:
    socket: str | None = None           # unix socket path clients connect to
    listen: str | None = None           # HOST:PORT
    readonly: bool = False
    threads: int = DEFAULT_THREADS      # nbdkit worker threads per connection
    copy: str = "none"
    state_dir: str | None = None
    policy: str | None = None           # None: degrade with a state directory, else fail
    rate: int | None = None
    region: int | None = None
    io_timeout: float | None = None
    cache: str = "auto"
    # Both image sides in one storage daemon (daemons.storage.SharedStorageDaemon): cheaper per
    # write, one failure domain.
    one_daemon: bool = False
    access: Access = field(default_factory=Access)
    # The control socket of a `mirrorfs export` whose disk this serves (its socket is borrowed).
    take_over: str | None = None
    # The named disk (mirrorfs.host.registry) borrowed from the host service: served on its socket.
    disk: str | None = None
    # The migration's id (control.lender.migration_id), which the disk's record names while lent:
    # the id a new state directory is made with.
    migration: str | None = None
    # Evacuation: the destination serves from the start, the source is opened read-only and
    # hydrated into it in the background (mirrorfs.datapath.evacuation.evacuee).
    switch_first: bool = False
    # With switch_first: a client's read of a region not hydrated hydrates it too.
    copy_on_read: bool = False
    # The data path's copier starts held; the host budget (mirrorfs.host.budget) then sets its rate.
    hold_copy: bool = False
    # The bounded lag (mirrorfs.datapath.mirror.lag): bytes of acknowledged changes the destination may
    # lack; 0: synchronous.
    lag: int = 0

    def __post_init__(self):
        if self.take_over is not None and self.socket is not None:
            raise UsageError("--take-over serves the export's own socket; do not give --socket")
        if self.disk is not None and (self.socket is not None or self.take_over is not None):
            raise UsageError(f"the disk {self.disk} is served on its own socket, lent by the host "
                             "service: do not give --socket or --take-over")
        if self.socket is None and self.listen is None and self.take_over is None \
                and self.disk is None:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
        if not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads {self.threads}: expected a positive number up to {MAX_THREADS}")
        # degrade is only safe when what a degraded write leaves behind survives a crash: with a
        # state directory. Without one, a failing destination fails the client's request.
        self.policy = self.policy or ("degrade" if self.state_dir else "fail")
        if self.switch_first and self.readonly:
            raise UsageError("--switch-first writes the destination; it cannot be --readonly")
        if self.switch_first and not self.state_dir:
            raise UsageError("--switch-first needs --state-dir: the hydration map says which "
                             "regions the destination holds, and must survive a crash")
        if self.one_daemon and self.switch_first:
            raise UsageError("--one-daemon cannot be used with --switch-first: an evacuation's "
                             "source may be failing, and must not share the destination's daemon")
        if self.lag and self.readonly:
            raise UsageError("--lag lets a destination fall behind; --readonly serves the source "
                             "alone")
        if self.one_daemon and self.readonly:
            raise UsageError("--one-daemon shares a daemon between two sides; --readonly serves one")
        check_cache(self.cache)
        self.socket_path = Path(self.socket).absolute() if self.socket else None
        if self.socket_path:
            sockets.check_unix_path(self.socket_path)
        self.listen_address = sockets.parse_listen(self.listen) if self.listen else None
        self.state_path = Path(self.state_dir).absolute() if self.state_dir else None
        if self.state_path is not None:
            check_state_dir(self.state_path)
        self._check_copying()

    def _check_copying(self):
        """The rules of what the data path copies, and how: the copy mode, the policy, the rate,
        the region, the lag, the I/O timeout, and what an evacuation needs."""
        if self.copy not in COPY_MODES:
            raise UsageError(f"--copy {self.copy!r}: expected one of {', '.join(COPY_MODES)}")
        if self.policy not in POLICIES:
            raise UsageError(f"--on-dest-error {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.readonly and self.copy == "full":
            raise UsageError("--copy full copies the source to a destination; --readonly serves "
                             "the source alone")
        try:
            self.rate = rate_value(self.rate, "--rate", unlimited="None")
        except ValueError as e:
            raise UsageError(str(e)) from None
        if self.region is not None and (not _whole(self.region) or self.region < MIN_REGION or
                                        self.region & (self.region - 1)):
            raise UsageError(f"--region {self.region!r}: expected a power of two of at least 1 MiB")
        if self.copy_on_read and not self.switch_first:
            raise UsageError("--copy-on-read hydrates the regions a client reads in an "
                             "evacuation: it needs --switch-first")
        if self.switch_first and self.copy != "full":
            raise UsageError("--switch-first copies the whole source in the background: give "
                             "--copy full")
        if not _whole(self.lag) or self.lag < 0:
            raise UsageError(f"--lag {self.lag!r}: expected a size, 0 for none")
        if self.lag and self.switch_first:
            raise UsageError("--lag lets the destination fall behind the source; with "
                             "--switch-first the destination takes every write first: there is "
                             "nothing to lag")
        if self.lag and not self.state_dir:
            raise UsageError("--lag needs --state-dir: the changes acknowledged before the "
                             "destination has them are known only to the dirty map there, and "
                             "must survive a crash")
        if self.io_timeout is not None and (isinstance(self.io_timeout, bool) or
                                            not isinstance(self.io_timeout, (int, float)) or
                                            not math.isfinite(self.io_timeout) or
                                            self.io_timeout < 0):
            raise UsageError(f"--io-timeout {self.io_timeout!r}: expected seconds, 0 for none")

    def check_sides(self, has_dest):
        if self.readonly and has_dest:
            raise UsageError("--readonly serves the source alone; do not give a destination")
        if not self.readonly and not has_dest:
            raise UsageError("a destination is required (or --readonly to serve the source alone)")
        if self.state_path and not has_dest:
            raise UsageError("--state-dir keeps a mirror's state; it needs a destination")

    def datapath(self, source, dest, control, granularity):
        """The data path's options for these sides (NBD URIs) and lock granularity: built once,
        by the process tree, from the real sides. An evacuation's regions are whole clusters of
        the destination (`granularity`), the one rule that needs it."""
        region = self.region or (DEFAULT_HYDRATION_REGION if self.switch_first else DEFAULT_REGION)
        if self.switch_first and region % granularity:
            raise UsageError(f"--region {region}: with --switch-first, a multiple of the "
                             f"destination's cluster size ({granularity})")
        return DataPathOptions(
            source=source, dest=dest, control=control and str(control), copy=self.copy,
            state=str(self.state_path) if self.state_path and dest else None,
            policy=self.policy, rate=self.rate, region=region, granularity=granularity,
            switch_first=self.switch_first, copy_on_read=self.copy_on_read,
            io_timeout=DEFAULT_IO_TIMEOUT if self.io_timeout is None else float(self.io_timeout),
            hold=True if self.hold_copy else None, lag=self.lag)


def _whole(value):
    """An int, not a bool (True is 1 to Python, and --lag True is no size)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_state_dir(path):
    """A state directory that exists, or that can be made in a directory that exists: checked
    before anything starts, and said in one line (`--state-dir notes.txt/sub` once said "does not
    exist" instead of naming notes.txt as no directory). Nothing is created here; the state makes
    the directory when it first saves (datapath.statedir.open_for), and what only mkdir can tell
    (a /proc or read-only file system) is one line from there."""
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--state-dir {path}: not a directory")
        return
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UsageError(f"--state-dir {path}: {ancestor} is not a directory")
    if ancestor != path.parent:
        raise UsageError(f"state directory {path}: {path.parent} does not exist")
