"""A client that reconnects (QEMU's NBD client with reconnect-delay, in qemu-io), writing one block at
a time: the life-of-a-disk tests ask whether any of its writes failed and whether each is on the disk
afterwards (tests/system/test_lifecycle.py, tests/system/test_evacuate_start.py, the guest tests)."""

import contextlib
import os
import subprocess
import tempfile
import threading
import time

from lib.images import qemu_io

BLOCK = 16 * 1024
BLOCKS = 3000              # 48 MiB at most: a writer never runs out before the test stops it
RECONNECT_DELAY = 30


class ReconnectingWriter:
    """qemu-io with QEMU's NBD client and reconnect-delay, fed one write at a time on its standard
    input until stopped: block i gets pattern (i % 250) + 1. Every write it was told failed is
    counted; `stop()` returns the blocks written."""

    live = []                   # for the fixture that stops them whatever happens

    def __init__(self, socket_path, blocks=BLOCKS, spacing=0.01):
        self.blocks = blocks
        # Its answers go to a file (appended to, so reading it never moves the writer's offset):
        # `paused()` counts them while it runs, and a long writer never fills a pipe nobody reads
        # (qemu-io would stop taking commands).
        fd, self._out = tempfile.mkstemp(prefix="mfs-reconnecting-", suffix=".out")
        os.close(fd)
        with open(self._out, "a") as out:
            self.proc = subprocess.Popen(
                ["qemu-io", "--image-opts",
                 f"driver=nbd,server.type=unix,server.path={socket_path},reconnect-delay={RECONNECT_DELAY}"],
                stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT, text=True)
        self.sent = 0
        self._gate = threading.Lock()           # held by `paused()`: no write is sent meanwhile
        self._stop = threading.Event()
        self._spacing = spacing
        self._thread = threading.Thread(target=self._feed, daemon=True)
        self._thread.start()
        ReconnectingWriter.live.append(self)

    def _feed(self):
        while not self._stop.is_set() and self.sent < self.blocks:
            with self._gate:
                i = self.sent
                self.proc.stdin.write(f"write -P {i % 250 + 1} {i * BLOCK} {BLOCK}\n")
                self.proc.stdin.flush()
                self.sent += 1
            time.sleep(self._spacing)

    def _answers(self):
        with open(self._out) as f:
            return f.read()

    @contextlib.contextmanager
    def paused(self, timeout=60):
        """No write sent, and every write sent answered (qemu-io runs them one at a time), while
        the block runs: for comparing two sides that the writer would otherwise be changing."""
        with self._gate:
            deadline = time.monotonic() + timeout
            while self._answers().count("wrote ") < self.sent:
                assert time.monotonic() < deadline, f"{self.sent} writes sent, not all answered"
                time.sleep(0.01)
            yield

    def wait_sent(self, n, timeout=60):
        deadline = time.monotonic() + timeout
        while self.sent < n:
            assert time.monotonic() < deadline, f"only {self.sent} writes sent"
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join(30)
        self.proc.communicate("quit\n", timeout=RECONNECT_DELAY + 60)
        out = self._answers()
        os.unlink(self._out)
        lines = [line.removeprefix("qemu-io> ") for line in out.splitlines()]
        failed = [line for line in lines if "failed" in line or "error" in line.lower()]
        assert failed == [], f"{len(failed)} writes failed, e.g. {failed[:3]}"
        wrote = sum(line.startswith("wrote ") for line in lines)
        assert wrote == self.sent, f"{wrote} of {self.sent} writes acknowledged"
        return self.sent

    def check(self, target, fmt="raw"):
        """Every block written reads back from `target` (a URI or an image file)."""
        count = self.sent
        for first in range(0, count, 200):
            qemu_io(target, *[f"read -P {i % 250 + 1} {i * BLOCK} {BLOCK}"
                              for i in range(first, min(first + 200, count))], fmt=fmt)
