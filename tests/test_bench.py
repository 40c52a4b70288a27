"""`scripts/bench.py --quick --json` (`make bench`'s smoke run): every target starts, serves, is
measured and stopped. Nothing here asserts a speed; the numbers belong in docs/PERFORMANCE.md."""

import json
import sys
from pathlib import Path

from conftest import run

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"
TARGETS = ("mirrorfs", "direct", "qemu-mirror", "nbd-proxy")


def test_quick_bench_measures_every_target():
    res = run(sys.executable, BENCH, "--quick", "--json", check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["errors"] == []
    for target in TARGETS:
        rows = report["results"][target]
        assert rows, f"no results for {target}"
        for label, row in rows.items():
            assert row["iops"] > 0, f"{target} {label}: {row}"
    assert report["copy"]["nbdcopy"]["mbps"] > 0
    assert report["switch"]["probe_around_switch"]["requests"] > 0
    assert set(report["rss"]) == {"64 MiB", "1 TiB sparse"}
