"""`make bench`, part two: the destination is remote (issue #13).

The source is a local qcow2 (a storage daemon, cache=none, as in the local bench); the destination is

    nbd-1ms   a qcow2 exported by a qemu-storage-daemon behind nbdkit's delay filter, 1 ms per
              read/write/zero/trim request (whole milliseconds: nbdkit reads "0.5ms" as zero);
              nbd-Nms the same with N ms
    rbd       an RBD image on a one-node Ceph cluster started for the run (tests/lib/ceph.py)

and two mirrors write to it, each target fresh on empty images:

    mirrorfs     `mirrorfs serve SRC DEST`, DEST the delayed NBD URI or the `rbd:` spec
    qemu-mirror  one qemu-storage-daemon: the source qcow2 exported, and an active mirror job
                 (blockdev-mirror, copy-mode=write-blocking, sync=none: only what clients write)
                 to a node of the same remote export: QEMU's `nbd` driver, or its `rbd` driver

fio jobs: 4k randwrite qd1, 4k randwrite qd16, 1M seq write qd4. Then the full copy of a fully
written qcow2 to the remote: `mirrorfs serve --copy full` (time to synchronized) next to
`qemu-img convert -n -T none` into the same kind of fresh image (both read the base with O_DIRECT).

    make bench                                       # runs this after the local bench
    .venv/bin/python -m scripts.bench.remote --quick # smoke run
"""

import argparse
import os
import re
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mirrorfs.system import sockets
from mirrorfs.system.children import Child
from tests.lib import ceph

from . import images
from .common import (MIRRORFS, WORK_PARENT, BenchError, GiB, MB, MiB, check_alive, interrupt_on_signals,
                     run_tool, size_arg, wait_for_output)
from .cpu import cpu_parts
from .fio import JOBS as ALL_JOBS
from .fio import run_job
from .images import StorageExport, make_base, qcow2_node, qemu_img
from .report import fmt
from .targets import MirrorfsTarget, QemuMirrorTarget

DELAY_MS = 1            # the default remote's delay, nbd-1ms
JOBS = tuple(job for job in ALL_JOBS if job.key in ("4k-randwrite-qd1", "4k-randwrite", "1m-write"))


# The remote destinations. Each makes a fresh image per use and tears it down after.

class DelayedNbd:
    """A qcow2 exported by a storage daemon, behind nbdkit's delay filter: every request waits 1 ms
    before it is passed on, like a network round trip."""
    def __init__(self, workdir, size, delay_ms=DELAY_MS):
        self.workdir, self.size, self.count = workdir, size, 0
        self.delay_ms = delay_ms
        self.name = f"nbd-{delay_ms}ms"

    def make(self):
        self.count += 1
        d = self.workdir / f"nbd{self.count}"
        d.mkdir()
        image = d / "dst.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", image, self.size)
        return DelayedNbdImage(d, image, self.delay_ms)


class DelayedNbdImage:
    def __init__(self, d, image, delay_ms):
        self.dir = d
        self.export = StorageExport(d, "remote", [qcow2_node("dst", image)], "dst")
        self.socket = sockets.check_unix_path(d / "delay.sock")
        pidfile = d / "delay.pid"
        delays = [f"delay-{kind}={delay_ms}ms" for kind in ("read", "write", "zero", "trim")]
        self.nbdkit = Child("nbdkit (delay filter)", [
            "nbdkit", "--foreground", "--exit-with-parent", "--pidfile", pidfile, "--threads", 16,
            "--unix", self.socket, "--filter=delay", "nbd", f"socket={self.export.socket}",
            *delays], d / "delay.log", pidfile=pidfile)

    def start(self):
        self.export.start()
        self.nbdkit.start()

    @property
    def spec(self):
        """What mirrorfs and qemu-img convert take."""
        return f"nbd+unix:///?socket={self.socket}"

    def qemu_node(self, name):
        return {"driver": "nbd", "node-name": name,
                "server": {"type": "unix", "path": str(self.socket)}}

    def check(self):
        check_alive(self.export.child, self.nbdkit)

    def remove(self):
        self.nbdkit.stop()
        self.export.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Rbd:
    name = "rbd"

    def __init__(self, cluster, size):
        self.cluster, self.size, self.count = cluster, size, 0

    def make(self):
        self.count += 1
        return RbdImage(self.cluster, f"bench{self.count}", self.size)


