"""The report as a person reads it (the JSON is the report itself): the machine, the regime, the
table, CPU per request, the extras."""

import os
import platform
import re
import subprocess
from pathlib import Path

from .common import MiB
from .cpu import cpu_parts
from .matrix import RATIOS, row_labels


# The report.

def first_line(argv, containing=""):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return next((line for line in out.splitlines() if containing in line), "unknown").strip()


def machine():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    mem_kib = int(re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M).group(1))
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model.group(1) if model else "unknown",
            "memory_gib": round(mem_kib / (1 << 20), 1), "kernel": platform.release(),
            "nbdkit": first_line(["nbdkit", "--version"]),
            "qemu": first_line(["qemu-storage-daemon", "--version"]),
            "libnbd": first_line(["nbdinfo", "--version"], "libnbd"),
            "fio": first_line(["fio", "--version"])}


def fmt(value, spec):
    """`value` formatted by `spec`, or a dash as wide when there is no value."""
    if value is None:
        return format("-", f">{re.match(r'[0-9]*', spec).group()}")
    return format(value, spec)


def print_report(report, config):
    m = report["machine"]
    print(f"machine: {m['nproc']} x {m['cpu']}, {m['memory_gib']} GiB, Linux {m['kernel']}")
    print(f"         {m['nbdkit']}, {m['qemu']}, {m['libnbd']}, {m['fio']}")
    print(f"         load average {report['load'][0]:.2f} before, {report['load'][1]:.2f} after "
          "(1 min; anything else running skews every number)")
    print_regime(report)
    print(f"\nfio --ioengine=nbd over the whole {config.size // MiB} MiB disk, {config.runtime} s "
          f"per job after {config.ramp} s ramp; median of {config.runs} run(s); storage daemons "
          f"with cache={report['config']['cache']}")
    print(f"\n{'job':32} {'target':12} {'IOPS':>9} {'MB/s':>8} {'p50 us':>9} {'p99 us':>9} {'spread':>7}")
    for label in row_labels(config):
        for i, kind in enumerate(config.targets):
            row = report["results"].get(kind.name, {}).get(label)
            name = label if i == 0 else ""
            if row is None:
                print(f"{name:32} {kind.name:12} {'failed':>9}")
                continue
            print(f"{name:32} {kind.name:12} {row['iops']:9,.0f} {row['mbps']:8.1f} "
                  f"{row['p50_us']:9,.0f} {row['p99_us']:9,.0f} {fmt(row['spread'], '7.0%')}")
    print("\nspread: (max - min) / median of the runs' IOPS. Latency: fio's completion latency (clat).")
    print(f"\n{'IOPS relative to':32} " + " ".join(f"{name:>23}" for name, *_ in RATIOS))
    for label, found in report["ratios"].items():
        print(f"{label:32} " + " ".join(f"{fmt(found.get(name), '23.2f')}" for name, *_ in RATIOS))
    if config.cpu:
        print_cpu(report, config)
    print_extras(report)
    print(f"\nelapsed: {report['elapsed_s']:.0f} s")
    for error in report["errors"]:
        print(f"ERROR: {error}")


def print_regime(report):
    """The two numbers that decide the regime, and its name (regime.py): printed first, because
    the ratios that follow hold for this regime only."""
    regime = report.get("regime")
    if not regime:
        return
    print(f"\nstorage: {regime['storage_iops']:,.0f} IOPS 4k randwrite qd16 (fio libaio "
          f"straight on a file in {regime['where']}, "
          f"{'O_DIRECT' if report['config']['cache'] == 'none' else 'page cache'})")
    print(f"one interpreter's ceiling: {regime['ceiling_iops']:,.0f} IOPS (mirrorfs serve, "
          "nbdkit memory -> nbdkit null, 1 connection, 4k randwrite qd16)")
    print(f"regime: {regime['regime']} (the storage takes "
          f"{'fewer' if regime['regime'] == 'storage-bound' else 'more'} small writes than one "
          "interpreter passes on); the ratios below hold for this regime")


def print_cpu(report, config):
    print("\nCPU per request, microseconds (each process's CPU rate over the job's IOPS, medians; "
          "fio's own in the last column):")
    for label in row_labels(config):
        for kind in config.targets:
            row = report["results"].get(kind.name, {}).get(label)
            if not row:
                continue
            parts = cpu_parts(row)
            print(f"  {label:30} {kind.name:12} total {sum(parts.values()):5.0f}: "
                  + ", ".join(f"{role} {v:.0f}" for role, v in parts.items() if v >= 1)
                  + f"; fio {row.get('fio_cpu_us', 0):.0f}")


def print_extras(report):
    if "copy" in report:
        print("\nbase copy, fully written qcow2 export -> empty qcow2 export:")
        for name, found in report["copy"].items():
            if found is None:
                print(f"  {name:44} not available yet")
            else:
                print(f"  {name:44} {found['mbps']:7.0f} MB/s ({found['bytes'] // MiB} MiB in "
                      f"{found['seconds']:.2f} s)")
    switch = report.get("switch")
    if switch:
        around, before = switch["probe_around_switch"], switch["probe_before"]
        print("\nswitch (`mirrorfs pivot`) under fio 4k randwrite qd16 plus a 4k write probe:")
        print(f"  data path stall (status):        {switch['stall_ms']:.1f} ms "
              f"(rebase {switch['rebase_ms']:.1f} ms; switching->switched "
              f"{switch['switching_to_switched_ms']:.1f} ms)")
        print(f"  fio during the run:              {switch['fio']['iops']:,.0f} IOPS, "
              f"max clat {switch['fio']['clat_max_ms']:.1f} ms")
        print(f"  probe within 1 s of the switch:  {around['requests']} writes, p50 "
              f"{fmt(around.get('p50_ms'), '.2f')} ms, p99 {fmt(around.get('p99_ms'), '.2f')} ms, "
              f"max {fmt(around.get('max_ms'), '.1f')} ms, longest gap "
              f"{fmt(around.get('max_gap_ms'), '.1f')} ms")
        print(f"  the slowest probe write started  {fmt(switch['slowest_probe_started_ms'], '.0f')} ms "
              "after `switching` (0: rebase starts; the data path hold is at the end)")
        print(f"  probe before (steady, mirrored): p50 {fmt(before.get('p50_ms'), '.2f')} ms, "
              f"p99 {fmt(before.get('p99_ms'), '.2f')} ms, max {fmt(before.get('max_ms'), '.1f')} ms")
    if "rss" in report:
        print("\nnbdkit RSS with mirrorfs serving (sum of nbdkit processes):")
        for label, found in report["rss"].items():
            print(f"  {label:12} idle {found['idle_mib']:6.1f} MiB, after fio "
                  f"{found['after_fio_mib']:6.1f} MiB")
