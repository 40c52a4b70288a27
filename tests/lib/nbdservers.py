"""NBD servers other than mirrorfs, for URI endpoints: qemu-nbd on an image, and nbdkit's nbd plugin
in front of another export with filters (error, delay, pause) on the way."""

import os
import socket
import subprocess
import time
from pathlib import Path


def wait_for_pidfile(proc, pidfile, timeout=10):
    """Wait until `proc` has written its pid to `pidfile` (servers write it once they accept
    connections). False if `proc` exits first or `timeout` seconds pass: the caller says why."""
    deadline = time.monotonic() + timeout
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class QemuNbd:
    def __init__(self, image, socket, fmt="qcow2"):
        self.socket = Path(socket)
        self.pidfile = self.socket.with_suffix(".pid")
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", fmt, "-k", str(self.socket), "--pid-file", str(self.pidfile),
             "--persistent", "--shared=16", "--cache=writeback", "--discard=unmap", str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not wait_for_pidfile(self.proc, self.pidfile):
            raise AssertionError(f"qemu-nbd failed: {self.proc.stderr.read().decode()}")
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc.stderr.close()


class NbdkitFilter:
    """nbdkit's nbd plugin in front of another export, with filters (error, delay) on the way:
    `args` are nbdkit's --filter=... options and the filters' key=value parameters. Started again
    with the same `name`, it serves the same URI (a state directory knows a destination by it)."""

    def __init__(self, workdir, name, target_socket, *args):
        self.socket = workdir / f"{name}.sock"
        pidfile = workdir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)         # left by an instance that was killed
        self.socket.unlink(missing_ok=True)
        filters = [a for a in args if a.startswith("--filter=")]
        params = [a for a in args if not a.startswith("--filter=")]
        log = workdir / f"{name}.err"
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-U", self.socket, "--pidfile", pidfile, *filters,
                 "nbd", f"socket={target_socket}", *params],
                stdout=subprocess.DEVNULL, stderr=err)
        assert wait_for_pidfile(self.proc, pidfile), f"nbdkit failed: {log.read_text()[-2000:]}"
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self):
        """kill -9: requests it holds (paused, delayed) never reach the export behind it."""
        self.proc.kill()
        self.proc.wait()


class PausableFront(NbdkitFilter):
    """nbdkit's pause filter in front of an export: after `pause()`, every request that arrives is
    held (those already in flight finish first) until `resume()`, or for good if it is killed."""

    def __init__(self, workdir, name, target_socket, *args):
        self.control = workdir / f"{name}-pause.ctl"
        self.control.unlink(missing_ok=True)
        super().__init__(workdir, name, target_socket, "--filter=pause",
                         f"pause-control={self.control}", *args)

    def _command(self, letter):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(60)
            s.connect(os.fspath(self.control))
            s.sendall(letter)
            assert s.recv(1) == letter.upper(), "the pause filter did not acknowledge"

    def pause(self):
        self._command(b"p")

    def resume(self):
        self._command(b"r")


class LossyDisk:
    """A raw file behind a volatile write cache (tests/lib/lossy_plugin.py, nbdkit's python
    plugin): what no flush or FUA covered is lost at `power_loss()` (kill -9). Started again with
    the same `name`, it serves the same URI over what the file kept."""

    PLUGIN = Path(__file__).with_name("lossy_plugin.py")

    def __init__(self, workdir, name, image):
        self.socket = workdir / f"{name}.sock"
        pidfile = workdir / f"{name}.pid"
        pidfile.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)
        log = workdir / f"{name}.err"
        with open(log, "a") as err:
            self.proc = subprocess.Popen(
                ["nbdkit", "-f", "-U", self.socket, "--pidfile", pidfile, "python",
                 self.PLUGIN, f"file={image}"], stdout=subprocess.DEVNULL, stderr=err)
        assert wait_for_pidfile(self.proc, pidfile), f"nbdkit failed: {log.read_text()[-2000:]}"
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def power_loss(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class FuseFile:
    """An NBD export as an image file (nbdfuse, read-only): a source "file" whose reads fail when
    the export behind it fails (nbdkit's error filter), for what only opens files (an evacuation
    in place). `stop()` unmounts it."""

    def __init__(self, workdir, name, uri):
        self.mount = workdir / f"{name}.mnt"
        self.mount.mkdir()
        self.path = self.mount / f"{name}.raw"
        pidfile = workdir / f"{name}.fuse.pid"
        log = workdir / f"{name}.fuse.err"
        with open(log, "a") as err:
            self.proc = subprocess.Popen(["nbdfuse", "-r", "-P", pidfile, self.path, uri],
                                         stdout=subprocess.DEVNULL, stderr=err)
        assert wait_for_pidfile(self.proc, pidfile), f"nbdfuse failed: {log.read_text()[-2000:]}"

    def stop(self):
        subprocess.run(["umount", os.fspath(self.mount)], capture_output=True)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            subprocess.run(["umount", "-l", os.fspath(self.mount)], capture_output=True)
            self.proc.kill()
            self.proc.wait()
