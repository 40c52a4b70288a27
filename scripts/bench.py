#!/usr/bin/env python3
"""`make bench`: what mirrorfs's mirror costs, measured against the alternatives (issue #5).

Every target serves the same disk, fresh qcow2 overlays on one fully written base, and runs the same
fio jobs over NBD, in the same run, on the same machine:

    mirrorfs     `mirrorfs serve SRC DST`: nbdkit + the Python plugin, writes to two storage daemons
    mirrorfs-1d  `mirrorfs serve SRC DST --one-daemon`: the same, both images in one storage daemon
    direct       qemu-storage-daemon exporting SRC: no proxy, no mirror; the ceiling
    qemu-mirror  one qemu-storage-daemon exporting SRC, with an active blockdev-mirror job to DST
    nbd-proxy    nbdkit's C nbd plugin in front of a direct export: one proxy hop, no mirror

Then, outside the matrix: the base copy (nbdcopy between two exports), the switch stall of
`mirrorfs pivot` under fio load, and nbdkit's memory serving a 1 GiB and a 1 TiB disk.

    make bench                                  # 1 GiB, 5 s per job, 3 runs: about 8 minutes
    make bench BENCH_ARGS=--quick               # a smoke run of about 20 seconds
    .venv/bin/python scripts/bench.py --targets mirrorfs,direct --jobs 4k-randwrite --runs 1
"""

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbd
import psutil
from qemu.qmp.legacy import QEMUMonitorProtocol

from mirrorfs.system import children as processes
from mirrorfs.system import sockets
from mirrorfs.daemons import storage
from mirrorfs.common import jsonlines
from mirrorfs.system.children import Child

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40
MB = 1e6                    # throughput is reported in MB/s (10^6 bytes), as fio's bw_bytes is
MIRRORFS = [sys.executable, "-m", "mirrorfs"]
WORK_PARENT = "/tmp"        # short unix socket paths
FIO_GRACE = 60              # seconds a fio run may overstay its runtime before it is killed


class BenchError(Exception):
    """One measurement failed. It is recorded and the bench goes on with the next one."""


# The fio jobs.

@dataclass(frozen=True)
class Job:
    key: str                # for --jobs
    label: str              # for the table and the JSON
    args: tuple
    directions: tuple       # fio's "read"/"write" sections that hold this job's numbers

    def rows(self):
        """(row label, direction): a mixed job gets one row per direction, not a sum, because a
        mirror changes the cost of reads and writes very differently."""
        if len(self.directions) == 1:
            return [(self.label, self.directions[0])]
        return [(f"{self.label} ({d}s)", d) for d in self.directions]


JOBS = (
    Job("4k-randwrite", "4k randwrite qd16", ("--rw=randwrite", "--bs=4k", "--iodepth=16"), ("write",)),
    Job("4k-randwrite-qd1", "4k randwrite qd1", ("--rw=randwrite", "--bs=4k", "--iodepth=1"), ("write",)),
    Job("4k-randread", "4k randread qd16", ("--rw=randread", "--bs=4k", "--iodepth=16"), ("read",)),
    Job("1m-write", "1M seq write qd4", ("--rw=write", "--bs=1m", "--iodepth=4"), ("write",)),
    Job("1m-read", "1M seq read qd4", ("--rw=read", "--bs=1m", "--iodepth=4"), ("read",)),
    Job("64k-randrw", "64k randrw 70/30 qd8",
        ("--rw=randrw", "--rwmixread=70", "--bs=64k", "--iodepth=8"), ("read", "write")),
    Job("4k-randwrite-4conn", "4k randwrite 4 conns x qd4",
        ("--rw=randwrite", "--bs=4k", "--iodepth=4", "--numjobs=4", "--group_reporting"), ("write",)),
)
QUICK_JOBS = ("4k-randwrite", "4k-randread")


# Commands and images.

def run_tool(argv, timeout, check=True):
    """Run a command to completion and return its stdout. It is forked the way mirrorfs forks its
    children (own session, SIGTERM if we die), and its whole process group is killed if it overstays
    `timeout` or we are interrupted: fio forks a process per job, and a hung server must not hang
    the bench."""
    argv = [str(a) for a in argv]
    proc = processes.popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise BenchError(f"{Path(argv[0]).name} did not finish in {timeout}s") from None
    except BaseException:
        kill_group(proc)
        raise
    if check and proc.returncode != 0:
        tail = " | ".join(line for line in err.strip().splitlines()[-3:])
        raise BenchError(f"{Path(argv[0]).name} failed with status {proc.returncode}: {tail}")
    return out


def kill_group(proc, sig=signal.SIGKILL):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    if sig == signal.SIGKILL:
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:   # a grandchild in another session holds the pipes
            pass


def qemu_img(*args):
    run_tool(["qemu-img", *args], timeout=120)


def make_base(path, size):
    """The disk's data, every byte of it written (a different pattern per 64 MiB): reads are of real
    data, and an overlay's partial-cluster writes copy real data up from it."""
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    chunk = min(64 * MiB, size)
    commands = []
    for i, offset in enumerate(range(0, size, chunk)):
        commands += ["-c", f"write -q -P {0x11 + i % 0xee} {offset} {min(chunk, size - offset)}"]
    out = run_tool(["qemu-io", "-f", "qcow2", *commands, path], timeout=600)
    if out.strip():         # qemu-io reports a failed command on stdout and still exits 0
        raise BenchError(f"qemu-io could not write {path}: {out.strip()}")
    return Path(path)


