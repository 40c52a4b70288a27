"""`mirrorfs metrics` scraped by a real Prometheus (Debian's, started here on loopback with a
generated config; no service): PromQL through its HTTP API returns the write rate and the copy
progress that `mirrorfs status` shows, within a scrape's granularity."""

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.control import control_request
from lib.fio import FioLoad
from lib.images import MiB, make_full_pair
from lib.waits import wait_until

SCRAPE = 1.0
SCRAPE_MS = int(SCRAPE * 1000)
WRITE_RATE = 4 * MiB


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """prometheus scraping `target` every SCRAPE seconds, its data in `root`."""

    def __init__(self, root, target):
        root.mkdir()
        self.port = free_port()
        config = root / "prometheus.yml"
        config.write_text(json.dumps({            # YAML is a superset of JSON
            "global": {"scrape_interval": f"{SCRAPE_MS}ms", "scrape_timeout": f"{SCRAPE_MS}ms"},
            "scrape_configs": [{"job_name": "mirrorfs",
                                "static_configs": [{"targets": [target]}]}]}))
        self.log = root / "prometheus.log"
        with open(self.log, "w") as log:
            self.proc = psutil.Popen(
                ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(self._ready, "prometheus ready", timeout=60)

    def _ready(self):
        assert self.proc.poll() is None, self.log.read_text()[-2000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, promql, at=None):
        """The instant vector of `promql`, as {labels' disk or "": value}."""
        params = {"query": promql}
        if at is not None:
            params["time"] = f"{at:.3f}"
        url = f"http://127.0.0.1:{self.port}/api/v1/query?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            reply = json.load(r)
        assert reply["status"] == "success", reply
        return {s["metric"].get("disk", ""): float(s["value"][1]) for s in reply["data"]["result"]}

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


@pytest.fixture
def prometheus():
    started = []

    def start(*args):
        p = Prometheus(*args)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


@pytest.fixture
def metrics_server(workdir):
    procs = []

    def start(rundir):
        listen = f"127.0.0.1:{free_port()}"
        p = psutil.Popen([*MIRRORFS, "metrics", "--listen", listen, "--run-dir", rundir],
                         stdout=subprocess.PIPE, text=True)
        procs.append(p)
        assert p.stdout.readline().startswith("metrics http://"), p.wait(10)
        return listen

    yield start
    for p in procs:
        p.terminate()
        assert p.wait(30) == 0
        p.stdout.close()


@pytest.mark.serial         # compares rates (fio's, status's, Prometheus's)
def test_prometheus_sees_what_status_shows(workdir, processes, prometheus, metrics_server):
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "8M", "--run-dir", rundir)
    src, dst = make_full_pair(workdir, 384 * MiB)
    disk = processes(workdir, "serve", "serve", src, dst, "--copy", "full",
                     "--socket", workdir / "d.sock", rundir=rundir)
    ctl = workdir / "d.sock.ctl"
    name = str(workdir / "d.sock")
    listen = metrics_server(rundir)
    prom = prometheus(workdir / "prom", listen)
    fio = FioLoad(workdir, f"nbd+unix:///?socket={workdir / 'd.sock'}", "--rw=randwrite",
                  "--bs=64k", f"--rate={WRITE_RATE // 1024}k", "--size=64m", "--direct=1")
    try:
        # Enough scrapes for a rate over 5 s.
        wait_until(lambda: prom.query('count_over_time(mirrorfs_disk_up[10s])').get(name, 0) >= 6,
                   "six scrapes", timeout=60)
        assert fio.running()

        # The write rate: Prometheus's rate() of the byte counter, against the rate that two
        # `status` readings of the same counter give.
        def written():
            return control_request(ctl, {"cmd": "status"})["status"]["datapath"]["request_bytes"]["write"]
        t0, w0 = time.time(), written()
        time.sleep(5)
        t1, w1 = time.time(), written()
        status_rate = (w1 - w0) / (t1 - t0)
        prom_rate = prom.query('rate(mirrorfs_request_bytes_total{op="write"}[5s])', at=t1)[name]
        assert abs(status_rate - WRITE_RATE) <= 0.2 * WRITE_RATE, status_rate
        assert abs(prom_rate - status_rate) <= 0.2 * status_rate, (prom_rate, status_rate)

        # The copy's progress: the latest sample is at most one scrape (plus the query's lag)
        # behind what status says now.
        status = json.loads(run(*MIRRORFS, "status", "--json", "--control", ctl).stdout)
        now = time.time()
        assert status["phase"] == "copying"
        done = prom.query("mirrorfs_copy_bytes_done", at=now)[name]
        total = prom.query("mirrorfs_copy_bytes_to_copy", at=now)[name]
        copy_rate = prom.query("rate(mirrorfs_copy_bytes_done[5s])", at=now)[name]
        assert total == status["copy"]["bytes_total"]
        behind = status["copy"]["bytes_done"] - done
        assert 0 <= behind <= copy_rate * (SCRAPE + 1.0) + 8 * MiB, (behind, copy_rate)
        assert prom.query('mirrorfs_disk_phase{phase="copying"}', at=now)[name] == 1
        assert prom.query('mirrorfs_disk_phase{phase="synchronized"}', at=now)[name] == 0
        assert prom.query("mirrorfs_copy_share_bytes_per_second", at=now)[name] == 8 * MiB
        assert prom.query("mirrorfs_budget_bytes_per_second", at=now)[""] == 8 * MiB
        # The per-side latency histogram is there, and counts the sampled writes.
        count = prom.query('sum by (disk) (mirrorfs_side_request_duration_seconds_count)', at=now)
        assert count[name] > 0
    finally:
        report = fio.stop()
    assert report["error"] == 0
    run(*MIRRORFS, "budget", "clear", "--run-dir", rundir)     # what follows needs the end only

    # Once the copy is done, Prometheus's last word is status's.
    wait_until(lambda: control_request(ctl, {"cmd": "status"})["status"]["phase"] == "synchronized",
               "synchronized", timeout=120)
    wait_until(lambda: prom.query('mirrorfs_disk_phase{phase="synchronized"}').get(name) == 1,
               "prometheus sees it synchronized", timeout=30)
    status = control_request(ctl, {"cmd": "status"})["status"]
    requests = status["datapath"]["request_bytes"]["write"]
    assert prom.query('mirrorfs_request_bytes_total{op="write"}')[name] == requests
    assert disk.stop() == 0
    # The stopped disk leaves the next scrapes.
    wait_until(lambda: name not in prom.query("mirrorfs_disk_up"), "disk gone from the scrape",
               timeout=30)
