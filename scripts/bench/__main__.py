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

First, the regime (issue #28; regime.py): the storage's own 4k randwrite qd16 IOPS and one
interpreter's ceiling (mirrorfs serve, nbdkit memory -> nbdkit null, 1 connection), and which of
the two is lower: the ratios hold for that regime. --regime both runs the whole bench twice, with
the images on disk (/tmp, cache=none) and in memory (/dev/shm, cache=writeback).

    make bench                                  # 1 GiB, 5 s per job, 3 runs: about 8 minutes
    make bench BENCH_ARGS=--quick               # a smoke run of about 20 seconds
    .venv/bin/python -m scripts.bench --targets mirrorfs,direct --jobs 4k-randwrite --runs 1
    .venv/bin/python -m scripts.bench --regime both --targets mirrorfs,qemu-mirror --no-extras
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mirrorfs.daemons import storage

from . import images
from .common import GiB, MiB, interrupt_on_signals, pick, size_arg
from .extras import run_extras
from .fio import JOBS, QUICK_JOBS
from .images import make_base
from .matrix import medians, ratios, run_matrix
from .regime import REGIMES, measure_regime, places
from .report import machine, print_report
from .targets import TARGETS


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", type=size_arg, help="virtual disk size (default 1G; --quick 64M)")
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


def bench(config, parent, log):
    """One whole run with its work directory in `parent` and the daemons' cache mode in
    images.HOST_CACHE: the report (the JSON as printed)."""
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mfsbench-", dir=parent))
    report = {"machine": machine(),
              "config": {"size": config.size, "runtime": config.runtime, "ramp": config.ramp,
                         "runs": config.runs, "targets": [k.name for k in config.targets],
                         "jobs": [j.label for j in config.jobs], "cache": images.HOST_CACHE},
              "errors": [], "load": [os.getloadavg()[0], None]}
    try:
        if not config.no_regime:
            report["regime"] = measure_regime(workdir, parent, images.HOST_CACHE, log)
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


def main():
    """The local bench: parse, measure, print; once per place of --regime (both: disk, then
    memory), the JSON one report (a list of two with --regime both). The other benches are this
    package's modules: remote, lifecycle, evacuate, host, named, lag, group (`python -m
    scripts.bench.remote`, ...)."""
    config = parse_args()
    interrupt_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    reports = []
    for parent, cache in places(config.regime, config.cache):
        images.HOST_CACHE = images.resolve_cache(parent, cache)
        log(f"images in {parent}, storage daemons with cache={images.HOST_CACHE}")
        try:
            report = bench(config, parent, log)
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
