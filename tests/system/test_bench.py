"""`python -m scripts.bench --quick --json` (`make bench`'s smoke run): every target starts, serves, is
measured and stopped. Nothing here asserts a speed; the numbers belong in docs/PERFORMANCE.md."""

import json
import sys
from pathlib import Path

import pytest

from lib.commands import run

# The benchmarks are a package (scripts/bench/), run as modules from the checkout's root.
ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("mirrorfs", "mirrorfs-1d", "direct", "qemu-mirror", "nbd-proxy")


# The processes whose CPU --cpu measures per target (issue #21: where a request's CPU goes).
ROLES = {
    "mirrorfs": {"mirrorfs: supervisor", "mirrorfs: nbdkit (the data path)",
                 "mirrorfs: source storage daemon", "mirrorfs: destination storage daemon"},
    "mirrorfs-1d": {"mirrorfs: supervisor", "mirrorfs: nbdkit (the data path)",
                    "mirrorfs: the one storage daemon"},
    "direct": {"storage daemon"},
    "qemu-mirror": {"qemu: storage daemon (the mirror)"},
    "nbd-proxy": {"storage daemon", "nbdkit (nbd plugin)"},
}


# Not serial: it measures throughput and CPU but asserts neither (only that each was measured);
# its fio runs are timed, so beside the parallel pass it takes as long, and only measures less.
def test_quick_bench_measures_every_target():
    res = run(sys.executable, "-m", "scripts.bench", "--quick", "--json", "--cpu", cwd=ROOT, check=False,
              timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["errors"] == []
    for target in TARGETS:
        rows = report["results"][target]
        assert rows, f"no results for {target}"
        for label, row in rows.items():
            assert row["iops"] > 0, f"{target} {label}: {row}"
            cpu = {k.removeprefix("cpu_us:"): v for k, v in row.items() if k.startswith("cpu_us:")}
            assert set(cpu) == ROLES[target], f"{target} {label}: {cpu}"
            # Every process a request passes through spends CPU on it: all of them for a write
            # (the supervisor is not on the way), the destination's daemon not for a read.
            idle = {"mirrorfs: supervisor"} | ({"mirrorfs: destination storage daemon"}
                                                if "read" in label else set())
            assert all(v > 0 for role, v in cpu.items() if role not in idle), f"{target} {label}: {cpu}"
            assert row["fio_cpu_us"] > 0
    assert report["copy"]["nbdcopy"]["mbps"] > 0
    assert report["switch"]["probe_around_switch"]["requests"] > 0
    assert set(report["rss"]) == {"64 MiB", "1 TiB sparse"}
    # Which regime the run measured (issue #28): both numbers that decide it, then the name.
    regime = report["regime"]
    assert regime["storage_iops"] > 0 and regime["ceiling_iops"] > 0, regime
    assert regime["regime"] == ("storage-bound" if regime["storage_iops"] < regime["ceiling_iops"]
                                else "CPU-bound")


@pytest.mark.parametrize("network, setups", [
    ("inline", {"local", "2ms", "2ms lag 16M"}),
    ("proxy", {"local", "2ms", "2ms lag 16M", "0ms front"})])
def test_quick_lag_bench_measures_every_setup_and_the_pivot(network, setups):
    """`python -m scripts.bench.lag --quick --json` (issue #28), both ways of emulating the
    network: every setup measured, the rate case's lag within its bound and its pivot done (no
    speed asserted)."""
    res = run(sys.executable, "-m", "scripts.bench.lag", "--quick", "--json", "--lag", "16M",
              "--network", network, cwd=ROOT, check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["errors"] == [] and report["config"]["network"] == network
    assert set(report["results"]) == setups
    assert {kind for r in report["ratios"].values() for kind in r} == {"lag", "sync"}
    long = report["long"]
    assert len(long["pairs"]) == 2 and all(p["ratio"] > 0 for p in long["pairs"]), long
    for setup, rows in report["results"].items():
        assert len(rows) == 3 and all(row["iops"] > 0 for row in rows.values()), (setup, rows)
    rate = report["rate"]
    assert 0 < rate["lag_peak"] <= 16 << 20 and rate["pivot_s"] > 0, rate


@pytest.mark.ceph           # its own cluster, but on the Ceph tests' worker: one cluster's start at once
def test_quick_remote_bench_measures_both_mirrors_on_both_remotes():
    """`python -m scripts.bench.remote --quick --json`: a delayed NBD export and an RBD image on the
    script's own one-node cluster, both mirrors, and both copies."""
    res = run(sys.executable, "-m", "scripts.bench.remote", "--quick", "--json", cwd=ROOT, check=False,
              timeout=600)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["errors"] == []
    for remote in ("nbd-1ms", "rbd"):
        for target in ("mirrorfs", "qemu-mirror"):
            rows = report["results"][remote][target]
            assert len(rows) == 3 and all(r["iops"] > 0 for r in rows.values()), rows
        assert set(report["copy"][remote]) == {"mirrorfs serve --copy full", "qemu-img convert -n"}
