"""Measure an evacuation (--switch-first): hydration time of a fully written source against
`qemu-img convert` of the same image into the same kind of destination, and a client's 4k
randread/randwrite at qd16 during hydration against the same after it.

    .venv/bin/python -m scripts.bench.evacuate [SIZE_MiB] [RATE] [RUNS]
    BEFORE=/tmp/old .venv/bin/python -m scripts.bench.evacuate ...

With BEFORE (a directory holding another version's `mirrorfs` package, e.g. from
`git archive OLD mirrorfs | tar -x -C /tmp/old`), each run also measures that version's hydration,
interleaved with this one's on the same machine. Hydrations also print the CPU seconds their
processes used (nbdkit and the storage daemons). Prints one line per measurement
(docs/PERFORMANCE.md, "Evacuation").
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from .common import MIRRORFS


def sh(*argv, **kw):
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True, **kw)


def status(ctl, env=None):
    return json.loads(sh(*MIRRORFS, "status", "--json", "--control", ctl, env=env).stdout)


def fio(uri, rw, seconds):
    out = sh("fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
             "--iodepth=16", "--time_based", f"--runtime={seconds}", "--output-format=json",
             "--size=100%").stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if rw == "randread" else job["write"]
    return round(side["iops"]), round(side["clat_ns"]["percentile"]["99.000000"] / 1e6, 2)


def serve(d, src, dst, *extra, env=None):
    out = open(d / "serve.out", "w")
    proc = subprocess.Popen([*MIRRORFS, "serve", "--copy", "full", "--switch-first", "--state-dir",
                             d / "state", src, dst, "--socket", d / "s.sock", *extra],
                            stdout=out, stderr=open(d / "serve.err", "w"), env=env,
                            cwd=d)    # not the checkout's: `python -m` would import from there
    while "control" not in (d / "serve.out").read_text():
        assert proc.poll() is None, (d / "serve.err").read_text()
        time.sleep(0.05)
    return proc


def hydrate(d, src, size, env=None):
    """One hydration of `src` into a new qcow2: (seconds by the hydrator's clock, from the
    command's start, CPU seconds of the serving processes)."""
    dst = d / "dst.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", dst, f"{size}M")
    t = time.monotonic()
    proc = serve(d, src, dst, env=env)
    ctl = d / "s.sock.ctl"
    cpu = {}
    while (s := status(ctl, env))["phase"] != "hydrated":
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                times = child.cpu_times()
                cpu[child.pid] = times.user + times.system
            except psutil.Error:
                pass
        time.sleep(0.1)
    total = time.monotonic() - t
    inside = s["datapath"]["hydrator"]["seconds"]
    proc.terminate()
    proc.wait()
    sh("rm", "-rf", d / "state", dst)
    return inside, total, sum(cpu.values())


def main():
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rate = sys.argv[2] if len(sys.argv) > 2 else "40M"
    d = Path(tempfile.mkdtemp(prefix="mfsbench-", dir="/var/tmp"))
    src = d / "src.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", src, f"{size}M")
    sh("qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}M", src)
    sh("sync")
    before = os.environ.get("BEFORE")
    variants = [("hydration", None)]
    if before:
        variants.append(("before", {**os.environ, "PYTHONPATH": before}))
    for run in range(int(sys.argv[3]) if len(sys.argv) > 3 else 3):
        dst = d / "conv.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", dst, f"{size}M")
        t = time.monotonic()
        sh("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", "-t", "none", "-T", "none",
           src, dst)
        convert = time.monotonic() - t
        dst.unlink()
        line = f"run {run}: {size} MiB: qemu-img convert {convert:.2f}s"
        for name, env in variants[::1 if run % 2 else -1]:
            inside, total, cpu = hydrate(d, src, size, env)
            line += (f"; {name} {inside:.2f}s ({total:.2f}s from the command's start, CPU "
                     f"{cpu:.2f}s) {convert / inside:.2f}x")
        print(line, flush=True)
    if os.environ.get("SKIP_FIO"):
        sh("rm", "-rf", d)
        return
    # Client I/O during hydration (rate-limited, so it lasts) and after it.
    dst = d / "dst.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", dst, f"{size}M")
    proc = serve(d, src, dst, "--rate", rate)
    try:
        uri = f"nbd+unix:///?socket={d / 's.sock'}"
        ctl = d / "s.sock.ctl"
        during = {rw: fio(uri, rw, 10) for rw in ("randread", "randwrite")}
        left = status(ctl)["hydration"]["percent"]
        while status(ctl)["phase"] != "hydrated":
            time.sleep(0.2)
        after = {rw: fio(uri, rw, 10) for rw in ("randread", "randwrite")}
    finally:
        proc.terminate()
        proc.wait()
    for rw in ("randread", "randwrite"):
        print(f"{rw} 4k qd16: during hydration (--rate {rate}, {left:.0f}% hydrated at the end) "
              f"{during[rw][0]} IOPS p99 {during[rw][1]} ms; after {after[rw][0]} IOPS p99 "
              f"{after[rw][1]} ms", flush=True)
    sh("rm", "-rf", d)


if __name__ == "__main__":
    main()
