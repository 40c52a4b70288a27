"""mirrorfs's servers run as the real CLI: `mirrorfs serve` (or `start`) ready once it prints its URI,
any mirrorfs command ready once it prints its control socket, and the migration workflow's setup."""

import signal
import subprocess
import time
from pathlib import Path

import psutil

from lib.commands import MIRRORFS
from lib.control import ctl
from lib.images import MiB, make_base
from lib.waits import wait_until


class Served:
    """`mirrorfs serve ...` (or `start ...`) running, ready when it prints its URI."""

    def __init__(self, workdir, *args, name="disk", command="serve"):
        self.socket = workdir / f"{name}.sock"
        self.control = Path(f"{self.socket}.ctl")
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        argv = [*MIRRORFS, command, *map(str, args)]
        if "--socket" not in args and "--listen" not in args:
            argv += ["--socket", str(self.socket)]
        self.argv = argv
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.uri = self._wait_ready()

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.out.read_text()
            if "serving " in text:
                return text.split("serving ", 1)[1].split()[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"mirrorfs serve exited {self.proc.returncode}: {self.stderr}")
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError(f"mirrorfs serve not ready: {self.stderr}")

    @property
    def stderr(self):
        return self.err.read_text()

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # The test's directory goes with its fixture: what the stop waited for is in the log.
            raise AssertionError(f"mirrorfs did not exit {timeout} s after signal {sig!s}; its "
                                 f"log ends:\n{self.stderr[-4000:]}") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(30)


class Process:
    """A mirrorfs command in the background, ready once it printed its control socket."""

    def __init__(self, workdir, name, *args, env=None):
        self.argv = ["mirrorfs", *map(str, args)]
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        self.proc = psutil.Popen([*MIRRORFS, *map(str, args)], stdout=open(self.out, "w"),
                                 stderr=open(self.err, "w"), stdin=subprocess.DEVNULL, env=env)
        wait_until(lambda: "control " in self.out.read_text() or self.proc.poll() is not None,
                   "ready", timeout=60)
        assert self.proc.poll() is None, self.err.read_text()
        self.control = self.out.read_text().split("control ", 1)[1].split()[0]

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)

    def kill_tree(self):
        """kill -9 of the supervisor alone: its children go the way the kernel sends them."""
        kids = self.proc.children()
        self.proc.kill()
        self.proc.wait(10)
        psutil.wait_procs(kids, timeout=30)


class MigrationSetup:
    """src/base.qcow2 with data, an empty dst/, and helpers to drive `mirrorfs start`. `serve` starts
    a Served (the `serve` fixture, which stops it)."""

    def __init__(self, workdir, serve, size=64 * MiB):
        self.workdir = workdir
        self._serve = serve
        (workdir / "src").mkdir()
        (workdir / "dst").mkdir()
        self.base = make_base(workdir / "src" / "base.qcow2", size)
        self.source_overlay = workdir / "src" / "base-snap.qcow2"
        self.dest_overlay = workdir / "dst" / "base-snap.qcow2"
        self.dest_base = workdir / "dst" / "base.qcow2"
        self.disk = None

    def start(self, *extra):
        self.disk = self._serve(self.base, "--dest-dir", self.workdir / "dst", *extra, command="start")
        return self.disk

    def ctl(self, *args, check=True):
        """Run `mirrorfs <args> --control <socket>`; returns the CompletedProcess."""
        return ctl(self.disk.control, *args, check=check)


class Background:
    """`mirrorfs ARGS` in the background, ready once it prints "serving"; stopped by the test."""

    def __init__(self, workdir, name, *args, rundir=None):
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        argv = [*MIRRORFS, *map(str, args)] + (["--run-dir", str(rundir)] if rundir else [])
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = psutil.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        wait_until(self._ready, f"{name} serving", timeout=60)

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"exited {self.proc.returncode}: {self.err.read_text()}")
        return "serving " in self.out.read_text()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)
