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

The copy stays sparse: the source's block status says where data is, and only data is read and
written; zero and unallocated extents are skipped, as the new image reads as zeros there. The
target is created in the source's format and written to `<target>.partial`, renamed on success, so
a half-copied base is never mistaken for a whole one. The switch verifies it anyway
(images.compare).
"""

import collections
import os
import shutil
import threading
import time
from pathlib import Path

import nbd

from mirrorfs.common.pacing import Pacer, eta_seconds
from mirrorfs.daemons.storage import StorageDaemon
from mirrorfs.daemons.tree import make_rundir
from mirrorfs.errors import Error, ImageError, UsageError
from mirrorfs.sides import images

# The rate shown is measured over the last this many seconds.
RATE_WINDOW = 2.0
PIECE = 1 << 20                 # one read or write request
CHUNK = 8 << 20                 # requests in flight at once, at most (unlimited copy)
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
            src, dst = nbd.NBD(), nbd.NBD()
            src.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
            src.connect_uri(reader.uri)
            dst.connect_uri(writer.uri)
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
        except (nbd.Error, Error) as e:
            self.error = str(e)
        finally:
            for h in (src, dst):
                try:
                    h.shutdown()
                except nbd.Error:
                    pass
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
        """Data extents only, in chunks sized by the pacer, each chunk's reads in flight together,
        then its writes."""
        size = self.source.virtual_size
        pos = 0
        while pos < size and not self._stop.is_set():
            chunk = self.pacer.chunk(CHUNK, PACED_CHUNK)
            end = min(pos + chunk, size)
            if not self.pacer.reserve(end - pos, self._stop):   # held, or ahead of the rate
                return
            pieces = []
            for offset, length in _data_extents(src, pos, end):
                for p in range(offset, offset + length, PIECE):
                    pieces.append((p, nbd.Buffer(min(PIECE, offset + length - p))))
            if pieces:
                _wait(src, [src.aio_pread(buf, p) for p, buf in pieces])
                _wait(dst, [dst.aio_pwrite(buf, p) for p, buf in pieces])
            copied = sum(len(buf) for _, buf in pieces)
            self._samples.append((time.monotonic(), self.copied + copied))
            self.pacer.settle(end - pos, copied)
            pos = end

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


def _data_extents(h, start, end):
    """(offset, length) of the data in [start, end), from the block status (base:allocation)."""
    found = []
    pos = start
    while pos < end:
        before = len(found)
        mark = [pos]

        def extent_at(metacontext, offset, entries, err):
            p = offset
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                stop = min(p + length, end)
                if stop > p and not flags & nbd.STATE_ZERO:
                    found.append((p, stop - p))
                p = stop
                if p >= end:
                    break
            mark[0] = p
            return 0

        if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
            return [(start, end - start)]
        h.block_status(end - pos, pos, extent_at)
        if mark[0] <= pos:
            found[before:] = [(pos, end - pos)]     # no progress: copy the rest as data
            break
        pos = mark[0]
    return found


def _wait(h, cookies):
    """Drive `h` until every command in `cookies` completes; raise the first failure."""
    pending = set(cookies)
    while pending:
        for cookie in list(pending):
            if h.aio_command_completed(cookie):     # raises nbd.Error when the command failed
                pending.discard(cookie)
        if pending:
            h.poll(-1)
