"""The targets: each serves the same disk over NBD in its own way (mirrorfs, mirrorfs with one
daemon, the direct export, QEMU's blockdev-mirror, nbdkit's nbd proxy)."""

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mirrorfs.system import sockets
from mirrorfs.system.children import Child

from . import images
from .common import BenchError, MIRRORFS, check_alive, run_tool, wait_for_output
from .images import StorageExport, qcow2_node


class Target:
    """A server of one Disk under test. `check()` runs after the jobs: a target that lost a process
    or its mirror on the way has measured something else, so its numbers are not kept."""
    name = None

    def __init__(self, disk):
        self.disk = disk

    def check(self):
        pass

    def processes(self):
        """{role: pid} of the processes that serve the client (--cpu)."""
        return {}

    def diagnose(self):
        """After a failed job: save what could explain it somewhere that outlives the work
        directory, and return that path (or None)."""
        return None

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc):
        self.stop()


class MirrorfsTarget(Target):
    name = "mirrorfs"

    def __init__(self, disk):
        super().__init__(disk)
        self._serve(disk.dir, disk.source, disk.dest, images.HOST_CACHE)

    def _serve(self, directory, source, dest, cache):
        """`mirrorfs serve SOURCE DEST`, its socket and log in `directory` (remote.py's
        mirrorfs target calls this with a remote DEST)."""
        self.socket = sockets.check_unix_path(directory / "mirrorfs.sock")
        self.source_spec = str(source)      # which storage daemon is the source's (processes())
        self.server = Child("mirrorfs serve", [*MIRRORFS, "serve", source, dest,
                                               "--socket", self.socket, "--cache", cache],
                            directory / "mirrorfs.log")

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"

    def start(self):
        self.server.start()
        wait_for_output(self.server, "serving ")

    def check(self):
        check_alive(self.server)

    def stop(self):
        self.server.stop()

    def nbdkit_processes(self):
        return [p for p in psutil.Process(self.server.pid).children(recursive=True)
                if p.name() == "nbdkit"]

    def processes(self):
        found = {"mirrorfs: supervisor": self.server.pid}
        for p in psutil.Process(self.server.pid).children(recursive=True):
            if p.name() == "nbdkit":
                found["mirrorfs: nbdkit (the data path)"] = p.pid
            elif self.source_spec in " ".join(p.cmdline()):
                found["mirrorfs: source storage daemon"] = p.pid
            else:
                found["mirrorfs: destination storage daemon"] = p.pid
        return found

    def diagnose(self):
        """A job that overstays its runtime means requests stuck in the data path: where nbdkit's
        Python threads wait (py-spy, installed in the venv) tells which lock or side holds them."""
        py_spy = Path(sys.executable).parent / "py-spy"
        if not self.server.alive() or not py_spy.exists():
            return None
        stacks = [run_tool([py_spy, "dump", "--pid", p.pid], timeout=30, check=False)
                  for p in self.nbdkit_processes()]
        saved = Path(tempfile.gettempdir()) / f"mfsbench-{os.getpid()}-{self.disk.dir.name}.txt"
        saved.write_text("\n".join(stacks) + "\n--- mirrorfs serve's log ---\n"
                         + self.server.log_path.read_text(errors="replace"))
        return saved


class MirrorfsOneDaemonTarget(MirrorfsTarget):
    """`mirrorfs serve --one-daemon`: both overlays in one storage daemon (issue #21)."""
    name = "mirrorfs-1d"

    def _serve(self, directory, source, dest, cache):
        super()._serve(directory, source, dest, cache)
        self.server.argv.append("--one-daemon")

    def processes(self):
        found = {"mirrorfs: supervisor": self.server.pid}
        for p in psutil.Process(self.server.pid).children(recursive=True):
            role = "nbdkit (the data path)" if p.name() == "nbdkit" else "the one storage daemon"
            found[f"mirrorfs: {role}"] = p.pid
        return found


