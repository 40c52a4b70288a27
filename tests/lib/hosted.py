"""The host service (`mirrorfs host`) as the named-disk tests run it: its own registry and run
directory under the test's directory, started in the background, and the "reboot" of a host (every
mirrorfs process and storage daemon killed with SIGKILL, then only the service started again)."""

import json
import os
import signal
import subprocess

import psutil

from lib.commands import MIRRORFS, run
from lib.waits import wait_until


class Host:
    """`mirrorfs host` with REGISTRY and RUN_DIR under `workdir`; `env` is what every mirrorfs
    command of the test must run with to find them."""

    def __init__(self, workdir, take_back_after=1):
        self.workdir = workdir
        self.registry = workdir / "registry"
        self.run_dir = workdir / "run"
        self.env = {**os.environ, "MIRRORFS_REGISTRY": str(self.registry),
                    "MIRRORFS_RUN_DIR": str(self.run_dir)}
        self.take_back_after = take_back_after
        self.proc = None
        self.starts = 0
        self.started = []              # background commands, stopped at shutdown if still running

    def start(self):
        self.starts += 1
        out = self.workdir / f"host{self.starts}.out"
        self.out = out
        self.proc = psutil.Popen([*MIRRORFS, "host", "--take-back-after", str(self.take_back_after)],
                                 stdout=open(out, "w"), stderr=open(f"{out}.err", "w"),
                                 stdin=subprocess.DEVNULL, env=self.env)
        wait_until(lambda: "host service:" in out.read_text() or self.proc.poll() is not None,
                   "host service ready", timeout=60)
        assert self.proc.poll() is None, open(f"{out}.err").read()
        return self

    def mirrorfs(self, *args, check=True):
        return run(*MIRRORFS, *map(str, args), check=check, env=self.env)

    def background(self, name, *args):
        """A mirrorfs command in the background (a migration), ready once it prints its control."""
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        proc = psutil.Popen([*MIRRORFS, *map(str, args)], stdout=open(out, "w"),
                            stderr=open(err, "w"), stdin=subprocess.DEVNULL, env=self.env)
        wait_until(lambda: "control " in out.read_text() or proc.poll() is not None, f"{name} ready",
                   timeout=60)
        self.started.append(proc)
        assert proc.poll() is None, err.read_text()
        proc.out, proc.err = out, err
        return proc

    def record(self, name):
        return json.loads((self.registry / f"{name}.json").read_text())

    def disks(self):
        return {d["name"]: d for d in json.loads(self.mirrorfs("list", "--json").stdout)
                if d.get("kind") == "named"}

    def daemons(self):
        """Every qemu-storage-daemon serving an image of this test (detached: not our children)."""
        found = []
        for p in psutil.process_iter(["name", "cmdline"]):
            try:
                if p.info["name"] == "qemu-storage-daemon" and \
                        str(self.workdir) in " ".join(p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def reboot(self, also=()):
        """kill -9 of the service, every storage daemon of the test and the processes `also` (with
        their children), as a power cut would; then only the service is started again."""
        victims = [self.proc] if self.proc is not None and self.proc.poll() is None else []
        for p in also:
            try:
                victims += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        victims += self.daemons()
        for p in victims:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(victims, timeout=30)
        assert not alive, alive
        return self.start()

    def shutdown(self):
        """`mirrorfs shutdown`: every disk's daemon and the service stopped (and a migration the
        test left running, first)."""
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        if self.proc is not None and self.proc.poll() is None:
            # `mirrorfs shutdown` waits until the service's pid is gone: ours to reap meanwhile
            # (a zombie still has its /proc entry).
            command = subprocess.Popen([*MIRRORFS, "shutdown"], env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.proc.wait(120)
            out, err = command.communicate(timeout=60)
            assert command.returncode == 0, err
        for p in self.daemons():            # a daemon of a disk the service failed to adopt
            p.kill()
