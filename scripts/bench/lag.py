"""`--lag` (issue #28): what a slow destination costs the guest with and without a bounded lag.

Every mirror is `mirrorfs serve SRC DEST --state-dir D` on a fresh empty source qcow2 (a storage
daemon, the run's cache mode, as in the local bench). In the same run, each setup gets the same fio
jobs (4k randwrite qd16, qd1, 1M write qd4), each starting with an empty lag (the bench waits for
the lag to drain after a job, and says how long):

    local            the destination itself, no lag: the cost of a migration to local storage
    Nms              the destination N ms away (nbdkit's delay filter: N ms a write, zero and
                     trim), no lag: today's synchronous mirror to a slow destination
    Nms lag SIZE     the same, --lag SIZE: the issue's case

How the destination and its distance are made (`--network`):

    inline (default) DEST is a fresh raw image served by nbdkit's file plugin, the delay filter
                     in that same process (local: the same server without the filter). Only the
                     latency differs between the setups: the emulated network costs no process
                     and no copy, as a real network costs the guest's host none.
    proxy            DEST is a fresh qcow2 exported by its own qemu-storage-daemon; the slow
                     setups reach it through a second nbdkit (the `nbd` plugin behind the delay
                     filter), which copies every byte on the same cores: on a CPU-bound machine
                     that process, not the latency, sets much of the ratio. A fourth setup shows
                     it: "0ms front", the local export behind that process at 0 ms.

The ratios printed are "Nms lag SIZE" over "local" (the issue's goals: qd1 >= 0.8, qd16 >= 0.9,
1M qd4 >= 0.8) and "Nms" over "local" for comparison.

Then a long job (`--long`, 30 s): 4k randwrite qd16 on fresh local and lagged mirrors, twice, the
order swapped. A 4 s job can run ahead of the destination while the lag fills; this one runs
long enough for the lag to fill and its backpressure to hold the guest, and its median ratio is
in the goal table against the qd16 goal.

Then the rate case: the destination behind nbdkit's rate filter (in the same way) at R bytes/s,
a writer (fio, 1M sequential writes, --rate 2R) twice as fast, --lag SIZE. While it writes the lag is sampled (its
peak must stay <= SIZE); once it is full, `mirrorfs pivot --force` runs under the writer and is
timed (goal: within SIZE / R + 1 s). `--force` skips what `serve --copy none`'s pivot does first,
comparing the whole disk between the sides (the operator's word that they started equal, checked
once): that reads every written byte back through the rate-limited destination, while the writer
goes on (36 s in one run), and is no part of the lag's convergence, which is what the goal
measures. tests/system/test_lag.py checks that the sides are equal at such a switch.

First, as every local bench (regime.py, `--no-regime` skips it): the storage's own 4k qd16 IOPS and
one interpreter's ceiling, and the regime they make. Both setups of a ratio are in that regime
(the destination too is on that storage); on a CPU-bound machine the lag's own CPU is what costs
it the ratio.

The report ends with the goal table: each job's ratio, the lag's peak against SIZE, the pivot's
seconds against SIZE / R + 1 s, and whether each goal is met; with the load average before and
after (on a shared machine, compare runs made in the same conditions).

    .venv/bin/python -m scripts.bench.lag                 # 512 MiB, 4 s per job, 3 runs, a 30 s job: 5 minutes
    .venv/bin/python -m scripts.bench.lag --quick         # smoke run
    .venv/bin/python -m scripts.bench.lag --delay 1 --lag 16M --runs 1
    .venv/bin/python -m scripts.bench.lag --network proxy  # the emulated network in a process of its own
"""

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from mirrorfs.common import jsonlines
from mirrorfs.daemons import storage
from mirrorfs.system import sockets
from mirrorfs.system.children import Child

from . import images
from .common import (MIRRORFS, WORK_PARENT, MB, MiB, BenchError, interrupt_on_signals, size_arg,
                     wait_for_output)
from .fio import JOBS as ALL_JOBS, fio_argv, run_job
from .images import StorageExport, qcow2_node, qemu_img
from .regime import measure_regime
from .report import fmt, machine, print_regime

