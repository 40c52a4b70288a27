"""The fio jobs of the matrix, fio's command line over NBD, and one job's run and numbers."""

import json
from dataclasses import dataclass

from .common import BenchError, FIO_GRACE, MB, run_tool
from .cpu import CPU, CpuMeter


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
