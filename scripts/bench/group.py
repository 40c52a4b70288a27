"""What a group's switch and its safety net cost (docs/PERFORMANCE.md, "A group's switch and its
safety net").

    .venv/bin/python -m scripts.bench.group [--rounds 5] [--disks 3] [--seconds 10] [--size 1G]

1. The hold: a host service (`mirrorfs host`) with --disks named disks; each round moves them once
   with `start NAME` one at a time (the hold of one disk's pivot) and once as a group (`start
   NAME...`: the group's pivot, then its commit), under fio 4k randwrite (--depth, default 4;
   0: idle) on every disk. Prints the median and maximum holds clients saw.
2. The net's cost: fio 4k randwrite, iodepth 16 and 1, for --seconds on the first member of a
   group: before the pivot (mirroring), under the net (after the pivot), and after the commit
   (the destination alone).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from .common import MIRRORFS, WORK_PARENT, GiB, size_arg


class Bench:
    def __init__(self, work):
        self.work = work
        self.env = {**os.environ, "MIRRORFS_REGISTRY": str(work / "registry"),
                    "MIRRORFS_RUN_DIR": str(work / "run")}
        self.procs = []

    def mirrorfs(self, *args):
        res = subprocess.run([*MIRRORFS, *map(str, args)], env=self.env, capture_output=True,
                             text=True)
        if res.returncode:
            raise SystemExit(f"mirrorfs {' '.join(map(str, args))}: {res.stderr.strip()}")
        return res.stdout

    def background(self, name, *args, ready):
        out = self.work / f"{name}.out"
        proc = subprocess.Popen([*MIRRORFS, *map(str, args)], env=self.env, stdout=open(out, "w"),
                                stderr=open(f"{out}.err", "w"), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while ready not in out.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{name}: {Path(f'{out}.err').read_text()}")
            time.sleep(0.05)
        self.procs.append(proc)
        return proc

    def fio(self, sock, depth, seconds=None):
        args = ["fio", "--name=w", "--ioengine=nbd", f"--uri=nbd+unix:///?socket={sock}",
                "--rw=randwrite", "--bs=4k", f"--iodepth={depth}", "--size=256M",
                "--output-format=json", "--time_based", f"--runtime={seconds or 3600}"]
        return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def iops(self, sock, depth, seconds):
        out, _ = self.fio(sock, depth, seconds).communicate()
        job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        return job["iops"], job["clat_ns"]["percentile"]["99.000000"] / 1000

    def stop(self):
        """Stop every migration started (the host service stays)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        self.procs = []


def disks(bench, prefix, n):
    names = []
    for i in range(n):
        name = f"{prefix}{i}"
        image = bench.work / "a" / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(bench.size)],
                       check=True)
        bench.mirrorfs("add", name, image, "--socket", bench.work / f"{name}.sock")
        names.append(name)
    time.sleep(1)
    return names


def move(bench, names, group, state):
    """Start, copy, pivot (and commit for a group) under fio on every disk: the holds."""
    loads = []
    state.mkdir()
    if group:
        bench.background(state.name, "start", *names, "--dest-dir", bench.work / "b",
                         "--state-dir", state / "g", ready="control ")
    for name in names:
        if not group:
            bench.background(name, "start", name, "--dest-dir", bench.work / "b",
                             "--state-dir", state / name, ready="control ")
        if bench.depth:
            loads.append(bench.fio(bench.work / f"{name}.sock", bench.depth))
    time.sleep(2)
    holds = []
    for name in (names[:1] if group else names):
        bench.mirrorfs("copy", name)
        # One disk: its final switch (a named disk's bare pivot keeps a net, as a group's does).
        out = bench.mirrorfs("pivot", name, *(() if group else ("--commit",)))
        holds.append(float(out.split("clients held ")[1].split(" ms")[0]))
    commit = None
    if group:
        out = bench.mirrorfs("commit", names[0])
        commit = float(out.split("clients held ")[1].split(" ms")[0])
    for load in loads:
        load.send_signal(signal.SIGINT)
        load.wait(60)
    return holds, commit


def main():
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.group",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--disks", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--depth", type=int, default=4,
                        help="the iodepth of the fio load on every disk while it switches (0: idle)")
    parser.add_argument("--size", type=size_arg, default=GiB,
                        help="each disk's virtual size (default 1G)")
    parser.add_argument("--no-net", action="store_true", help="measure the holds only")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mfsg-", dir=WORK_PARENT))
    (work / "a").mkdir()
    (work / "b").mkdir()
    bench = Bench(work)
    bench.depth = args.depth
    bench.size = args.size
    host = bench.background("host", "host", "--take-back-after", "600", ready="host service:")
    bench.procs = []
    try:
        one, group, commits = [], [], []
        for r in range(args.rounds):
            names = disks(bench, f"s{r}-", args.disks)
            one += move(bench, names, False, work / f"single{r}")[0]
            names = disks(bench, f"g{r}-", args.disks)
            holds, commit = move(bench, names, True, work / f"group{r}")
            group += holds
            commits.append(commit)
            bench.stop()
        print(f"one disk's pivot: hold median {statistics.median(one):.2f} ms, max {max(one):.2f} "
              f"ms ({len(one)} pivots)")
        print(f"a group of {args.disks}: pivot hold (longest member) median "
              f"{statistics.median(group):.2f} ms, max {max(group):.2f} ms; commit median "
              f"{statistics.median(commits):.2f} ms, max {max(commits):.2f} ms "
              f"({len(group)} groups)")

        if args.no_net:
            return
        names = disks(bench, "net-", 2)
        bench.background("net", "start", *names, "--dest-dir", work / "b", "--state-dir",
                         work / "net", ready="control ")
        sock = work / f"{names[0]}.sock"
        for when in ("mirroring (before the pivot)", "the net (after the pivot)",
                     "committed (the destination alone)"):
            if when.startswith("the net"):
                bench.mirrorfs("copy", names[0])
                bench.mirrorfs("pivot", names[0])
            elif when.startswith("committed"):
                bench.mirrorfs("commit", names[0])
            for depth in (16, 1):
                iops, p99 = bench.iops(sock, depth, args.seconds)
                print(f"{when}: 4k randwrite qd{depth}: {iops:.0f} IOPS, p99 {p99:.0f} us",
                      flush=True)
    finally:
        bench.stop()
        subprocess.run([*MIRRORFS, "shutdown"], env=bench.env, capture_output=True)
        host.wait(120)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
