"""What scraping the host's metrics costs the data path (docs/PERFORMANCE.md, "Scraping the host's
metrics").

    .venv/bin/python -m scripts.bench.host [--disks 8] [--seconds 10] [--rounds 2]

Serves --disks disks with `mirrorfs serve --copy full` under a small host budget (so that every one
of them is still copying while it measures), then runs fio 4k randwrite (iodepth 16) against the
first disk for --seconds, alternately without and with `mirrorfs metrics` scraped every second,
--rounds times each. Prints the IOPS and the CPU the first disk's nbdkit (the data path) and its
supervisor spend per request (their CPU time over fio's requests).
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from .common import MIRRORFS


def sh(*argv):
    subprocess.run([str(a) for a in argv], check=True, capture_output=True)


def wait_for(path, text, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{path}: {path.read_text()[-2000:]}")
        time.sleep(0.05)


def fio(uri, seconds):
    res = subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                          "--bs=4k", "--iodepth=16", "--time_based", f"--runtime={seconds}",
                          "--size=256m", "--output-format=json"], capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout[res.stdout.index("{"):])["jobs"][0]["write"]["total_ios"]


def scrape_loop(url, stop, count):
    while not stop.wait(1.0):
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        count[0] += 1


def main():
    p = argparse.ArgumentParser(prog="python -m scripts.bench.host")
    p.add_argument("--disks", type=int, default=8)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfsbench-", dir="/tmp"))
    rundir = root / "run"
    env = dict(os.environ, MIRRORFS_RUN_DIR=str(rundir))
    procs = []
    try:
        subprocess.run([*MIRRORFS, "budget", "set", "8M"], env=env, check=True)
        for i in range(args.disks):
            src, dst = root / f"src{i}.qcow2", root / f"dst{i}.qcow2"
            sh("qemu-img", "create", "-q", "-f", "qcow2", src, "1G")
            sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 128M", src)
            sh("qemu-img", "create", "-q", "-f", "qcow2", dst, "1G")
            out = root / f"serve{i}.out"
            with open(out, "w") as f:
                proc = psutil.Popen([*MIRRORFS, "serve", src, dst, "--copy", "full", "--socket",
                                     root / f"d{i}.sock"], stdout=f, stderr=subprocess.STDOUT,
                                    env=env, stdin=subprocess.DEVNULL)
            procs.append(proc)
            wait_for(out, "serving", proc)
        port = 19638
        metrics = psutil.Popen([*MIRRORFS, "metrics", "--listen", f"127.0.0.1:{port}"], env=env,
                               stdout=subprocess.PIPE, text=True)
        procs.append(metrics)
        metrics.stdout.readline()
        first = procs[0]
        nbdkit = next(c for c in first.children() if c.name() == "nbdkit")
        uri = f"nbd+unix:///?socket={root / 'd0.sock'}"
        results = {False: [], True: []}
        for _ in range(args.rounds):
            for scraped in (False, True):
                stop, count = threading.Event(), [0]
                scraper = threading.Thread(target=scrape_loop, args=(
                    f"http://127.0.0.1:{port}/metrics", stop, count)) if scraped else None
                if scraper:
                    scraper.start()
                before = (sum(nbdkit.cpu_times()[:2]), sum(first.cpu_times()[:2]))
                ios = fio(uri, args.seconds)
                after = (sum(nbdkit.cpu_times()[:2]), sum(first.cpu_times()[:2]))
                if scraper:
                    stop.set()
                    scraper.join()
                results[scraped].append({
                    "iops": ios / args.seconds,
                    "nbdkit_us": (after[0] - before[0]) / ios * 1e6,
                    "supervisor_us": (after[1] - before[1]) / ios * 1e6, "scrapes": count[0]})
        copying = json.loads(subprocess.run([*MIRRORFS, "list", "--json"], env=env,
                                            capture_output=True, text=True).stdout)
        print(f"{args.disks} disks, {sum(d['phase'] == 'copying' for d in copying)} still copying "
              f"at the end; fio 4k randwrite qd16 on one, {args.seconds} s x {args.rounds}")
        for scraped in (False, True):
            rows = results[scraped]
            print(f"  {'scraped every 1 s' if scraped else 'not scraped      '}: "
                  f"IOPS {statistics.median(r['iops'] for r in rows):8.0f}  "
                  f"nbdkit {statistics.median(r['nbdkit_us'] for r in rows):6.1f} us/request  "
                  f"supervisor {statistics.median(r['supervisor_us'] for r in rows):5.2f} us/request"
                  f"  (runs: {', '.join('%.0f' % r['iops'] for r in rows)})")
    finally:
        for proc in procs[::-1]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(60)
            except psutil.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