class DirectTarget(Target):
    name = "direct"

    def __init__(self, disk):
        super().__init__(disk)
        self.daemon = StorageExport(disk.dir, "direct", [qcow2_node("source", disk.source)], "source")

    @property
    def uri(self):
        return self.daemon.uri

    def start(self):
        self.daemon.start()

    def check(self):
        check_alive(self.daemon.child)

    def processes(self):
        return {"storage daemon": self.daemon.child.pid}

    def stop(self):
        self.daemon.stop()


class QemuMirrorTarget(Target):
    """QEMU's active mirror in one daemon: both overlays share the base node, the source is exported,
    and a blockdev-mirror job (sync=top: only what the source overlay holds, i.e. what clients write
    from now on; write-blocking: a write completes when the target has it too) keeps the
    destination overlay in step. This is the oVirt-like flow done inside QEMU."""
    name = "qemu-mirror"
    JOB_ID = "mirror0"
    SYNC = "top"        # the overlays share the base: only the source overlay's data is copied

    def __init__(self, disk):
        super().__init__(disk)
        graph = [qcow2_node("base", disk.base, readonly=True),
                 qcow2_node("source", disk.source, backing="base"),
                 qcow2_node("target", disk.dest, backing="base")]
        self.daemon = StorageExport(disk.dir, "mirror", graph, "source", monitor=True)

    @property
    def uri(self):
        return self.daemon.uri

    def start(self):
        self.daemon.start()
        with self.daemon.monitor() as qmp:
            self._qmp(qmp, "blockdev-mirror", {
                "job-id": self.JOB_ID, "device": "source", "target": "target",
                "sync": self.SYNC, "copy-mode": "write-blocking"})
            self._wait_ready(qmp)

    def _qmp(self, qmp, command, arguments=None):
        reply = qmp.cmd_raw(command, arguments)
        if "error" in reply:
            raise BenchError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def _wait_ready(self, qmp, timeout=30):
        """Until BLOCK_JOB_READY: from then on the job is in its active, mirroring state."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = qmp.pull_event(wait=max(deadline - time.monotonic(), 0.01))
            except asyncio.TimeoutError:
                raise BenchError(f"mirror job not ready after {timeout}s") from None
            if event["event"] == "BLOCK_JOB_READY":
                return
            if event["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"):
                raise BenchError(f"mirror job ended before it was ready: {event}")

    def check(self):
        check_alive(self.daemon.child)
        with self.daemon.monitor() as qmp:
            jobs = {j["device"]: j for j in self._qmp(qmp, "query-block-jobs")}
        job = jobs.get(self.JOB_ID)
        if job is None or not job["ready"] or job["io-status"] != "ok":
            raise BenchError(f"the mirror job is no longer active and ready: {job}")

    def processes(self):
        return {"qemu: storage daemon (the mirror)": self.daemon.child.pid}

    def stop(self):
        self.daemon.stop()


class NbdProxyTarget(Target):
    name = "nbd-proxy"

    def __init__(self, disk):
        super().__init__(disk)
        self.daemon = StorageExport(disk.dir, "direct", [qcow2_node("source", disk.source)], "source")
        self.socket = sockets.check_unix_path(disk.dir / "proxy.sock")
        pidfile = disk.dir / "proxy.pid"
        # The same worker threads as mirrorfs's nbdkit (--threads 16); the nbd plugin opens one
        # connection to the daemon per client connection.
        self.nbdkit = Child("nbdkit (nbd plugin)", [
            "nbdkit", "--foreground", "--exit-with-parent", "--pidfile", pidfile, "--threads", 16,
            "--unix", self.socket, "nbd", f"socket={self.daemon.socket}"],
            disk.dir / "proxy.log", pidfile=pidfile)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"

    def start(self):
        self.daemon.start()
        self.nbdkit.start()

    def check(self):
        check_alive(self.daemon.child, self.nbdkit)

    def processes(self):
        return {"storage daemon": self.daemon.child.pid, "nbdkit (nbd plugin)": self.nbdkit.pid}

    def stop(self):
        self.nbdkit.stop()
        self.daemon.stop()


TARGETS = (MirrorfsTarget, MirrorfsOneDaemonTarget, DirectTarget, QemuMirrorTarget, NbdProxyTarget)