def make_overlay(path, backing, size=None):
    qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", "qcow2", path,
             *([size] if size else []))
    return Path(path)


class Disk:
    """One target's fresh overlays on the shared base: the source the client uses and the
    destination a mirror writes to. Sockets and logs of the target live in the same directory."""

    def __init__(self, directory, base, size=None):
        self.dir = Path(directory)
        self.dir.mkdir()
        self.base = base
        self.source = make_overlay(self.dir / "src.qcow2", base, size)
        self.dest = make_overlay(self.dir / "dst.qcow2", base, size)

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# The host cache mode of every storage daemon in the run (--cache): mirrorfs's daemons get it too.
HOST_CACHE = "none"


def qcow2_node(name, path, backing=None, readonly=False):
    """A qcow2 block node with the options mirrorfs's own daemons use (mirrorfs/daemons/storage.py), in
    the run's cache mode, so that the targets differ only in what sits between the client and
    qcow2. Without `backing` the chain in the image header is opened."""
    node = {"driver": "qcow2", "node-name": name, "discard": "unmap", "read-only": readonly,
            **storage.format_options(HOST_CACHE),
            "file": storage.file_node(path, HOST_CACHE, discard="unmap", **{"read-only": readonly})}
    if backing is not None:
        node["backing"] = backing
    return node


# The processes of the targets.

class StorageExport:
    """qemu-storage-daemon exporting one node of a block graph over NBD (a unix socket), with a QMP
    monitor if asked. Ready when its pidfile appears."""

    def __init__(self, rundir, name, blockdevs, export_node, writable=True, monitor=False):
        self.socket = sockets.check_unix_path(Path(rundir) / f"{name}.sock")
        self.qmp_socket = Path(rundir) / f"{name}.qmp" if monitor else None
        pidfile = Path(rundir) / f"{name}.pid"
        argv = ["qemu-storage-daemon"]
        for node in blockdevs:
            argv += ["--blockdev", json.dumps(node)]
        export = {"type": "nbd", "id": "export0", "node-name": export_node, "name": "",
                  "writable": writable}
        argv += ["--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                 "--export", json.dumps(export)]
        if monitor:
            argv += ["--chardev", f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
                     "--monitor", "chardev=qmp0"]
        argv += ["--pidfile", pidfile]
        self.child = Child(f"qemu-storage-daemon ({name})", argv, Path(rundir) / f"{name}.log",
                           pidfile=pidfile)

    @property
    def uri(self):
        return f"nbd+unix:///?socket={self.socket}"

    def start(self):
        self.child.start()

    def stop(self):
        self.child.stop()

    def monitor(self):
        """A connected QMP client (use it in a with block)."""
        qmp = QEMUMonitorProtocol(str(self.qmp_socket))
        qmp.connect()
        return qmp


def wait_for_output(child, marker, timeout=60):
    """`mirrorfs serve` and `start` have no pidfile; they print a line when clients can connect.
    Fails at once, with the log, if the process dies first."""
    deadline = time.monotonic() + timeout
    while marker not in child.log_path.read_text(errors="replace"):
        if not child.alive():
            raise child.failure("exited while starting")
        if time.monotonic() > deadline:
            child.stop()
            raise child.failure(f"printed no {marker.strip()!r} line in {timeout}s")
        time.sleep(0.05)


def check_alive(*children):
    for child in children:
        if not child.alive():
            raise child.failure("died during the measurement")


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
        self._serve(disk.dir, disk.source, disk.dest, HOST_CACHE)

    def _serve(self, directory, source, dest, cache):
        """`mirrorfs serve SOURCE DEST`, its socket and log in `directory` (bench_remote.py's
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


# fio.

def fio_argv(uri, size, job_args, runtime, ramp):
    """A time-based fio run over the whole disk. --thread: fio's job processes would call setsid(),
    escape the process group we kill, and keep a stopped run's pipes open; threads die with fio."""
    return ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}", "--thread",
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}", "--output-format=json",
            *job_args]


