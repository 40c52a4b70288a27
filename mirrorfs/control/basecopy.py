"""Step 4, the base copy: the read-only chain below the overlays, copied to the destination.

The base does not change during the mirror. It is copied through NBD, by this process, at a rate
that can change while it runs:

    qemu-storage-daemon (the base's chain, read-only) ──NBD──▶ this copy ──NBD──▶ qemu-storage-daemon
                                                                                   (<target>.partial)

Why not `qemu-img convert -r RATE` (what this module ran before the host budget): its rate is fixed
for the whole copy, and the host budget (mirrorfs.host.budget) re-divides the host's bandwidth
whenever a copy starts or ends. Restarting qemu-img with a new rate would start the copy over (it
has no resume offset), and pausing it with SIGSTOP would copy in bursts of its whole queue (up to
16 MiB in flight), too coarse to hold a share within a second. Here the copy pays for each piece
(mirrorfs.common.pacing, the same pacer as the data path's copier), so a new share applies within
a sixteenth of a second, and its byte count is exact rather than qemu-img's whole percents.

The copy is the data path's one copy of a range (mirrorfs.datapath.sides.copy, on two of its NBD
sides), the one the mirror's copier and an evacuation make: chunks sized by the pacer, each chunk's
reads in flight together, then its writes. It stays sparse: the source's block status says where
data is, and only data is read and written; zero and unallocated extents are skipped, as the new
image reads as zeros there. What is this module's: the daemons, the progress (a sample after each
chunk) and the rate from the host budget. The target is created in the source's format and
written to `<target>.partial`, renamed on success, so a half-copied base is never mistaken for a
whole one. The switch verifies it anyway (images.compare).
"""

import collections
import os
import shutil
import threading
import time
from pathlib import Path

import nbd

from mirrorfs.common.pacing import Pacer, eta_seconds
from mirrorfs.datapath.sides.backend import NbdBackend, SideError
from mirrorfs.datapath.sides.copy import copy_range
from mirrorfs.daemons.storage import StorageDaemon
from mirrorfs.daemons.tree import make_rundir
from mirrorfs.errors import Error, ImageError, UsageError
from mirrorfs.sides import images

# The rate shown is measured over the last this many seconds.
RATE_WINDOW = 2.0
CHUNK = 8 << 20                 # bytes in flight at once, at most (unlimited copy)
PACED_CHUNK = 256 << 10         # the smallest chunk under a rate limit (see Pacer.chunk)


class BaseCopy:
    def __init__(self, source, target, rate=None):
        """`source`: ImageInfo of the chain's top (read-only); `target`: the destination base path;
        `rate`: bytes/s (None: no limit; 0: held until `pacer.set()` gives it a rate)."""
        self.source = source
        self.target = Path(target)
        self.partial = self.target.with_name(self.target.name + ".partial")
        self.rate = rate                # the operator's limit; the pacer holds what applies now
        self.pacer = Pacer(rate)
        self.total = images.data_bytes(source)
        self.started = None
        self.finished = None
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        self._rundir = None
        self._daemons = []
        self._samples = collections.deque(maxlen=256)     # (monotonic time, bytes done)

    @property
    def copied(self):
        return self.pacer.paid

    @property
    def running(self):
        return self._thread is not None and self.finished is None

    def progress(self):
        """The common `copy` section of a status: bytes done of bytes to copy, the real rate, an ETA."""
        now = time.monotonic()
        end = self.finished or now
        seconds = end - self.started if self.started else 0.0
        done = min(self.copied, self.total) if self.running else self.copied
        if self.running:
            since, then = next(((t, d) for t, d in list(self._samples) if now - t <= RATE_WINDOW),
                               (self.started, 0))
            if now - since < RATE_WINDOW / 2 and self.started:
                since, then = self.started, 0           # too short a window: since the start
            rate = (done - then) / (now - since) if now > since else 0.0
        else:
            rate = done / seconds if seconds > 0 else 0.0
        total = max(self.total, done)
        return {"bytes_done": done, "bytes_total": total,
                "percent": round(100 * done / total, 2) if total else 100.0,
                "running": self.running, "seconds": round(seconds, 3), "rate": round(rate),
                "rate_limit": self.rate, "share": self.pacer.rate,
                "eta_seconds": eta_seconds(total - done, rate, self.pacer.rate)
                if self.running else None,
                "error": self.error}

    def start(self):
        if self.target.exists():
            raise UsageError(f"destination base {self.target} already exists")
        self.partial.unlink(missing_ok=True)
        self.started = time.monotonic()
        try:
            images._run(["qemu-img", "create", "-q", "-f", self.source.format,
                         os.fspath(self.partial), str(self.source.virtual_size)], str(self.partial))
            self._rundir = make_rundir()
            reader = StorageDaemon(self.source, self._rundir, "base-src", readonly=True)
            self._daemons.append(reader)
            reader.start()
            writer = StorageDaemon(images.info(self.partial), self._rundir, "base-dst")
            self._daemons.append(writer)
            writer.start()
            src = NbdBackend(reader.uri, "base-src")
            dst = NbdBackend(writer.uri, "base-dst")
        except SideError as e:
            self._close()
            self.partial.unlink(missing_ok=True)
            raise ImageError(f"base copy: {e}") from None
        except BaseException:
            self._close()
            self.partial.unlink(missing_ok=True)
            raise
        self._thread = threading.Thread(target=self._run, args=(src, dst), name="base copy",
                                        daemon=True)
        self._thread.start()

    def _run(self, src, dst):
        try:
            self._copy(src, dst)
            if not self._stop.is_set():
                dst.flush()
        except (nbd.Error, Error, SideError) as e:     # a SideFailure is a SideError, placed
            self.error = str(e)
        finally:
            src.close()
            dst.close()
            self._close()
            if self._stop.is_set():
                self.error = self.error or "cancelled"
            if self.error:
                self.partial.unlink(missing_ok=True)
            else:
                # Children run with umask 077; give the copy the source's mode, as cp -a would.
                os.chmod(self.partial, self.source.path.stat().st_mode & 0o7777)
                self.partial.rename(self.target)
            self.finished = time.monotonic()

    def _copy(self, src, dst):
        """The data extents, in chunks sized by the pacer; stopped between two chunks by cancel()."""
        copy_range(src, dst, 0, self.source.virtual_size, chunk=CHUNK, smallest=PACED_CHUNK,
                   pacer=self.pacer, stop=self._stop, after=self._sample, dest_zero=True)

    def _sample(self, start, end, read, zeroed):
        """After each chunk: the bytes done so far, for the rate progress() shows."""
        self._samples.append((time.monotonic(), self.copied))

    def _close(self):
        for daemon in self._daemons[::-1]:
            daemon.stop()
        self._daemons = []
        if self._rundir is not None:
            shutil.rmtree(self._rundir, ignore_errors=True)
            self._rundir = None

    def wait(self, timeout=None):
        """Wait for the copy. Returns True when done; raises ImageError if it failed."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        if self.error:
            raise ImageError(f"base copy failed: {self.error}")
        return True

    def cancel(self):
        if self._thread is not None:
            self._stop.set()
            self._thread.join(30)
        self.partial.unlink(missing_ok=True)