class RbdImage:
    def __init__(self, cluster, name, size):
        self.cluster, self.name = cluster, name
        cluster.rbd("create", "--size", f"{size // MiB}M", f"{ceph.POOL}/{name}")

    def start(self):
        pass

    @property
    def spec(self):
        return self.cluster.spec(self.name)

    def qemu_node(self, name):
        # cache.direct: librbd's cache off, as mirrorfs's own storage daemons open RBD images
        return {"driver": "rbd", "node-name": name, "pool": ceph.POOL, "image": self.name,
                "conf": str(self.cluster.conf), "cache": {"direct": True}}

    def check(self):
        pass

    def remove(self):
        self.cluster.rbd("rm", "--no-progress", f"{ceph.POOL}/{self.name}", timeout=300)


# The mirrors.

class Mirrorfs(MirrorfsTarget):
    """The local bench's mirrorfs target, with the remote export as DEST."""

    def __init__(self, d, source, remote):
        self._serve(d, source, remote.spec, "none")


class QemuMirror(QemuMirrorTarget):
    """The local bench's QEMU mirror, with the remote export as the mirror's target node."""
    SYNC = "none"       # the images start empty and equal: the job mirrors what clients write

    def __init__(self, d, source, remote):
        graph = [qcow2_node("source", source), remote.qemu_node("target")]
        self.daemon = StorageExport(d, "mirror", graph, "source", monitor=True)


# Where the CPU goes (--cpu, measured by run_job): the remote shares the CPUs with the mirror
# and fio on this kind of machine, so a job can be bound by CPU, not by the remote's latency; this
# says which process pays.

def roles(target, image):
    """{role: pid} of the processes one measurement runs: the mirror's and the remote's."""
    found = dict(target.processes())
    if isinstance(image, DelayedNbdImage):
        found["remote: storage daemon"] = image.export.child.pid
        found["remote: delay filter's nbdkit"] = image.nbdkit.pid
    else:
        for name, child in image.cluster.daemons.items():
            found[f"remote: ceph-{name.split('.')[0]}"] = child.pid
    return {role: pid for role, pid in found.items() if pid}


def measure(remote, kind, workdir, config, log):
    rows = {}
    d = workdir / f"{remote.name}-{kind.name}-{time.monotonic_ns()}"
    d.mkdir()
    source = d / "src.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", source, config.size)
    image = remote.make()
    target = None
    try:
        image.start()
        target = kind(d, source, image)
        target.start()
        processes = roles(target, image) if config.cpu else None
        for job in config.jobs:
            found = run_job(target.uri, job, config, processes)
            rows.update(found)
            log(f"  {remote.name:8} {kind.name:12} {job.label:20} "
                + ", ".join(f"{m['iops']:,.0f} IOPS" for m in found.values()))
        target.check()
        image.check()
    finally:
        if target is not None:
            target.stop()
        image.remove()
        shutil.rmtree(d, ignore_errors=True)
    return rows


