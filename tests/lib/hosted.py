"""The host service as the named-migration tests drive it (lib.hostservice.HostService, plus):
migrations started by name in the background, the disk's record as the registry has it, and the
"reboot" of a host (the service, every storage daemon and the given processes killed with SIGKILL,
then only the service started again)."""

import json
import signal
import subprocess

import psutil

from lib.commands import MIRRORFS, run
from lib.hostservice import HostService
from lib.waits import wait_until


class Host(HostService):
    def env(self):
        # Every command finds the service by the run directory, and the records by the registry.
        return {**super().env(), "MIRRORFS_RUN_DIR": str(self.run_dir)}

    def mirrorfs(self, *args, check=True):
        """A mirrorfs command as an operator types it (the environment says where the host is)."""
        return run(*MIRRORFS, *map(str, args), check=check, env=self.env())

    def background(self, name, *args):
        """A mirrorfs command in the background (a migration), ready once it prints its control
        socket; stopped by `close` if the test left it running."""
        out, err = self.workdir / f"{name}.out", self.workdir / f"{name}.err"
        proc = psutil.Popen([*MIRRORFS, *map(str, args)], stdout=open(out, "w"),
                            stderr=open(err, "w"), stdin=subprocess.DEVNULL, env=self.env())
        self.__dict__.setdefault("started", []).append(proc)
        wait_until(lambda: "control " in out.read_text() or proc.poll() is not None, f"{name} ready",
                   timeout=60)
        assert proc.poll() is None, err.read_text()
        proc.out, proc.err = out, err
        return proc

    def record(self, name):
        return json.loads((self.registry / f"{name}.json").read_text())

    def disks(self):
        return self.list()

    def reboot(self, also=()):
        """kill -9 of the service, every storage daemon of the test and the processes `also` (with
        their children), as a power cut would; then only the service is started again."""
        victims = [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []
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
        self.proc.wait(30)
        _, alive = psutil.wait_procs(victims, timeout=30)
        assert not alive, alive
        return self.start()

    def close(self):
        for proc in self.__dict__.get("started", []):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
        super().close()