JOBS = tuple(job for job in ALL_JOBS if job.key in ("4k-randwrite-qd1", "4k-randwrite", "1m-write"))
GOALS = {"4k randwrite qd1": 0.8, "4k randwrite qd16": 0.9, "1M seq write qd4": 0.8}


class Mirror:
    """`mirrorfs serve` on fresh images in `d`, the destination made as `network` says (the
    module's docstring), with an nbdkit filter if `front` (its filter and parameters)."""

    def __init__(self, d, size, lag, front, network):
        self.d = d
        d.mkdir()
        src = d / "src.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", src, size)
        self.src = src
        self.export = self.front = None
        if network == "inline":
            # The destination is a raw image served by nbdkit's file plugin, the filter (if any)
            # in that same process: the emulated network adds no process and no copy of its own.
            self.dst = d / "dst.raw"
            with open(self.dst, "wb") as f:
                f.truncate(size)
            self.front, dest_uri = _nbdkit(d, "dest", front, "file", self.dst)
        else:
            self.dst = d / "dst.qcow2"
            qemu_img("create", "-q", "-f", "qcow2", self.dst, size)
            self.export = StorageExport(d, "dest", [qcow2_node("dst", self.dst)], "dst")
            dest_uri = self.export.uri
            if front:
                self.front, dest_uri = _nbdkit(d, "front", front, "nbd",
                                               f"socket={self.export.socket}")
        self.socket = sockets.check_unix_path(d / "m.sock")
        self.control = f"{self.socket}.ctl"
        argv = [*MIRRORFS, "serve", src, dest_uri, "--socket", self.socket, "--cache",
                images.HOST_CACHE, "--state-dir", d / "state"]
        if lag:
            argv += ["--lag", f"{lag}B"]        # a unit: --lag refuses a bare number
        self.server = Child("mirrorfs serve", argv, d / "mirrorfs.log")
        self.uri = f"nbd+unix:///?socket={self.socket}"

    def __enter__(self):
        if self.export is not None:
            self.export.start()
        if self.front is not None:
            self.front.start()
        self.server.start()
        wait_for_output(self.server, "serving ")
        return self

    def __exit__(self, *exc):
        self.server.stop()
        if self.front is not None:
            self.front.stop()
        if self.export is not None:
            self.export.stop()

    def drain(self, timeout=300):
        """Wait until the destination has every change (the next job starts from an empty lag);
        returns the seconds it took."""
        started = time.monotonic()
        while (self.datapath().get("lag") or {}).get("changes"):
            if time.monotonic() - started > timeout:
                raise BenchError(f"the lag did not drain in {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def datapath(self):
        return jsonlines.call(self.control, {"cmd": "status"}, timeout=30)["status"]["datapath"]


def _nbdkit(d, name, front, plugin, *params):
    """nbdkit serving `plugin` with `params` on a socket in `d`, behind `front` (a filter and its
    parameters, or nothing): (its Child, its URI)."""
    sock = sockets.check_unix_path(d / f"{name}.sock")
    pidfile = d / f"{name}.pid"
    child = Child(f"nbdkit ({name})", [
        "nbdkit", "--foreground", "--exit-with-parent", "--pidfile", pidfile, "--threads", 16,
        "--unix", sock, *front[:1], plugin, *params, *front[1:]], d / f"{name}.log",
        pidfile=pidfile)
    return child, f"nbd+unix:///?socket={sock}"


def setups(config):
    """(name, lag, front): the local destination, the slow one without and with the lag, and with
    --network proxy the local one through the same nbdkit front at 0 ms (the front's own CPU, on a
    machine whose cores it shares, without its latency)."""
    delay = [f"delay-{k}={config.delay}ms" for k in ("write", "zero", "trim")]
    found = [("local", 0, ()),
             (f"{config.delay}ms", 0, ("--filter=delay", *delay)),
             (f"{config.delay}ms lag {config.lag_text}", config.lag, ("--filter=delay", *delay))]
    if config.network == "proxy":
        found.append(("0ms front", 0, ("--filter=delay", "delay-write=0ms")))
    return found


def measure_jobs(workdir, config, log):
    """Each run starts the four setups' mirrors together, and each job runs on the four in turn,
    the order reversed every other job (local, 2ms, lag, front; then front, lag, 2ms, local): a
    ratio compares measurements seconds apart, not minutes, and a load that rises or falls through
    a turn costs both ends of it alike. On a machine shared with other work that is what keeps a
    ratio the same run's. Returns (the medians of each setup's metrics, the median over the runs of
    each job's lag/local and sync/local ratios)."""
    samples, ratios = {}, {}
    order = setups(config)
    for run in range(config.runs):
        dirs = [workdir / f"r{run}-{name.replace(' ', '-')}" for name, _, _ in order]
        with contextlib.ExitStack() as stack:
            mirrors = {name: stack.enter_context(Mirror(d, config.size, lag, front, config.network))
                       for (name, lag, front), d in zip(order, dirs)}
            for j, job in enumerate(config.jobs):
                turn = order if (run * len(config.jobs) + j) % 2 == 0 else order[::-1]
                iops = {}
                for name, lag, _ in turn:
                    m = mirrors[name]
                    rows = run_job(m.uri, job, config)
                    lagged = m.datapath().get("lag") or {}
                    drained = m.drain()
                    for label, metrics in rows.items():
                        metrics["lag_end_bytes"] = lagged.get("bytes", 0)
                        metrics["lag_peak_bytes"] = lagged.get("peak_bytes", 0)
                        metrics["drain_s"] = drained
                        samples.setdefault(name, {}).setdefault(label, []).append(metrics)
                        iops[name, label] = metrics["iops"]
                        log(f"  run {run + 1} {name:18} {label:20} {metrics['iops']:9,.0f} IOPS"
                            + (f"  lag peak so far {lagged.get('peak_bytes', 0) / MiB:.1f} MiB, "
                               f"drained in {drained:.1f} s" if lag else ""))
                for label in rows:
                    local = iops.get((order[0][0], label))
                    for kind, name in (("lag", order[2][0]), ("sync", order[1][0])):
                        if local and iops.get((name, label)):
                            ratios.setdefault(label, {}).setdefault(kind, []).append(
                                iops[name, label] / local)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    medians = {name: {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                      for label, runs in rows.items()} for name, rows in samples.items()}
    return medians, {label: {kind: {"median": statistics.median(values), "min": min(values),
                                    "max": max(values)} for kind, values in kinds.items()}
                     for label, kinds in ratios.items()}


def measure_long(workdir, config, log):
    """4k randwrite qd16 for config.long seconds on the local destination and on the lagged one
    (fresh mirrors, one after the other, twice, the order swapped): a job of a few seconds can
    run ahead of the destination while the lag fills, and once the lag is full a write that finds
    no room waits for the destination. Returns the median lag/local of the two pairs, each
    setup's IOPS, and the lag's peak and waits."""
    job = next(j for j in ALL_JOBS if j.key == "4k-randwrite")
    names = setups(config)
    local, lagged = names[0], names[2]
    found = {"seconds": config.long, "pairs": []}
    for turn in range(2):
        pair = {}
        for name, lag, front in ((local, lagged) if turn == 0 else (lagged, local)):
            d = workdir / f"long{turn}-{name.replace(' ', '-')}"
            with Mirror(d, config.size, lag, front, config.network) as m:
                row = run_job(m.uri, job, argparse.Namespace(**{**vars(config),
                                                                 "runtime": config.long}))[job.label]
                pair[name] = {"iops": row["iops"], **({k: m.datapath()["lag"][k]
                                                      for k in ("peak_bytes", "waits")} if lag else {})}
            shutil.rmtree(d, ignore_errors=True)
        pair["ratio"] = pair[lagged[0]]["iops"] / pair[local[0]]["iops"]
        found["pairs"].append(pair)
        log(f"  {config.long} s: local {pair[local[0]]['iops']:,.0f} IOPS, lag "
            f"{pair[lagged[0]]['iops']:,.0f} IOPS (peak {pair[lagged[0]]['peak_bytes'] / MiB:.1f} "
            f"MiB, {pair[lagged[0]]['waits']} writes waited): {pair['ratio']:.2f}")
    found["ratio"] = statistics.median(p["ratio"] for p in found["pairs"])
    return found


def measure_rate(workdir, config, log):
    """The destination at config.dest_rate bytes/s, a writer at twice that, --lag: the lag's peak,
    and how long `pivot` takes under the writer."""
    rate = config.dest_rate
    front = ("--filter=rate", f"rate={rate * 8}", "burstiness=0.5")     # the filter counts bits
    d = workdir / "rate"
    found = {"dest_rate": rate, "writer_rate": 2 * rate, "lag": config.lag}
    with Mirror(d, config.size, config.lag, front, config.network) as m:
        fio = subprocess.Popen(fio_argv(m.uri, config.size, (
            "--rw=write", "--bs=1m", "--iodepth=4", f"--rate={2 * rate}"), 600, 0),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak, samples, stop = [0], [], threading.Event()

        def sample():
            while not stop.is_set():
                lag = m.datapath()["lag"]
                peak[0] = max(peak[0], lag["bytes"])
                samples.append((time.monotonic(), lag["bytes"], lag["mode"]))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # The lag fills at (2R - R) = R bytes/s: wait until it is full (or 3x that long).
            deadline = time.monotonic() + 3 * config.lag / rate + 10
            while m.datapath()["lag"]["waits"] == 0:
                if time.monotonic() > deadline or fio.poll() is not None:
                    raise BenchError("the lag never filled: is the writer faster than the "
                                     "destination?")
                time.sleep(0.1)
            # The destination's real bandwidth, while the lag is full: what it took in 2 s.
            first = m.datapath()["lag"]
            t0 = time.monotonic()
            time.sleep(2)
            second = m.datapath()["lag"]
            found["dest_measured"] = (second["sent_bytes"] - first["sent_bytes"]) / (
                time.monotonic() - t0)
            found["lag_before_pivot"] = second["bytes"]
            started = time.monotonic()
            reply = jsonlines.call(m.control, {"cmd": "pivot", "force": True}, timeout=600)
            found["pivot_s"] = time.monotonic() - started
            found["stall_ms"] = reply["stall_ms"]
        finally:
            stop.set()
            sampler.join()
            fio.terminate()
            fio.communicate(timeout=60)
        found["lag_peak"] = peak[0]
        found["bound_s"] = config.lag / rate + 1
        found["bound_measured_s"] = config.lag / found["dest_measured"] + 1
        log(f"  rate: lag peak {peak[0] / MiB:.1f} MiB of {config.lag / MiB:.0f}; pivot "
            f"{found['pivot_s']:.2f} s (bound {found['bound_s']:.2f} s), stall "
            f"{found['stall_ms']:.1f} ms")
    shutil.rmtree(d, ignore_errors=True)
    return found


def print_report(report, config):
    print_regime(report)
    print(f"\n--lag (issue #28): fio --ioengine=nbd over a {config.size // MiB} MiB disk, "
          f"{config.runtime} s per job after {config.ramp} s ramp, median of {config.runs} "
          f"run(s); storage daemons with cache={images.HOST_CACHE}; destination "
          + ("a raw image served by nbdkit's file plugin, the delay filter in that process"
             if config.network == "inline" else
             "a qcow2 export reached through a second nbdkit that holds the delay filter")
          + f" (--network {config.network}), '{config.delay}ms' away")
    results = report["results"]
    names = [name for name, _, _ in setups(config)]
    print(f"\n{'job':22}" + "".join(f"{n + ' IOPS':>20}" for n in names)
          + f"{'lag/local':>11}{'sync/local':>11}{'lag/front':>11}{'goal':>6}")
    for job in config.jobs:
        label = job.label
        iops = [results.get(n, {}).get(label, {}).get("iops") for n in names]
        ratio = report.get("ratios", {}).get(label, {})
        front = iops[2] / iops[3] if len(iops) > 3 and iops[2] and iops[3] else None
        print(f"{label:22}" + "".join(f"{fmt(i, '20,.0f')}" for i in iops)
              + f"{fmt(ratio.get('lag', {}).get('median'), '11.2f')}"
              f"{fmt(ratio.get('sync', {}).get('median'), '11.2f')}"
              f"{fmt(front, '11.2f')}{GOALS.get(label, 0):6.1f}")
    print("IOPS: medians of the runs; lag/local and sync/local: medians of each run's ratio (the "
          "issue's ratio, goal in the last column); lag/front (--network proxy): against a local "
          "destination behind the same nbdkit front at 0 ms (the emulated network's CPU on both), "
          "of the medians")
    long = report.get("long")
    if long:
        print(f"\n4k randwrite qd16 for {long['seconds']} s, fresh mirrors, twice (local then lag, "
              "lag then local):")
        for pair in long["pairs"]:
            local, lagged = (pair[n] for n in names[0:3:2])
            print(f"  local {local['iops']:,.0f} IOPS, {names[2]} {lagged['iops']:,.0f} IOPS "
                  f"(lag peak {lagged['peak_bytes'] / MiB:.1f} MiB, {lagged['waits']} writes "
                  f"waited for room): {pair['ratio']:.2f}")
    rate = report.get("rate")
    if rate:
        print(f"\nrate: destination {rate['dest_rate'] / MB:.1f} MB/s (nbdkit rate filter), writer "
              f"{rate['writer_rate'] / MB:.1f} MB/s (fio 1M seq write qd4 --rate), --lag "
              f"{config.lag_text}")
        print(f"  the destination took {rate['dest_measured'] / MB:.1f} MB/s while the lag was "
              f"full (measured: what the lag sent in 2 s)")
        print(f"  lag peak {rate['lag_peak'] / MiB:.1f} MiB (bound {config.lag / MiB:.0f} MiB); "
              f"{rate['lag_before_pivot'] / MiB:.1f} MiB when pivot was asked")
        print(f"  pivot --force under the writer: {rate['pivot_s']:.2f} s (goal: within SIZE/bandwidth + 1 s "
              f"= {rate['bound_s']:.2f} s nominal, {rate['bound_measured_s']:.2f} s measured); "
              f"clients held {rate['stall_ms']:.1f} ms at the switch")
    print(f"\nelapsed: {report['elapsed_s']:.0f} s; load average {report['load'][0]:.2f} before, "
          f"{report['load'][1]:.2f} after")
    print_goals(goals(report, config), report)
    for error in report["errors"]:
        print(f"ERROR: {error}")


def goals(report, config):
    """[(goal, measured, bound, met)]: the issue's goals, as measured by this report."""
    found = []
    lag_setup = f"{config.delay}ms lag {config.lag_text}"
    for job in config.jobs:
        ratio = report.get("ratios", {}).get(job.label, {}).get("lag", {})
        median, goal = ratio.get("median"), GOALS[job.label]
        spread = f" ({ratio['min']:.2f}-{ratio['max']:.2f})" if len(ratio) == 3 and \
            config.runs > 1 else ""
        found.append((f"{job.label}: {lag_setup} / local{spread}", median, f">= {goal:.2f}",
                      median is not None and median >= goal))
    long = report.get("long")
    if long:
        found.append((f"4k randwrite qd16 for {long['seconds']} s: {lag_setup} / local "
                      f"({min(p['ratio'] for p in long['pairs']):.2f}-"
                      f"{max(p['ratio'] for p in long['pairs']):.2f})", long["ratio"],
                      f">= {GOALS['4k randwrite qd16']:.2f}",
                      long["ratio"] >= GOALS["4k randwrite qd16"]))
    rate = report.get("rate")
    if rate:
        found.append(("lag peak under a 2x writer (MiB)", rate["lag_peak"] / MiB,
                      f"<= {config.lag / MiB:.0f}", rate["lag_peak"] <= config.lag))
        found.append(("pivot under a 2x writer (s)", rate["pivot_s"],
                      f"<= {rate['bound_s']:.2f}", rate["pivot_s"] <= rate["bound_s"]))
    return found


def print_goals(rows, report):
    print(f"\n{'goal (issue #28)':64}{'measured':>10}  {'bound':10}met")
    for goal, measured, bound, met in rows:
        print(f"{goal:64}{fmt(measured, '10.2f')}  {bound:10}{'yes' if met else 'NO'}")
    print(f"load average {report['load'][0]:.2f} before, {report['load'][1]:.2f} after "
          f"({os.cpu_count()} CPUs): ratios are of the same run; absolute numbers are this "
          "machine's of the moment")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m scripts.bench.lag", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--size", type=size_arg, help="virtual disk size (default 512M)")
    p.add_argument("--runtime", type=int, help="seconds per fio job (default 4; --quick 1)")
    p.add_argument("--runs", type=int, help="runs, medians reported (default 3; --quick 1)")
    p.add_argument("--delay", type=int, default=2, help="the slow destination's ms a write (2)")
    p.add_argument("--lag", default="64M", help="--lag SIZE (default 64M)")
    p.add_argument("--dest-rate", type=size_arg, default="16M",
                   help="the rate case's destination bandwidth, bytes/s (default 16M)")
    p.add_argument("--network", choices=("inline", "proxy"), default="inline",
                   help="how the slow destination is emulated: inline (default), a raw image served "
                        "by nbdkit's file plugin with the delay or rate filter in that process; "
                        "proxy, a qcow2 export of its own storage daemon behind a second nbdkit "
                        "that holds the filter (one more process copying every byte)")
    p.add_argument("--long", type=int, help="seconds of the long 4k qd16 job, local and lagged "
                   "(default 30; --quick 3; 0 skips it)")
    p.add_argument("--no-rate", action="store_true", help="skip the rate case")
    p.add_argument("--cache", choices=storage.CACHE_MODES, default="auto",
                   help="as `python -m scripts.bench`'s --cache")
    p.add_argument("--no-regime", action="store_true",
                   help="skip the storage probe and the interpreter's ceiling measured first")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    args.size = args.size or (128 * MiB if args.quick else 512 * MiB)
    args.runtime = args.runtime or (1 if args.quick else 4)
    args.runs = args.runs or (1 if args.quick else 3)
    args.long = (3 if args.quick else 30) if args.long is None else args.long
    args.ramp = 0 if args.quick else 1
    args.lag_text = args.lag        # as given: the setups' names ("2ms lag 16M")
    try:
        args.lag = size_arg(args.lag)
    except argparse.ArgumentTypeError as e:
        p.error(f"argument --lag: {e}")
    args.jobs = list(JOBS)
    return args


def main():
    config = parse_args()
    images.HOST_CACHE = images.resolve_cache(WORK_PARENT, config.cache)
    interrupt_on_signals()

    def log(line):
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mfslag-", dir=WORK_PARENT))
    report = {"machine": machine(), "errors": [], "load": [os.getloadavg()[0], None],
              "config": {"size": config.size, "runtime": config.runtime, "runs": config.runs,
                         "delay_ms": config.delay, "lag": config.lag, "cache": images.HOST_CACHE,
                         "network": config.network, "long_s": config.long}}
    try:
        if not config.no_regime:
            report["regime"] = measure_regime(workdir, WORK_PARENT, images.HOST_CACHE, log)
        try:
            report["results"], report["ratios"] = measure_jobs(workdir, config, log)
        except Exception as e:
            report["errors"].append(f"jobs: {type(e).__name__}: {e}")
            report["results"], report["ratios"] = {}, {}
        if config.long:
            try:
                report["long"] = measure_long(workdir, config, log)
            except Exception as e:
                report["errors"].append(f"long: {type(e).__name__}: {e}")
        if not config.no_rate:
            try:
                report["rate"] = measure_rate(workdir, config, log)
            except Exception as e:
                report["errors"].append(f"rate: {type(e).__name__}: {e}")
    except KeyboardInterrupt:
        log("bench.lag: interrupted")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["elapsed_s"] = time.monotonic() - started
    report["load"][1] = os.getloadavg()[0]
    report["goals"] = [{"goal": g, "measured": m, "bound": b, "met": ok}
                       for g, m, b, ok in goals(report, config)]
    if config.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, config)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
