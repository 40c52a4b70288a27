"""What the operator asks of a served disk: one object from the CLI (or the Python API) to the
process tree, validated once, when it is made.

The options the data path shares with it (copy mode, policy, rate, region, I/O timeout) are checked by
the data path's own `DataPathOptions` (mirrorfs.datapath.options), which holds their allowed values:
`ServeOptions.datapath()` builds that object, whose `to_params()` become nbdkit's parameters.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

from mirrorfs.system import sockets
from mirrorfs.system.access import Access
from mirrorfs.datapath.options import (COPY_MODES, DEFAULT_IO_TIMEOUT, DEFAULT_REGION, POLICIES,
                                       DataPathOptions)
from mirrorfs.errors import UsageError
from mirrorfs.daemons.storage import CACHE_MODES

MAX_THREADS = 1024


@dataclass
class ServeOptions:
    socket: str | None = None           # unix socket path clients connect to
    listen: str | None = None           # HOST:PORT
    readonly: bool = False
    threads: int = 16                   # nbdkit worker threads per connection
    copy: str = "none"
    state_dir: str | None = None
    policy: str | None = None           # None: degrade with a state directory, else fail
    rate: int | None = None
    region: int | None = None
    io_timeout: float | None = None
    cache: str = "auto"
    access: Access = field(default_factory=Access)
    # The control socket of a `mirrorfs export` whose disk this serves (its socket is borrowed).
    take_over: str | None = None
    # The data path's copier starts held; the host budget (mirrorfs.host.budget) then sets its rate.
    hold_copy: bool = False

    def __post_init__(self):
        if self.take_over is not None and self.socket is not None:
            raise UsageError("--take-over serves the export's own socket; do not give --socket")
        if self.socket is None and self.listen is None and self.take_over is None:
            raise UsageError("give --socket PATH or --listen HOST:PORT (or both)")
        if not 1 <= self.threads <= MAX_THREADS:
            raise UsageError(f"--threads {self.threads}: expected 1 to {MAX_THREADS}")
        if self.copy not in COPY_MODES:
            raise UsageError(f"--copy {self.copy!r}: expected one of {', '.join(COPY_MODES)}")
        # degrade is only safe when what a degraded write leaves behind survives a crash: with a
        # state directory. Without one, a failing destination fails the client's request.
        self.policy = self.policy or ("degrade" if self.state_dir else "fail")
        if self.policy not in POLICIES:
            raise UsageError(f"--on-dest-error {self.policy!r}: expected one of {', '.join(POLICIES)}")
        if self.cache not in CACHE_MODES:
            raise UsageError(f"--cache {self.cache!r}: expected one of {', '.join(CACHE_MODES)}")
        if self.io_timeout is not None and (not math.isfinite(self.io_timeout) or self.io_timeout < 0):
            raise UsageError(f"--io-timeout {self.io_timeout}: expected seconds, 0 for none")
        self.socket_path = Path(self.socket).absolute() if self.socket else None
        if self.socket_path:
            sockets.check_unix_path(self.socket_path)
        self.listen_address = sockets.parse_listen(self.listen) if self.listen else None
        self.state_path = Path(self.state_dir).absolute() if self.state_dir else None
        # The data path's own checks (region, rate), on placeholder URIs: a mistake is found here,
        # before anything starts, not by nbdkit later.
        self.datapath("-", "-" if not self.readonly else None, None, 4096)

    def check_sides(self, has_dest):
        if self.readonly and has_dest:
            raise UsageError("--readonly serves the source alone; do not give a destination")
        if not self.readonly and not has_dest:
            raise UsageError("a destination is required (or --readonly to serve the source alone)")
        if self.state_path and not has_dest:
            raise UsageError("--state-dir keeps a mirror's state; it needs a destination")

    def datapath(self, source, dest, control, granularity):
        """The data path's options for these sides (NBD URIs) and lock granularity."""
        try:
            return DataPathOptions(
                source=source, dest=dest, control=control and str(control), copy=self.copy,
                state=str(self.state_path) if self.state_path and dest else None,
                policy=self.policy, rate=self.rate, region=self.region or DEFAULT_REGION,
                granularity=granularity,
                io_timeout=DEFAULT_IO_TIMEOUT if self.io_timeout is None else self.io_timeout,
                hold=True if self.hold_copy else None)
        except ValueError as e:
            raise UsageError(str(e)) from None