def parse_fio(output):
    """fio's nbd engine prints "fio: connected to NBD server" lines on stdout before the JSON."""
    try:
        job = json.loads(output[output.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio printed no results: {output.strip()[-200:]!r}") from None
    if job["error"]:
        raise BenchError(f"fio job failed: error {job['error']}")
    return job


def direction_metrics(stats):
    """IOPS, MB/s and completion latency percentiles of one direction of a fio job."""
    percentiles = stats["clat_ns"].get("percentile", {})
    return {"iops": stats["iops"], "mbps": stats["bw_bytes"] / MB,
            "p50_us": percentiles.get("50.000000", 0) / 1000,
            "p99_us": percentiles.get("99.000000", 0) / 1000}


def run_job(uri, job, config, processes=None):
    """{row label: metrics} of one fio run of `job` against `uri`. With `processes` ({role: pid}),
    each row also holds the CPU each of them spent per request (CPU + role), measured over fio's
    measured time (after its ramp)."""
    meter = CpuMeter(processes or {}, after=config.ramp)
    out = run_tool(fio_argv(uri, config.size, job.args, config.runtime, config.ramp),
                   timeout=config.runtime + config.ramp + FIO_GRACE)
    spent = meter.rates()
    result = parse_fio(out)
    rows = {label: direction_metrics(result[d]) for label, d in job.rows()}
    if not any(m["iops"] > 0 for m in rows.values()):
        raise BenchError("fio completed no I/O")
    iops = sum(m["iops"] for m in rows.values())
    for m in rows.values():
        # A process's CPU rate over the job's request rate: its CPU per request (all directions:
        # a mixed job's rows share their processes).
        m.update({CPU + role: rate / iops * 1e6 for role, rate in spent.items()})
        m["fio_cpu_us"] = (result["usr_cpu"] + result["sys_cpu"]) / 100 / iops * 1e6 \
            * int(dict(a.split("=", 1) for a in job.args if "=" in a).get("--numjobs", 1))
    return rows


# Where the CPU goes (--cpu): what each process of a target spends per request. On two cores every
# process competes with fio and the others, so a job is bound by their sum, not by one of them.

CPU = "cpu_us:"             # a row's keys: CPU + role -> microseconds of CPU per request


def cpu_seconds(processes):
    """{role: user + system CPU seconds so far} of {role: pid}; a process gone is left out."""
    found = {}
    for role, pid in processes.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        found[role] = t.user + t.system
    return found


class CpuMeter:
    """The CPU rate of each process between `after` seconds from now (the end of fio's ramp) and
    `rates()`."""

    def __init__(self, processes, after):
        self._processes = processes
        self._start = None
        self._timer = threading.Timer(after, self._begin)
        if processes:
            self._timer.start()

    def _begin(self):
        self._start = (cpu_seconds(self._processes), time.monotonic())

    def rates(self):
        self._timer.cancel()
        if self._start is None:
            return {}
        before, started = self._start
        elapsed = time.monotonic() - started
        return {role: (cpu - before.get(role, 0.0)) / elapsed
                for role, cpu in cpu_seconds(self._processes).items()}


def cpu_parts(row):
    """{role: CPU microseconds per request} of one row, largest first."""
    parts = {k[len(CPU):]: v for k, v in row.items() if k.startswith(CPU)}
    return dict(sorted(parts.items(), key=lambda kv: -kv[1]))


# The matrix: every target, every job, K times.

def measure_target(kind, disk, config, log):
    """Start `kind` on `disk`, run every job, check the target, stop it. Returns ({row: metrics},
    [errors]). A job that fails is recorded and the next one runs; a target that fails its check
    keeps none of its numbers."""
    rows, errors = {}, []
    try:
        with kind(disk) as target:
            for job in config.jobs:
                try:
                    found = run_job(target.uri, job, config,
                                    target.processes() if config.cpu else None)
                except BenchError as e:
                    saved = target.diagnose()
                    detail = f"{e}" + (f" (stacks and log saved in {saved})" if saved else "")
                    errors.append(f"{kind.name} {job.label}: {detail}")
                    log(f"  {job.label:28} FAILED: {detail}")
                    continue
                rows.update(found)
                log(f"  {job.label:28} " + ", ".join(f"{m['iops']:,.0f} IOPS" for m in found.values()))
            target.check()
    except Exception as e:      # any failure of one target must not stop the others
        errors.append(f"{kind.name}: {type(e).__name__}: {e}")
        log(f"  {kind.name} FAILED: {e}")
        rows = {}
    return rows, errors


def run_matrix(base, workdir, config, log):
    """{target: {row: [metrics of each run]}}, [errors]."""
    samples = {kind.name: {} for kind in config.targets}
    errors = []
    for run in range(1, config.runs + 1):
        for kind in config.targets:
            log(f"run {run}/{config.runs}: {kind.name}")
            # Fresh overlays and processes for each target: what one target allocated or cached in
            # its overlays does not help the next. The base stays cached for all of them.
            disk = Disk(workdir / f"r{run}-{kind.name}", base)
            try:
                rows, failed = measure_target(kind, disk, config, log)
            finally:
                disk.remove()
                os.sync()       # the next target starts without this one's writeback
            errors += failed
            for label, metrics in rows.items():
                samples[kind.name].setdefault(label, []).append(metrics)
    return samples, errors


def medians(samples):
    """{target: {row: median of each metric over the runs, plus the runs' IOPS spread}}."""
    summary = {}
    for target, rows in samples.items():
        summary[target] = {}
        for label, runs in rows.items():
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            iops = [r["iops"] for r in runs]
            row["runs"] = len(runs)
            row["spread"] = (max(iops) - min(iops)) / row["iops"] if row["iops"] else None
            summary[target][label] = row
    return summary


# (column, target, the target it is measured against)
RATIOS = (("mirrorfs/qemu-mirror", "mirrorfs", "qemu-mirror"), ("mirrorfs/direct", "mirrorfs", "direct"),
          ("mirrorfs/nbd-proxy", "mirrorfs", "nbd-proxy"),
          ("mirrorfs-1d/qemu-mirror", "mirrorfs-1d", "qemu-mirror"))


def ratios(summary, config):
    """mirrorfs's median IOPS over each other target's, per row (the MB/s ratio is the same: the
    block sizes are)."""
    found = {}
    for label in row_labels(config):
        found[label] = {}
        for name, target, other in RATIOS:
            mine = summary.get(target, {}).get(label)
            theirs = summary.get(other, {}).get(label)
            if mine and theirs and theirs["iops"]:
                found[label][name] = mine["iops"] / theirs["iops"]
    return found


def row_labels(config):
    return [label for job in config.jobs for label, _ in job.rows()]


# Outside the matrix (i): the base copy.

def copy_endpoints(base, rundir, size):
    """What every copier copies between: a read-only export of the fully written base and an
    export of an empty qcow2 of the same size (not started)."""
    rundir.mkdir()
    target_image = rundir / "copy.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", target_image, size)
    source = StorageExport(rundir, "from", [qcow2_node("base", base, readonly=True)], "base",
                           writable=False)
    dest = StorageExport(rundir, "to", [qcow2_node("copy", target_image)], "copy")
    return rundir, source, dest


def measure_nbdcopy(base, workdir, size):
    """nbdcopy from a read-only export of the fully written base to an export of an empty qcow2:
    the copy rate of a good NBD copier between two storage daemons, what mirrorfs's own copy is
    to be compared with."""
    rundir, source, dest = copy_endpoints(base, workdir / "copy", size)
    try:
        source.start()
        dest.start()
        started = time.monotonic()
        run_tool(["nbdcopy", source.uri, dest.uri], timeout=600)
        seconds = time.monotonic() - started
    finally:
        dest.stop()
        source.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    return {"tool": "nbdcopy", "bytes": size, "seconds": seconds, "mbps": size / seconds / MB}


def measure_mirrorfs_copy(base, workdir, size):
    """mirrorfs's own full copy, `mirrorfs serve --copy full`, between the same two kinds of export
    as measure_nbdcopy: the copier's time to synchronized, from its status."""
    rundir, source, dest = copy_endpoints(base, workdir / "mcopy", size)
    socket_path = sockets.check_unix_path(rundir / "m.sock")
    server = Child("mirrorfs serve --copy full",
                   [*MIRRORFS, "serve", "--copy", "full", source.uri, dest.uri,
                    "--socket", socket_path], rundir / "mirrorfs.log")
    try:
        source.start()
        dest.start()
        server.start()
        wait_for_output(server, "control ")
        deadline = time.monotonic() + 600
        while True:
            status = json.loads(mirrorfs_cli("status", "--json", "--control", f"{socket_path}.ctl"))
            copy = status["datapath"]["copy"]
            if copy["synchronized_seconds"] is not None:
                seconds = copy["synchronized_seconds"]
                break
            if time.monotonic() > deadline:
                raise BenchError("mirrorfs's copy did not finish in 600 s")
            time.sleep(0.1)
    finally:
        server.stop()
        dest.stop()
        source.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    return {"tool": "mirrorfs serve --copy full", "bytes": size, "seconds": seconds,
            "mbps": size / seconds / MB}


# Outside the matrix (ii): the switch stall under load.

class Probe(threading.Thread):
    """One client doing back-to-back 4 KiB writes on its own connection, each timed: what a single
    guest request sees while the disk switches. Times are wall-clock, like the migration's events."""

    def __init__(self, uri, size):
        super().__init__(name="probe", daemon=True)
        self.handle = nbd.NBD()
        self.handle.connect_uri(uri)
        self.blocks = size // 4096
        self.samples = []           # (start, end) of each write
        self.error = None
        self._done = threading.Event()

    def run(self):
        rng = random.Random(5)
        buf = bytearray(rng.randbytes(4096))
        try:
            while not self._done.is_set():
                offset = rng.randrange(self.blocks) * 4096
                started = time.time()
                self.handle.pwrite(buf, offset)
                self.samples.append((started, time.time()))
        except nbd.Error as e:
            self.error = str(e)

    def stop(self):
        self._done.set()
        self.join()
        self.handle.shutdown()


def percentile(sorted_values, fraction):
    return sorted_values[min(int(fraction * len(sorted_values)), len(sorted_values) - 1)]


def latency_stats(samples):
    """Per-request latency percentiles and the longest time without a completion, in ms."""
    if len(samples) < 2:
        return {"requests": len(samples)}
    latencies = sorted(end - start for start, end in samples)
    ends = sorted(end for _, end in samples)
    return {"requests": len(samples),
            "p50_ms": percentile(latencies, 0.50) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
            "max_ms": latencies[-1] * 1000,
            "max_gap_ms": max(b - a for a, b in zip(ends, ends[1:])) * 1000}


def switch_times(control):
    """Wall-clock times the migration entered "switching" (verified; rebase and data path switch
    next) and "switched", from its event stream."""
    times = {}
    for reply in jsonlines.stream(control, {"cmd": "events", "since": 0}, timeout=10):
        event = reply["event"]
        if event.get("event") == "phase" and event["phase"] in ("switching", "switched"):
            times[event["phase"]] = event["time"]
            if event["phase"] == "switched":
                return times["switching"], times["switched"]
    raise BenchError("the migration never reported the switch")


def mirrorfs_cli(*args, timeout=600):
    return run_tool([*MIRRORFS, *args], timeout=timeout)


def measure_switch(base, workdir, size, log):
    """`mirrorfs start` on an overlay of the base, `mirrorfs copy`, then `mirrorfs pivot` under
    load. Reports the stall the data path measured (status), what fio saw, and the probe's
    latencies within 1 s either side of the switch."""
    root = workdir / "switch"
    (root / "dst").mkdir(parents=True)
    (root / "src").mkdir()
    top = make_overlay(root / "src" / "disk.qcow2", base)
    socket_path = sockets.check_unix_path(root / "disk.sock")
    control = f"{socket_path}.ctl"
    server = Child("mirrorfs start", [*MIRRORFS, "start", top, "--dest-dir", root / "dst",
                                      "--socket", socket_path, "--cache", HOST_CACHE],
                   root / "mirrorfs.log")
    try:
        server.start()
        wait_for_output(server, "control ")
        mirrorfs_cli("copy", "--json", "--control", control)
        # The copier's own time: the CLI polls the status every 0.5 s, so its run time is coarser.
        status = json.loads(mirrorfs_cli("status", "--json", "--control", control))
        copy_seconds = status["copy"]["seconds"]
        log(f"  base copied by `mirrorfs copy` in {copy_seconds:.1f}s; pivot under load")
        fio, probe = pivot_under_load(f"nbd+unix:///?socket={socket_path}", size, control)
        check_alive(server)
        status = json.loads(mirrorfs_cli("status", "--json", "--control", control))
        switching, switched = switch_times(control)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    window = [s for s in probe.samples if s[1] >= switching - 1 and s[0] <= switched + 1]
    before = [s for s in probe.samples if s[1] < switching - 1]
    # Where in the switch the worst write fell: during the rebase (QMP on the destination daemon)
    # or the data path's hold, which are the two steps between "switching" and "switched".
    slowest = max(window, key=lambda s: s[1] - s[0], default=None)
    return {"stall_ms": status["switch"]["stall_ms"], "rebase_ms": status["switch"]["rebase_ms"],
            "switching_to_switched_ms": (switched - switching) * 1000,
            "slowest_probe_started_ms": (slowest[0] - switching) * 1000 if slowest else None,
            "base_copy_seconds": copy_seconds,
            "fio": {"iops": fio["write"]["iops"], "clat_max_ms": fio["write"]["clat_ns"]["max"] / 1e6},
            "probe_around_switch": latency_stats(window), "probe_before": latency_stats(before)}


def pivot_under_load(uri, size, control, settle=2.0, after=1.5):
    """fio 4k randwrite qd16 and the probe run from `settle` seconds before `mirrorfs pivot` to
    `after` seconds after it returns. Returns fio's job result and the stopped probe."""
    load = processes.popen(fio_argv(uri, size, JOBS[0].args, runtime=3600, ramp=0),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    probe = None
    try:
        probe = Probe(uri, size)
        probe.start()
        time.sleep(settle)
        mirrorfs_cli("pivot", "--control", control, timeout=120)
        time.sleep(after)
        probe.stop()
        fio = stop_fio(load)
    finally:
        if probe is not None and probe.is_alive():
            probe.stop()
        if load.poll() is None:     # interrupted or failed before fio was stopped
            kill_group(load)
    if probe.error:
        raise BenchError(f"a probe write failed during the switch: {probe.error}")
    return fio, probe


def stop_fio(proc):
    """Stop a fio started with a long runtime: on SIGINT it ends its jobs and still prints its
    results."""
    kill_group(proc, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=FIO_GRACE)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise BenchError("fio did not stop on SIGINT") from None
    return parse_fio(out)


# Outside the matrix (iii): memory.

def measure_rss(base, workdir, config, sizes):
    """nbdkit's resident memory (all its processes) with mirrorfs serving disks of each size:
    idle, and after a short 4k randwrite over the whole disk. A sparse 1 TiB overlay on the base
    is made instantly; its memory should not grow with the virtual size."""
    found = {}
    for label, size in sizes:
        disk = Disk(workdir / f"rss-{size}", base, size)
        try:
            with MirrorfsTarget(disk) as target:
                idle = rss_mib(target.nbdkit_processes())
                run_tool(fio_argv(target.uri, size, JOBS[0].args, config.rss_runtime, ramp=0),
                         timeout=config.rss_runtime + FIO_GRACE)
                found[label] = {"virtual_size": size, "idle_mib": idle,
                                "after_fio_mib": rss_mib(target.nbdkit_processes())}
                target.check()
        finally:
            disk.remove()
    return found


def rss_mib(procs):
    return sum(p.memory_info().rss for p in procs) / MiB


# The report.

def first_line(argv, containing=""):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((line for line in out.splitlines() if containing in line), "unknown").strip()


# Which regime a run measured (issue #28). The same two mirrors rank differently on different
# storage: where the storage takes fewer small writes than one nbdkit interpreter can pass on, both
# wait for the disk and mirrorfs's concurrent fan-out to the two sides wins; where the storage is
# faster, both are bound by the CPU and mirrorfs's extra hops (a Python plugin, a second daemon)
# lose. So every run first measures the two numbers that decide it.

PROBE_RUNTIME = 3


def measure_storage(workdir, cache):
    """The storage's own 4k randwrite qd16 IOPS: fio straight on a file in the work directory
    (libaio; O_DIRECT when the run's daemons use cache=none, else through the page cache), no
    NBD, no qcow2: the most any target of this run could get from it."""
    probe = Path(workdir) / "storage-probe"
    try:
        out = run_tool(["fio", "--name=storage", f"--filename={probe}", "--size=256M",
                        "--rw=randwrite", "--bs=4k", "--iodepth=16", "--ioengine=libaio",
                        f"--direct={1 if cache == 'none' else 0}", "--time_based",
                        f"--runtime={PROBE_RUNTIME}", "--output-format=json"],
                       timeout=PROBE_RUNTIME + FIO_GRACE)
    finally:
        probe.unlink(missing_ok=True)
    return parse_fio(out)["write"]["iops"]


def measure_ceiling(workdir):
    """One interpreter's ceiling: `mirrorfs serve` with both sides in memory (source `nbdkit
    memory`, destination `nbdkit null`), one client connection, 4k randwrite qd16. Nothing waits for
    storage: the IOPS are what one nbdkit process's Python data path passes on, on this CPU."""
    d = Path(workdir) / "ceiling"
    d.mkdir()
    servers = []
    try:
        uris = []
        for name, plugin in (("src", ["memory", "1G"]), ("dst", ["null", "1G"])):
            sock = sockets.check_unix_path(d / f"{name}.sock")
            pidfile = d / f"{name}.pid"
            child = Child(f"nbdkit {plugin[0]}", ["nbdkit", "--foreground", "--exit-with-parent",
                                                  "--pidfile", pidfile, "--unix", sock, *plugin],
                          d / f"{name}.log", pidfile=pidfile)
            child.start()
            servers.append(child)
            uris.append(f"nbd+unix:///?socket={sock}")
        socket_path = sockets.check_unix_path(d / "m.sock")
        server = Child("mirrorfs serve (ceiling)", [*MIRRORFS, "serve", *uris, "--socket",
                                                    socket_path], d / "mirrorfs.log")
        server.start()
        servers.append(server)
        wait_for_output(server, "serving ")
        out = run_tool(fio_argv(f"nbd+unix:///?socket={socket_path}", GiB,
                                ("--rw=randwrite", "--bs=4k", "--iodepth=16"), PROBE_RUNTIME, 1),
                       timeout=PROBE_RUNTIME + 1 + FIO_GRACE)
        return parse_fio(out)["write"]["iops"]
    finally:
        for child in reversed(servers):
            child.stop()
        shutil.rmtree(d, ignore_errors=True)


def regime_of(storage_iops, ceiling_iops):
    """storage-bound when the storage takes fewer 4 KiB writes than one interpreter passes on."""
    return "storage-bound" if storage_iops < ceiling_iops else "CPU-bound"


def machine():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem_kib = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model.group(1) if model else "unknown",
            "memory_gib": round(mem_kib / (1 << 20), 1), "kernel": platform.release(),
            "nbdkit": first_line(["nbdkit", "--version"]),
            "qemu": first_line(["qemu-storage-daemon", "--version"]),
            "libnbd": first_line(["nbdinfo", "--version"], "libnbd"),
            "fio": first_line(["fio", "--version"])}


def fmt(value, spec):
    """`value` formatted by `spec`, or a dash as wide when there is no value."""
    if value is None:
        return format("-", f">{re.match(r'[0-9]*', spec).group()}")
    return format(value, spec)


def print_report(report, config):
    m = report["machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}")
    print(f"         {m['nbdkit']}, {m['qemu']}, {m['libnbd']}, {m['fio']}")
    print(f"         load average {report['load'][0]:.2f} before, {report['load'][1]:.2f} after "
          "(1 min; anything else running skews every number)")
    regime = report.get("regime")
    if regime:
        print(f"\nstorage: {regime['storage_iops']:,.0f} IOPS 4k randwrite qd16 (fio libaio "
              f"straight on a file in {regime['where']}, "
              f"{'O_DIRECT' if report['config']['cache'] == 'none' else 'page cache'})")
        print(f"one interpreter's ceiling: {regime['ceiling_iops']:,.0f} IOPS (mirrorfs serve, "
              "nbdkit memory -> nbdkit null, 1 connection, 4k randwrite qd16)")
        print(f"regime: {regime['regime']} (the storage takes "
              f"{'fewer' if regime['regime'] == 'storage-bound' else 'more'} small writes than one "
              "interpreter passes on); the ratios below hold for this regime")
    print(f"\nfio --ioengine=nbd over the whole {config.size // MiB} MiB disk, {config.runtime} s "
          f"per job after {config.ramp} s ramp; median of {config.runs} run(s); storage daemons "
          f"with cache={report['config']['cache']}")
    print(f"\n{'job':32} {'target':12} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9} {'spread':>7}")
    for label in row_labels(config):
        for i, kind in enumerate(config.targets):
            row = report["results"].get(kind.name, {}).get(label)
            name = label if i == 0 else ""
            if row is None:
                print(f"{name:32} {kind.name:12} {'failed':>9}")
                continue
            print(f"{name:32} {kind.name:12} {row['iops']:9,.0f} {row['mbps']:8.1f} "
                  f"{row['p50_us']:9,.0f} {row['p99_us']:9,.0f} {fmt(row['spread'], '7.0%')}")
    print("\nspread: (max - min) / median of the runs' IOPS. Latency: fio's completion latency (clat).")
    print(f"\n{'IOPS relative to':32} " + " ".join(f"{name:>23}" for name, *_ in RATIOS))
    for label, found in report["ratios"].items():
        print(f"{label:32} " + " ".join(f"{fmt(found.get(name), '23.2f')}" for name, *_ in RATIOS))
    if config.cpu:
        print_cpu(report, config)
    print_extras(report)
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")
    for error in report["errors"]:
        print(f"ERROR: {error}")


def print_cpu(report, config):
    print("\nCPU per request, microseconds (each process's CPU rate over the job's IOPS, medians; "
          "fio's own in the last column):")
    for label in row_labels(config):
        for kind in config.targets:
            row = report["results"].get(kind.name, {}).get(label)
            if not row:
                continue
            parts = cpu_parts(row)
            print(f"  {label:30} {kind.name:12} total {sum(parts.values()):5.0f}: "
                  + ", ".join(f"{role} {v:.0f}" for role, v in parts.items() if v >= 1)
                  + f"; fio {row.get('fio_cpu_us', 0):.0f}")


def print_extras(report):
    if "copy" in report:
        print("\nbase copy, fully written qcow2 export -> empty qcow2 export:")
        for name, found in report["copy"].items():
            if found is None:
                print(f"  {name:44} not available yet")
            else:
                print(f"  {name:44} {found['mbps']:7.0f} MB/s ({found['bytes'] // MiB} MiB in "
                      f"{found['seconds']:.2f} s)")
    switch = report.get("switch")
    if switch:
        around, before = switch["probe_around_switch"], switch["probe_before"]
        print("\nswitch (`mirrorfs pivot`) under fio 4k randwrite qd16 plus a 4k write probe:")
        print(f"  data path stall (status):        {switch['stall_ms']:.1f} ms "
              f"(rebase {switch['rebase_ms']:.1f} ms; switching->switched "
              f"{switch['switching_to_switched_ms']:.1f} ms)")
        print(f"  fio during the run:              {switch['fio']['iops']:,.0f} IOPS, "
              f"max clat {switch['fio']['clat_max_ms']:.1f} ms")
        print(f"  probe within 1 s of the switch:  {around['requests']} writes, p50 "
              f"{fmt(around.get('p50_ms'), '.2f')} ms, p99 {fmt(around.get('p99_ms'), '.2f')} ms, "
              f"max {fmt(around.get('max_ms'), '.1f')} ms, longest gap "
              f"{fmt(around.get('max_gap_ms'), '.1f')} ms")
        print(f"  the slowest probe write started  {fmt(switch['slowest_probe_started_ms'], '.0f')} ms "
              "after `switching` (0: rebase starts; the data path hold is at the end)")
        print(f"  probe before (steady, mirrored): p50 {fmt(before.get('p50_ms'), '.2f')} ms, "
              f"p99 {fmt(before.get('p99_ms'), '.2f')} ms, max {fmt(before.get('max_ms'), '.1f')} ms")
    if "rss" in report:
        print("\nnbdkit RSS with mirrorfs serving (sum of nbdkit processes):")
        for label, found in report["rss"].items():
            print(f"  {label:12} idle {found['idle_mib']:6.1f} MiB, after fio "
                  f"{found['after_fio_mib']:6.1f} MiB")


# The command line.

_SIZE = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.I)


