"""Step 4, the base copy: the read-only chain below the overlays, copied to the destination.

The base does not change during the mirror, so a well-kept copier does the work: `qemu-img convert`
reads the chain's allocation, skips holes and zeros (the copy stays sparse), and reports progress with
-p, which we parse. It writes to `<target>.partial` and renames on success, so a half-copied base is
never mistaken for a whole one.
"""

import collections
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from mirrorfs.sides import images
from mirrorfs.errors import ImageError, UsageError
from mirrorfs.system.children import popen

_PROGRESS = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")
# The rate shown is measured over the last this many seconds: qemu-img convert starts with a burst
# (its first buffers fill before its rate limit applies), which an average since the start would
# carry for the whole copy.
RATE_WINDOW = 2.0


class BaseCopy:
    def __init__(self, source, target, rate=None):
        """`source`: ImageInfo of the chain's top (read-only); `target`: the destination base path."""
        self.source = source
        self.target = Path(target)
        self.partial = self.target.with_name(self.target.name + ".partial")
        self.rate = rate
        # qemu-img convert -p reports its progress as a share of the data it copies, not of the
        # virtual size: 200 MiB of data on a 1 GiB disk is 100% at 200 MiB.
        self.total = images.data_bytes(source)
        self.fraction = 0.0
        self.started = None
        self.finished = None
        self.error = None
        self._proc = None
        self._reader = None
        self._stderr = b""
        self._samples = collections.deque(maxlen=256)     # (monotonic time, bytes done)

    @property
    def copied(self):
        return int(self.total * self.fraction)

    @property
    def running(self):
        return self._proc is not None and self.finished is None

    def progress(self):
        """The common `copy` section of a status: bytes done of bytes to copy, the real rate, an ETA."""
        now = time.monotonic()
        end = self.finished or now
        seconds = end - self.started if self.started else 0.0
        done = self.copied
        if self.running:
            since, then = next(((t, d) for t, d in list(self._samples) if now - t <= RATE_WINDOW),
                               (self.started, 0))
            if now - since < RATE_WINDOW / 2 and self.started:
                since, then = self.started, 0           # too short a window: since the start
            rate = (done - then) / (now - since) if now > since else 0.0
        else:
            rate = done / seconds if seconds > 0 else 0.0
        return {"bytes_done": done, "bytes_total": self.total,
                "percent": round(self.fraction * 100, 2), "running": self.running,
                "seconds": round(seconds, 3), "rate": round(rate), "rate_limit": self.rate,
                "eta_seconds": round((self.total - done) / rate) if self.running and rate else None,
                "error": self.error}

    def start(self):
        if self.target.exists():
            raise UsageError(f"destination base {self.target} already exists")
        self.partial.unlink(missing_ok=True)
        argv = ["qemu-img", "convert", "-p", "-W", "-f", self.source.format,
                "-O", self.source.format, str(self.source.path), str(self.partial)]
        if self.rate:
            argv[2:2] = ["-r", str(self.rate)]
        self.started = time.monotonic()
        self._proc = popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, name="base copy progress", daemon=True)
        self._reader.start()

    def _read(self):
        # stderr is small (only errors); read it after stdout closes.
        buf = b""
        for chunk in iter(lambda: self._proc.stdout.read1(4096), b""):
            buf += chunk
            found = _PROGRESS.findall(buf)
            if found:
                self.fraction = float(found[-1]) / 100
                self._samples.append((time.monotonic(), self.copied))
            buf = buf[-64:]
        self._stderr = self._proc.stderr.read()

    def wait(self, timeout=None):
        """Wait for the copy. Returns True when done; raises ImageError if it failed."""
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reader.join()
        if self.finished is None:
            self.finished = time.monotonic()
            if self._proc.returncode == 0:
                # Children run with umask 077; give the copy the source's mode, as cp -a would.
                os.chmod(self.partial, self.source.path.stat().st_mode & 0o7777)
                self.partial.rename(self.target)
                self.fraction = 1.0
            else:
                lines = [l.strip() for l in self._stderr.decode(errors="replace").splitlines() if l.strip()]
                self.error = (lines[-1].removeprefix("qemu-img: ") if lines
                              else f"qemu-img exited with status {self._proc.returncode}")
                self.partial.unlink(missing_ok=True)
        if self.error:
            raise ImageError(f"base copy failed: {self.error}")
        return True

    def cancel(self):
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._reader.join()
            self.finished = time.monotonic()
            self.error = "cancelled"
        self.partial.unlink(missing_ok=True)
