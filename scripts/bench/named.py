#!/usr/bin/env python3
"""What 300 named disks cost on this host, served by `mirrorfs host` (docs/PERFORMANCE.md, "300 named
disks").

    .venv/bin/python -m scripts.bench.named [--disks 300] [--idle 20] [--keep]

Registers --disks small qcow2 disks in a fresh registry (mirrorfs.host.registry, no service yet), then:

1. starts `mirrorfs host` and times it until every disk is served (its readiness line, then `list
   --json` saying "exporting" for each);
2. measures the USS of every process serving them (the service and every qemu-storage-daemon), the
   service's CPU over --idle seconds of idleness, the wall time of `mirrorfs list --json` and of one
   scrape of `mirrorfs metrics` (running beforehand);
3. kills the service with SIGKILL under a reconnecting writer (qemu-io, reconnect-delay) on one disk,
   starts it again and times the adoption of every daemon; the writer must see no error and every
   daemon keep its pid;
4. `mirrorfs shutdown`.

Prints one JSON object with the numbers. Goals (issue #26): <= 3 MiB USS per disk, all processes
counted; all serving within 60 s; list and a scrape under 1 s each; the idle service under 1% of a core.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from mirrorfs.host import view
from mirrorfs.host.registry import Registry
from mirrorfs.host.rundir import RunDir

from .common import MIRRORFS, MiB


def mirrorfs(*args, env):
    res = subprocess.run([*MIRRORFS, *map(str, args)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"mirrorfs {args[0]} failed: {res.stderr.strip()}")
    return res.stdout


def start_host(root, env, n):
    """Start `mirrorfs host`; the seconds until its readiness line (every disk served or failed)."""
    path = root / f"host{len(list(root.glob('host*.out')))}.out"
    out = open(path, "w")
    t0 = time.monotonic()
    proc = subprocess.Popen([*MIRRORFS, "host"], stdout=out, stderr=out, env=env, stdin=subprocess.DEVNULL)
    while "host service:" not in path.read_text():
        if proc.poll() is not None:
            raise SystemExit(f"mirrorfs host exited: {path.read_text()[-2000:]}")
        time.sleep(0.05)
    ready = time.monotonic() - t0
    listed = json.loads(mirrorfs("list", "--json", env=env))
    serving = sum(1 for r in listed if r.get("kind") == "named" and r["phase"] == "exporting")
    if serving != n:
        proc.kill()
        proc.wait()
        raise SystemExit(f"only {serving} of {n} disks serving: {path.read_text()[-2000:]}")
    return proc, ready


def daemons_of(root):
    found = []
    for p in psutil.process_iter(["name", "cmdline"]):
        if p.info["name"] == "qemu-storage-daemon" and str(root) in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found


def uss(procs):
    return sum(p.memory_full_info().uss for p in procs)


def writer(socket):
    """qemu-io with reconnect-delay, one 4 KiB write every 5 ms until told to stop."""
    proc = subprocess.Popen(["qemu-io", "--image-opts",
                             f"driver=nbd,server.type=unix,server.path={socket},reconnect-delay=30"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    sent = [0]

    def feed():
        while not stop.is_set() and sent[0] < 4000:
            proc.stdin.write(f"write -P {sent[0] % 250 + 1} {sent[0] * 4096} 4096\n")
            proc.stdin.flush()
            sent[0] += 1
            time.sleep(0.005)
    thread = threading.Thread(target=feed, daemon=True)
    thread.start()

    def finish():
        stop.set()
        thread.join()
        out, _ = proc.communicate("quit\n", timeout=120)
        failed = [line for line in out.splitlines() if "failed" in line or "rror" in line]
        wrote = sum(line.removeprefix("qemu-io> ").startswith("wrote ") for line in out.splitlines())
        return sent[0], wrote, failed
    return finish


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--disks", type=int, default=300)
    ap.add_argument("--idle", type=float, default=20)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfsbn-", dir="/tmp"))
    env = {**os.environ, "MIRRORFS_RUN_DIR": str(root / "run"), "MIRRORFS_REGISTRY": str(root / "reg")}
    results = {"disks": args.disks}
    host = metrics = None
    try:
        (root / "img").mkdir()
        registry = Registry(root / "reg")
        t0 = time.monotonic()
        for i in range(args.disks):
            image = root / "img" / f"d{i}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(16 * MiB)], check=True)
            registry.add(f"d{i}", image, root / "img" / f"d{i}.sock")
        results["register_s"] = round(time.monotonic() - t0, 1)

        host, results["start_to_all_serving_s"] = start_host(root, env, args.disks)
        daemons = daemons_of(root)
        service = psutil.Process(host.pid)
        results["daemons"] = len(daemons)
        time.sleep(2)
        service_uss, daemons_uss = uss([service]), uss(daemons)
        results["uss_service_mib"] = round(service_uss / MiB, 1)
        results["uss_daemons_mib"] = round(daemons_uss / MiB, 1)
        results["uss_per_disk_mib"] = round((service_uss + daemons_uss) / args.disks / MiB, 2)
        results["rss_per_daemon_mib"] = round(sum(p.memory_info().rss for p in daemons) / len(daemons) / MiB, 1)

        cpu0, w0 = sum(service.cpu_times()[:2]), time.monotonic()
        time.sleep(args.idle)
        results["idle_service_cpu_percent"] = round(
            100 * (sum(service.cpu_times()[:2]) - cpu0) / (time.monotonic() - w0), 3)

        t = time.monotonic()
        mirrorfs("list", "--json", env=env)
        results["list_json_cli_s"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        view.disks(RunDir(root / "run", create=False))      # what `list --json` does once started
        results["list_json_view_s"] = round(time.monotonic() - t, 3)
        t = time.monotonic()
        mirrorfs("--version", env=env)
        results["cli_startup_s"] = round(time.monotonic() - t, 3)
        mout = open(root / "metrics.out", "w")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        metrics = subprocess.Popen([*MIRRORFS, "metrics", "--listen", f"127.0.0.1:{port}"], stdout=mout,
                                   stderr=subprocess.STDOUT, env=env)
        while "metrics http" not in (root / "metrics.out").read_text():
            if metrics.poll() is not None:
                raise SystemExit(f"mirrorfs metrics exited: {(root / 'metrics.out').read_text()}")
            time.sleep(0.05)
        url = (root / "metrics.out").read_text().split("metrics ", 1)[1].split()[0]
        urllib.request.urlopen(url, timeout=30).read()          # warm
        t = time.monotonic()
        body = urllib.request.urlopen(url, timeout=30).read().decode()
        results["metrics_scrape_s"] = round(time.monotonic() - t, 3)
        results["metrics_disks"] = body.count("mirrorfs_disk_info{")

        pids = {p.pid for p in daemons}
        finish = writer(root / "img" / "d0.sock")
        time.sleep(1)
        host.send_signal(signal.SIGKILL)
        host.wait()
        time.sleep(0.5)
        host, results["restart_to_all_adopted_s"] = start_host(root, env, args.disks)
        results["daemons_kept_pid"] = len(pids & {p.pid for p in daemons_of(root)})
        time.sleep(1)
        sent, wrote, failed = finish()
        results["writer"] = {"sent": sent, "acknowledged": wrote, "failed": len(failed)}

        t = time.monotonic()
        mirrorfs("shutdown", env=env)
        results["shutdown_s"] = round(time.monotonic() - t, 1)
        host.wait(60)
        host = None
    finally:
        for proc in (metrics, host):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(60)
        left = daemons_of(root)
        for p in left:
            p.terminate()
        psutil.wait_procs(left, timeout=60)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
