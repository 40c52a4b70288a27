"""The background copy's contract: what the data path's service (datapath.nbdkit.service) asks of
the copy that runs behind the clients, whichever mode runs it. Both implement it: the mirror's
`Copier` (datapath.mirror.copier: the first pass and the regions to copy again) and the
evacuation's `Hydrator` (datapath.evacuation.hydrator: every region not hydrated yet).

    copy.start()                 its workers, after nbdkit's fork
    copy.set_rate(rate)          its limit from now on: None, 0 (held), or bytes/s (the host
                                 budget's share, through the data path's `set-rate`)
    copy.rate                    that limit
    copy.copying                 whether it has anything left to copy (the host budget's probe)
    copy.status()                the skeleton below, and its own keys
    copy.stop()                  its workers stop after what they copy now (a chunk waiting for
                                 its rate is given up)
    copy.wait(timeout)           whether every worker ended within `timeout`
    copy.section                 the key of the data path's status its status goes under

The status skeleton: `workers`, `bytes_read` (data read from the source and written),
`bytes_zeroed` (zero extents written as zero requests), `rate_limit`, `paid_bytes` (what its
pacer was paid: the host budget measures a copy by it). Each adds its own keys (the copier its
first pass, failures and synchronization; the hydrator its rate, failed regions and end).

One pacer per copy (common.pacing): every worker reserves its bytes there before it copies,
outside its range lock, so a copy waiting for its rate holds no client write.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import threading
import time

from mirrorfs.common.pacing import Paced, Pacer


class BackgroundCopy(Paced):
    """The contract (above) and what both copies share. A copy sets `section` and `name`,
    calls this constructor, and implements `_run(index)` (one worker's loop, until `_stop` is
    set), `copying` and `_own_status`."""

    section = None                  # "copy" or "hydrator"
    name = "copy"                   # its threads' names: "<name> <index>"

    def __init__(self, disk, rate=None, workers=1):
        self.disk = disk
        # The limit, bytes per second (None: none; 0: held, the host's copies are queued): the
        # operator's --rate, then the host budget's share of it (set_rate).
        self.pacer = Pacer(rate)
        self.bytes_read = 0
        self.bytes_zeroed = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), name=f"{self.name} {i}",
                                          daemon=True) for i in range(workers)]

    def start(self):
        for t in self._threads:
            t.start()
        return self

    def stop(self):
        self._stop.set()
        self._wake()

    def _wake(self):
        """Wake the workers waiting for work, so that they see the stop."""

    def wait(self, timeout=None):
        """Whether every started worker ended within `timeout` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t.ident is not None:
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def copying(self):
        raise NotImplementedError

    def _run(self, index):
        raise NotImplementedError

    def status(self):
        return {"workers": len(self._threads), "bytes_read": self.bytes_read,
                "bytes_zeroed": self.bytes_zeroed, "rate_limit": self.rate,
                "paid_bytes": self.pacer.paid, **self._own_status()}

    def _own_status(self):
        raise NotImplementedError