def measure_copy(remote, base, workdir, size, log, run=0):
    """The full copy of the fully written `base` to a fresh remote image: mirrorfs's copier (to
    synchronized, from its status) and qemu-img convert -n (wall time)."""
    found = {}
    # Both copies read the base as mirrorfs's source daemon does (cache=none: O_DIRECT, so
    # `qemu-img convert -T none`), with nothing of it dirty in the page cache: an O_DIRECT read
    # first writes back the dirty pages it covers, which would charge the base's writing to
    # whichever copy came first.
    os.sync()
    image = remote.make()
    d = workdir / f"copy-{remote.name}-{run}"
    d.mkdir()
    try:
        image.start()
        socket_path = sockets.check_unix_path(d / "m.sock")
        server = Child("mirrorfs serve --copy full", [
            *MIRRORFS, "serve", "--copy", "full", "--cache", "none", base, image.spec,
            "--socket", socket_path], d / "mirrorfs.log")
        try:
            server.start()
            wait_for_output(server, "control ")
            deadline = time.monotonic() + 900
            while True:
                status = json.loads(run_tool([*MIRRORFS, "status", "--json", "--control",
                                              f"{socket_path}.ctl"], timeout=60))
                seconds = status["datapath"]["copy"]["synchronized_seconds"]
                if seconds is not None:
                    break
                check_alive(server)
                if time.monotonic() > deadline:
                    raise BenchError("mirrorfs's copy did not finish in 900 s")
                time.sleep(0.1)
        finally:
            server.stop()
        found["mirrorfs serve --copy full"] = seconds
        log(f"  {remote.name:8} mirrorfs copy {seconds:.2f} s")
    finally:
        image.remove()
    image = remote.make()
    try:
        image.start()
        started = time.monotonic()
        run_tool(["qemu-img", "convert", "-n", "-T", "none", "-f", "qcow2", "-O", "raw", base,
                  image.spec],
                 timeout=900)
        found["qemu-img convert -n"] = time.monotonic() - started
        log(f"  {remote.name:8} qemu-img convert {found['qemu-img convert -n']:.2f} s")
    finally:
        image.remove()
        shutil.rmtree(d, ignore_errors=True)
    return {name: {"seconds": s, "mbps": size / s / MB} for name, s in found.items()}


def print_report(report, config):
    print(f"\nremote destinations: fio --ioengine=nbd over the whole {config.size // MiB} MiB disk, "
          f"{config.runtime} s per job after {config.ramp} s ramp, median of {config.runs} run(s); "
          "source a local qcow2 (cache=none)")
    print(f"\n{'destination':12} {'job':22} {'mirrorfs IOPS':>14} {'qemu-mirror IOPS':>17} "
          f"{'ratio':>6} {'mirrorfs p50 us':>16} {'qemu p50 us':>12}")
    for remote, rows in report["results"].items():
        for job in JOBS:
            m = rows.get("mirrorfs", {}).get(job.label)
            q = rows.get("qemu-mirror", {}).get(job.label)
            ratio = m["iops"] / q["iops"] if m and q and q["iops"] else None
            print(f"{remote:12} {job.label:22} {fmt(m and m['iops'], '14,.0f')} "
                  f"{fmt(q and q['iops'], '17,.0f')} {fmt(ratio, '6.2f')} "
                  f"{fmt(m and m['p50_us'], '16,.0f')} {fmt(q and q['p50_us'], '12,.0f')}")
    if config.cpu:
        print("\nCPU per request (microseconds; each process's CPU rate over the job's IOPS; fio "
              "not counted):")
        for remote, rows in report["results"].items():
            for job in config.jobs:
                for kind in ("mirrorfs", "qemu-mirror"):
                    m = rows.get(kind, {}).get(job.label)
                    if not m:
                        continue
                    parts = cpu_parts(m)
                    print(f"  {remote:8} {job.label:20} {kind:12} "
                          f"total {sum(parts.values()):6.0f}: "
                          + ", ".join(f"{role} {v:.0f}" for role, v in parts.items() if v >= 1))
    print(f"\nfull copy of a fully written {config.size // MiB} MiB qcow2 to a fresh remote image "
          f"(median of {config.runs} run(s)):")
    for remote, found in report.get("copy", {}).items():
        m, q = found.get("mirrorfs serve --copy full"), found.get("qemu-img convert -n")
        ratio = q["seconds"] / m["seconds"] if m and q else None
        print(f"  {remote:8} mirrorfs serve --copy full {m['seconds']:7.2f} s ({m['mbps']:.0f} MB/s)"
              f"   qemu-img convert -n {q['seconds']:7.2f} s ({q['mbps']:.0f} MB/s)"
              f"   mirrorfs speed / qemu-img's {fmt(ratio, '.2f')}")
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")
    for error in report["errors"]:
        print(f"ERROR: {error}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.bench.remote", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", type=size_arg, help="virtual disk size (default 1G; --quick 64M)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 5; --quick 1)")
    p.add_argument("--runs", type=int, help="runs per target, medians reported (default 3)")
    p.add_argument("--remotes", default="nbd-1ms,rbd",
                   help="comma-separated: %(default)s (nbd-Nms: any whole N)")
    p.add_argument("--jobs", help="comma-separated fio jobs to run (default all: "
                   + ",".join(job.key for job in JOBS) + "); 'none' runs only the copy")
    p.add_argument("--no-copy", action="store_true", help="skip the full copy")
    p.add_argument("--cpu", action="store_true",
                   help="also print the CPU each process spends per request")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or (64 * MiB if args.quick else GiB)
    args.runtime = args.runtime or (1 if args.quick else 5)
    args.runs = args.runs or (1 if args.quick else 3)
    args.ramp = 0 if args.quick else 1
    args.remotes = [r.strip() for r in args.remotes.split(",") if r.strip()]
    if not args.remotes or any(r != "rbd" and not re.fullmatch(r"nbd-[1-9][0-9]*ms", r)
                               for r in args.remotes):
        p.error("--remotes: expected some of nbd-Nms (N whole milliseconds), rbd")
    known = {job.key: job for job in JOBS}
    names = [n.strip() for n in (args.jobs or ",".join(known)).split(",") if n.strip()]
    if names == ["none"]:
        names = []
    if set(names) - set(known):
        p.error(f"--jobs: expected some of {','.join(known)}, or none")
    args.jobs = [known[n] for n in names]
    return args


