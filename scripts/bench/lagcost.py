"""What a 4 KiB write costs the data path's interpreter, with and without `--lag` (issue #28), counted
rather than timed: Python calls, lock operations and libnbd calls per write.

On a CPU-bound machine (scripts/bench/regime.py) the lag's ratio against a local destination is
its extra CPU per write, and on a shared machine a timing of that is noise (the load moves by
more than the difference within a run). Counts do not move with the load: this runs `Disk.pwrite`
in this process (the data path's own classes, as nbdkit's threads call them) on two `nbdkit memory`
servers, the destination behind nbdkit's delay filter (2 ms a write) or not, with a state
directory, under cProfile: the clients' threads and the lag's workers are profiled, and their
calls (Python functions and the C functions they call) are divided by the writes. A libnbd call
releases and retakes the GIL.

    .venv/bin/python -m scripts.bench.lagcost                   # sync and lag, qd1 and qd16
    .venv/bin/python -m scripts.bench.lagcost --threads 16 --seconds 5

IOPS and CPU per write are printed too, for what they are worth on the machine of the moment.
"""

import argparse
import cProfile
import os
import pstats
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

from mirrorfs.datapath.mirror import lag as lag_module
from mirrorfs.datapath.mirror.dirtymap import DirtyMap
from mirrorfs.datapath.mirror.disk import Disk
from mirrorfs.datapath.sides.backend import NbdBackend
from mirrorfs.datapath.statedir import open_for
from mirrorfs.system import sockets
from mirrorfs.system.children import Child

from .common import MiB, WORK_PARENT

SIZE = 512 * MiB
REGION = 64 * MiB
LAG = 64 * MiB
BS = 4096


def serve_memory(d, name, delay):
    sock = sockets.check_unix_path(d / f"{name}.sock")
    pidfile = d / f"{name}.pid"
    plugin = ["--filter=delay", "memory", str(SIZE), "delay-write=2ms"] if delay else \
        ["memory", str(SIZE)]
    child = Child(f"nbdkit {name}", ["nbdkit", "--foreground", "--exit-with-parent", "--pidfile",
                                     pidfile, "--threads", 16, "--unix", sock, *plugin],
                  d / f"{name}.log", pidfile=pidfile)
    child.start()
    return child, f"nbd+unix:///?socket={sock}"


def counts(profiles):
    """(calls, libnbd calls, lock operations) over `profiles`: a lock operation is a method call
    on a threading lock (an acquire, a release, a `with` block's exit; a Condition's wait or notify
    makes several)."""
    if not profiles:
        return 0, 0, 0
    stats = pstats.Stats(profiles[0])
    for p in profiles[1:]:
        stats.add(p)
    rows = stats.stats.items()
    return (sum(v[1] for _, v in rows), sum(v[1] for k, v in rows if "libnbdmod" in k[2]),
            sum(v[1] for k, v in rows if "_thread.lock" in k[2]))


def measure(workdir, lag, delay, threads, seconds):
    d = Path(tempfile.mkdtemp(dir=workdir))
    servers = []
    workers = []
    original = lag_module.Lag._run

    def profiled(self):
        p = cProfile.Profile()
        workers.append(p)
        p.enable()
        try:
            original(self)
        finally:
            p.disable()

    lag_module.Lag._run = profiled
    try:
        src_server, src_uri = serve_memory(d, "src", False)
        servers.append(src_server)
        dst_server, dst_uri = serve_memory(d, "dst", delay)
        servers.append(dst_server)
        source, dest = NbdBackend(src_uri, "source"), NbdBackend(dst_uri, "destination")
        state, _ = open_for(d / "state", copy="none", source={"uri": "s", "size": SIZE},
                            dest={"uri": "d", "size": SIZE}, size=SIZE, region_size=REGION)
        disk = Disk(source, dest, DirtyMap(SIZE, REGION, state), policy="fail",
                    lag=LAG if lag else 0)
        if disk.lag:
            disk.lag.start()
        for i in range(threads):            # every connection open before the count starts
            disk.pwrite(bytearray(BS), i * BS, False)
        if disk.lag:
            disk.lag.drain(30)
        stop = threading.Event()
        done, clients = [0] * threads, []

        def client(i):
            rnd, buf = random.Random(i), bytearray(os.urandom(BS))
            p = cProfile.Profile()
            p.enable()
            n = 0
            while not stop.is_set():
                disk.pwrite(buf, rnd.randrange(SIZE // BS) * BS, False)
                n += 1
            p.disable()
            clients.append(p)
            done[i] = n

        running = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
        t0, c0 = time.monotonic(), os.times()
        for t in running:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in running:
            t.join()
        elapsed, c1 = time.monotonic() - t0, os.times()
        writes = sum(done)
        if disk.lag:
            disk.lag.drain(60)
            disk.lag.stop()
            for t in disk.lag._threads:
                t.join(5)
        cpu = c1.user - c0.user + c1.system - c0.system
        c, w = counts(clients), counts(workers)
        source.close()
        dest.close()
        return {"iops": writes / elapsed, "cpu_us": cpu / writes * 1e6,
                "calls": (c[0] + w[0]) / writes, "libnbd": (c[1] + w[1]) / writes,
                "locks": (c[2] + w[2]) / writes, "client_calls": c[0] / writes,
                "worker_calls": w[0] / writes}
    finally:
        lag_module.Lag._run = original
        for child in reversed(servers):
            child.stop()
        shutil.rmtree(d, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(prog="python -m scripts.bench.lagcost",
                                description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, action="append",
                   help="client threads (the queue depth); repeatable (default 1 and 16)")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mfslagcost-", dir=WORK_PARENT))
    print(f"{'setup':34}{'calls/write':>12}{'libnbd':>8}{'locks':>7}{'(clients':>10}"
          f"{'workers)':>9}{'IOPS':>9}{'CPU µs':>8}")
    try:
        for threads in args.threads or [1, 16]:
            for name, lag, delay in (("synchronous, local destination", False, False),
                                     ("--lag 64M, 2 ms destination", True, True)):
                r = measure(workdir, lag, delay, threads, args.seconds)
                print(f"{name + f' qd{threads}':34}{r['calls']:12.1f}{r['libnbd']:8.2f}"
                      f"{r['locks']:7.2f}{r['client_calls']:10.1f}{r['worker_calls']:9.1f}"
                      f"{r['iops']:9,.0f}{r['cpu_us']:8.1f}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"load average {os.getloadavg()[0]:.2f}; counts per write of the clients' threads and "
          "the lag's workers together")


if __name__ == "__main__":
    main()
