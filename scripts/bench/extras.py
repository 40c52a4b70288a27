"""The measurements outside the matrix: the base copy (nbdcopy, mirrorfs serve --copy full), the
switch's stall under fio load, nbdkit's memory (RSS) for a small and a huge disk."""

import json
import random
import shutil
import signal
import subprocess
import threading
import time

import nbd

from mirrorfs.system import children as processes
from mirrorfs.system import sockets
from mirrorfs.common import jsonlines
from mirrorfs.system.children import Child

from . import images
from .common import BenchError, FIO_GRACE, MB, MIRRORFS, MiB, TiB, check_alive, kill_group, run_tool, wait_for_output
from .fio import JOBS, fio_argv, parse_fio
from .images import Disk, StorageExport, make_overlay, qcow2_node, qemu_img
from .targets import MirrorfsTarget


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
                                      "--socket", socket_path, "--cache", images.HOST_CACHE],
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