def main():
    config = parse_args()
    images.HOST_CACHE = "none"
    interrupt_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mfsremote-", dir=WORK_PARENT))
    report = {"results": {}, "copy": {}, "errors": [], "samples": {}}
    cluster = None
    try:
        remotes = []
        for name in config.remotes:
            if name.startswith("nbd-"):
                remotes.append(DelayedNbd(workdir, config.size, int(name[4:-2])))
        if "rbd" in config.remotes:
            log("starting a one-node Ceph cluster")
            cluster = ceph.CephCluster(workdir / "ceph").start()
            remotes.append(Rbd(cluster, config.size))
        for remote in remotes if config.jobs else ():
            samples = {}
            for run in range(config.runs):
                for kind in (Mirrorfs, QemuMirror):
                    log(f"run {run + 1}/{config.runs}: {remote.name} {kind.name}")
                    try:
                        for label, m in measure(remote, kind, workdir, config, log).items():
                            samples.setdefault(kind.name, {}).setdefault(label, []).append(m)
                    except Exception as e:
                        report["errors"].append(f"{remote.name} {kind.name}: {type(e).__name__}: {e}")
                        log(f"  FAILED: {e}")
            report["samples"][remote.name] = samples
            report["results"][remote.name] = {
                kind: {label: {k: statistics.median(r[k] for r in runs if k in r) for k in runs[0]}
                       for label, runs in rows.items()} for kind, rows in samples.items()}
        base = None
        for remote in remotes if not config.no_copy else ():
            if base is None:
                log("writing the base for the copy")
                base = make_base(workdir / "base.qcow2", config.size)
            try:
                # Each copy takes seconds: one run is at the mercy of the machine's other work.
                runs = [measure_copy(remote, base, workdir, config.size, log, run)
                        for run in range(config.runs)]
                report["copy"][remote.name] = {
                    name: {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
                    for name in runs[0]}
            except Exception as e:
                report["errors"].append(f"{remote.name} copy: {type(e).__name__}: {e}")
                log(f"  FAILED: {e}")
    except KeyboardInterrupt:
        log("bench remote: interrupted")
        return 130
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - started
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, config)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
