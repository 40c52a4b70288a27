"""The matrix: every job on every target, K runs, and the medians and ratios of its samples."""

import os
import statistics

from .common import BenchError
from .fio import run_job
from .images import Disk


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
