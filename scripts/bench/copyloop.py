"""The one copy of a range (mirrorfs.datapath.sides.copy, issue #29), measured where it runs: the
migration's base copy (control.basecopy, in the supervisor) and the mirror's copier (a full first
pass, in this process as nbdkit would run it), each between two qemu-storage-daemon exports of a
qcow2 whose every other MiB holds data. Wall time, throughput and this process's CPU seconds.

    .venv/bin/python -m scripts.bench.copyloop [--size 1G] [--runs 3] [--json]
    BEFORE=/tmp/old .venv/bin/python -m scripts.bench.copyloop ...

With BEFORE (a directory holding another version's `mirrorfs` package, e.g. from
`git archive OLD mirrorfs | tar -x -C /tmp/old`), each run also measures that version, interleaved
with this one's on the same machine: on a shared machine only such pairs compare.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import WORK_PARENT, MiB, size_arg


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_image(path, size):
    """A qcow2 of `size` whose even MiBs hold data and odd MiBs were never written."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    writes = []
    for i in range(0, size // MiB, 2):
        writes += ["-c", f"write -P {i % 250 + 1} {i * MiB} 1M"]
    subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def measure(work, size):
    """One run of this interpreter's mirrorfs: {"base_copy": ..., "copier": ...}."""
    from mirrorfs.control.basecopy import BaseCopy
    from mirrorfs.daemons.storage import StorageDaemon
    from mirrorfs.daemons.tree import make_rundir
    from mirrorfs.datapath.mirror.copier import Copier
    from mirrorfs.datapath.mirror.dirtymap import DirtyMap
    from mirrorfs.datapath.mirror.disk import Disk
    from mirrorfs.datapath.sides.backend import NbdBackend
    from mirrorfs.sides import images

    base = work / "base.qcow2"
    result = {}
    target = work / "target.qcow2"
    target.unlink(missing_ok=True)
    copy = BaseCopy(images.info(base), target)
    cpu, started = cpu_seconds(), time.monotonic()
    copy.start()
    copy.wait()
    seconds = time.monotonic() - started
    result["base_copy"] = {"bytes": copy.copied, "seconds": round(seconds, 3),
                           "mb_s": round(copy.copied / seconds / 1e6),
                           "cpu_seconds": round(cpu_seconds() - cpu, 3)}
    target.unlink()
    dest = work / "dest.qcow2"
    dest.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest), str(size)], check=True)
    rundir = make_rundir()
    daemons = [StorageDaemon(images.info(base), rundir, "src"),
               StorageDaemon(images.info(dest), rundir, "dst")]
    try:
        for d in daemons:
            d.start()
        sides = [NbdBackend(daemons[0].uri, "source"), NbdBackend(daemons[1].uri, "destination")]
        disk = Disk(*sides, DirtyMap(size, MiB, None, full=True))
        copier = Copier(disk)
        cpu, started = cpu_seconds(), time.monotonic()
        copier.start()
        while not disk.dirty.synchronized():
            time.sleep(0.005)
        seconds = time.monotonic() - started
        copier.stop()
        result["copier"] = {"bytes": size, "read": copier.bytes_read,
                            "zeroed": copier.bytes_zeroed, "seconds": round(seconds, 3),
                            "mb_s": round(size / seconds / 1e6),
                            "cpu_seconds": round(cpu_seconds() - cpu, 3)}
        for side in sides:
            side.close()
    finally:
        for d in daemons[::-1]:
            d.stop()
        shutil.rmtree(rundir, ignore_errors=True)
    dest.unlink()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=size_arg, default=1 << 30)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", metavar="WORKDIR", help=argparse.SUPPRESS)   # a child's run
    args = parser.parse_args()
    if args.one:
        import mirrorfs
        print(json.dumps({"package": str(Path(mirrorfs.__file__).parent.parent),
                          **measure(Path(args.one), args.size)}))
        return
    # Each run in a child, started outside the checkout (`python -m` puts its directory first on
    # sys.path, before PYTHONPATH): the variant's mirrorfs, then the checkout's scripts.
    root = str(Path(__file__).resolve().parents[2])
    variants = [("this", {**os.environ, "PYTHONPATH": root})]
    if os.environ.get("BEFORE"):
        variants.append(("before", {**os.environ, "PYTHONPATH": f"{os.environ['BEFORE']}:{root}"}))
    work = Path(tempfile.mkdtemp(prefix="copyloop-", dir=WORK_PARENT))
    rows = []
    try:
        make_image(work / "base.qcow2", args.size)
        for run in range(args.runs):
            for name, env in variants:
                res = subprocess.run([sys.executable, "-m", "scripts.bench.copyloop", "--one",
                                      str(work), "--size", str(args.size)], env=env, cwd=work,
                                     check=True, capture_output=True, text=True)
                row = {"variant": name, "run": run, "load": round(os.getloadavg()[0], 2),
                       **json.loads(res.stdout.splitlines()[-1])}
                rows.append(row)
                if not args.json:
                    b, c = row["base_copy"], row["copier"]
                    print(f"{name:6} ({row['package']}) run {run}  load {row['load']:5.2f}  base copy "
                          f"{b['mb_s']:5} MB/s {b['cpu_seconds']:5.2f} s CPU  copier "
                          f"{c['mb_s']:5} MB/s {c['cpu_seconds']:5.2f} s CPU", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