def parse_size(text):
    m = _SIZE.match(text.strip())
    if not m or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"expected a size like 1G or 256M, not {text!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2).upper()]


def pick(choices, text, what):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)}; "
                                         f"expected some of {', '.join(choices)}")
    return [choices[n] for n in names]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", type=parse_size, help="virtual disk size (default 1G; --quick 64M)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 5; --quick 1)")
    p.add_argument("--runs", type=int, help="repeat the matrix K times, report medians (default 3)")
    p.add_argument("--targets", default=",".join(k.name for k in TARGETS),
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--jobs", default=None, help="comma-separated subset of: "
                   + ",".join(j.key for j in JOBS))
    p.add_argument("--no-extras", action="store_true",
                   help="only the matrix: no copy, switch or memory measurements")
    p.add_argument("--cache", choices=storage.CACHE_MODES, default="auto",
                   help="every storage daemon's use of the host page cache, as mirrorfs serve "
                        "--cache (default auto: none where the work directory allows O_DIRECT)")
    p.add_argument("--cpu", action="store_true",
                   help="also measure and print the CPU each process spends per request")
    p.add_argument("--regime", choices=REGIMES, default="auto",
                   help="where the images live: disk (/tmp, O_DIRECT: cache=none), fast (tmpfs "
                        "in /dev/shm through the page cache: cache=writeback), both (the whole "
                        "bench once in each), or auto (/tmp with --cache; the default)")
    p.add_argument("--no-regime", action="store_true",
                   help="skip measuring the storage's own IOPS and one interpreter's ceiling")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    try:
        args.targets = pick({k.name: k for k in TARGETS}, args.targets, "target")
        jobs = args.jobs or ",".join(QUICK_JOBS if args.quick else (j.key for j in JOBS))
        args.jobs = pick({j.key: j for j in JOBS}, jobs, "job")
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    # --quick changes the defaults, never what was asked for explicitly.
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.runtime = args.runtime or (1 if args.quick else 5)
    args.runs = args.runs or (1 if args.quick else 3)
    args.ramp = 0 if args.quick else 1
    args.rss_runtime = 1 if args.quick else 3
    return args


