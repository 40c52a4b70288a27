"""`mirrorfs host` run as the real CLI in a test's own registry and run directory, and the commands
that talk to it; `close()` stops the service and every disk's daemon, whatever the test did to them
(killed the service, or everything)."""

import json
import os
import signal
import subprocess
import time

import psutil

from lib.commands import MIRRORFS, run
from lib.processes import our_processes, still_running


class HostService:
    """    host = HostService(workdir)          # not started
           host.start(); host.add("vm1", image); host.list()
           host.kill(signal.SIGKILL); host.start()   # the next service adopts the daemons
    """

    def __init__(self, workdir, take_back_after=2, options=()):
        self.workdir = workdir
        self.options = list(options)            # more of `mirrorfs host`'s options
        self.registry = workdir / "registry"
        self.run_dir = workdir / "run"
        self.take_back_after = take_back_after
        self.proc = None
        self.starts = 0

    def argv(self, *args):
        return [*MIRRORFS, *map(str, args)]

    def start(self, timeout=120, env=None):
        self.starts += 1
        self.out = self.workdir / f"host{self.starts}.out"
        self.err = self.workdir / f"host{self.starts}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                self.argv("host", "--registry", self.registry, "--run-dir", self.run_dir,
                          "--take-back-after", self.take_back_after, *self.options),
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while "host service:" not in self.out.read_text():
            assert self.proc.poll() is None, f"mirrorfs host exited {self.proc.returncode}: {self.stderr}"
            assert time.monotonic() < deadline, f"mirrorfs host not ready: {self.stderr}"
            time.sleep(0.02)
        return self

    @property
    def stderr(self):
        return self.err.read_text()

    def cli(self, *args, check=True):
        """A mirrorfs command in this service's run directory (and registry)."""
        return run(*self.argv(*args, "--run-dir", self.run_dir), check=check,
                   env=self.env())

    def env(self):
        return {**os.environ, "MIRRORFS_REGISTRY": str(self.registry)}

    def add(self, name, image, socket=None):
        socket = socket or self.workdir / f"{name}.sock"
        self.cli("add", name, image, "--socket", socket)
        return socket

    def list(self):
        """The named disks of `mirrorfs list --json`, by name."""
        records = json.loads(self.cli("list", "--json").stdout)
        return {r["name"]: r for r in records if r["kind"] == "named"}

    def kill(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        self.proc.wait(60)

    def daemons(self):
        """The qemu-storage-daemons of this test's disks (every one mentions the test's directory)."""
        return [p for p in our_processes(str(self.workdir)) if p.name() == "qemu-storage-daemon"]

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            res = self.cli("shutdown", check=False)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            assert res.returncode == 0, res.stderr
        # Left by a service that was killed, or by a test that killed everything.
        left = self.daemons()
        for p in left:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        assert not still_running(left, timeout=30)