def interrupt_on_signals():
    """SIGTERM unwinds like Ctrl-C, so that every `finally` stops what it started; and SIGINT does
    even when a shell started us in the background with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def run_extras(report, base, workdir, config, log):
    """The measurements outside the matrix; each may fail alone."""
    steps = [
        ("copy", lambda: {"nbdcopy": measure_nbdcopy(base, workdir, config.size),
                          "mirrorfs serve --copy full": measure_mirrorfs_copy(base, workdir,
                                                                               config.size)}),
        ("switch", lambda: measure_switch(base, workdir, config.size, log)),
        ("rss", lambda: measure_rss(base, workdir, config, [
            (f"{config.size // MiB} MiB", config.size), ("1 TiB sparse", TiB)])),
    ]
    for name, measure in steps:
        log(f"{name}")
        try:
            report[name] = measure()
        except Exception as e:      # one failed measurement must not lose the others
            report["errors"].append(f"{name}: {type(e).__name__}: {e}")
            log(f"  {name} FAILED: {e}")
    if "switch" in report:
        copy = report.setdefault("copy", {})
        seconds = report["switch"]["base_copy_seconds"]
        copy["mirrorfs copy (file to file: qemu-img convert)"] = {
            "tool": "qemu-img convert", "bytes": config.size, "seconds": seconds,
            "mbps": config.size / seconds / MB}


def bench(config, log):
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mfsbench-", dir=WORK_PARENT))
    report = {"machine": machine(),
              "config": {"size": config.size, "runtime": config.runtime, "ramp": config.ramp,
                         "runs": config.runs, "targets": [k.name for k in config.targets],
                         "jobs": [j.label for j in config.jobs], "cache": HOST_CACHE},
              "errors": [], "load": [os.getloadavg()[0], None]}
    try:
        if not config.no_regime:
            log("the storage's own 4k randwrite qd16, and one interpreter's ceiling")
            storage_iops = measure_storage(workdir, HOST_CACHE)
            ceiling_iops = measure_ceiling(workdir)
            report["regime"] = {"storage_iops": storage_iops, "ceiling_iops": ceiling_iops,
                                "where": WORK_PARENT,
                                "regime": regime_of(storage_iops, ceiling_iops)}
            log(f"  storage {storage_iops:,.0f} IOPS, ceiling {ceiling_iops:,.0f} IOPS: "
                f"{report['regime']['regime']}")
        log(f"work directory {workdir}; writing the {config.size // MiB} MiB base")
        base = make_base(workdir / "base.qcow2", config.size)
        samples, report["errors"] = run_matrix(base, workdir, config, log)
        report["results"] = medians(samples)
        report["ratios"] = ratios(report["results"], config)
        report["samples"] = samples
        if not config.no_extras:
            run_extras(report, base, workdir, config, log)
    finally:
        if config.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - started
    report["load"][1] = os.getloadavg()[0]
    return report


# --regime: where the images live and how the daemons open them (WORK_PARENT, HOST_CACHE).
REGIMES = ("auto", "disk", "fast", "both")
REGIME_PLACES = {"disk": ("/tmp", "none"), "fast": ("/dev/shm", "writeback")}


def main():
    global HOST_CACHE, WORK_PARENT
    config = parse_args()
    interrupt_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    if config.regime == "auto":
        places = [(WORK_PARENT, config.cache)]
    else:
        places = [REGIME_PLACES[r] for r in (("disk", "fast") if config.regime == "both"
                                             else (config.regime,))]
    reports = []
    for parent, cache in places:
        WORK_PARENT, HOST_CACHE = parent, cache
        if HOST_CACHE == "auto":
            with tempfile.NamedTemporaryFile(dir=WORK_PARENT) as probe:
                HOST_CACHE = "none" if storage.direct_io_supported(probe.name) else "writeback"
        log(f"images in {WORK_PARENT}, storage daemons with cache={HOST_CACHE}")
        try:
            report = bench(config, log)
        except KeyboardInterrupt:
            log("bench: interrupted")
            return 130
        reports.append(report)
        if not config.json:
            print_report(report, config)
        log(f"bench: done in {report['elapsed_s']:.0f} s")
    if config.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
    return 1 if any(r["errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
