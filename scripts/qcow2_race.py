#!/usr/bin/env python3
"""Does this machine's qemu-storage-daemon corrupt qcow2 under concurrent writes, zeroes and trims?

Why mirrorfs serializes changes per qcow2 cluster (mirrorfs/inflight.py): on Debian 12's QEMU 7.2,
four connections sending writes, write-zeroes without unmap (NO_HOLE) and trims at random into a
4 MiB region of a qcow2 overlay leave refcount errors (`qemu-img check`) in about a third of runs,
against a bare export, without mirrorfs. Any pair of those operations alone does not.

`--pattern cluster` needs no overlapping bytes and no luck: clusters written whole, zeroed keeping
their allocation, then a 4 KiB write and a 4 KiB zero that may unmap, at once, in each; every run
is damaged (tests/system/test_races.py sends the same through mirrorfs, which must keep them apart).

    .venv/bin/python scripts/qcow2_race.py [--runs 20] [--pattern random|cluster]
"""

import argparse
import json
import random
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import nbd

MiB = 1 << 20
REGION = 4 * MiB


def client(uri, rng):
    h = nbd.NBD()
    h.connect_uri(uri)
    for _ in range(25):
        cookies = []
        for _ in range(8):
            offset = rng.randrange(0, REGION - 512, 512)
            length = min(rng.choice([512, 4096, 65536, 300 * 1024, MiB]), REGION - offset)
            op = rng.choice("wZt")
            if op == "w":
                cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(rng.randbytes(length)), offset))
            elif op == "Z":
                cookies.append(h.aio_zero(length, offset, flags=nbd.CMD_FLAG_NO_HOLE))
            else:
                cookies.append(h.aio_trim(length, offset))
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)
    h.shutdown()


def cluster_client(uri, rng):
    h = nbd.NBD()
    h.connect_uri(uri)
    cluster = 64 * 1024

    def wait(cookies):
        for c in cookies:
            while not h.aio_command_completed(c):
                h.poll(-1)

    for r in range(20):
        clusters = range(512 + r * 16, 512 + (r + 1) * 16)
        wait([h.aio_pwrite(b"\x55" * cluster, c * cluster) for c in clusters])
        wait([h.aio_zero(cluster, c * cluster, flags=nbd.CMD_FLAG_NO_HOLE) for c in clusters])
        wait([cookie for c in clusters for cookie in (
            h.aio_pwrite(b"\x66" * 4096, c * cluster), h.aio_zero(4096, c * cluster + cluster // 2))])
    h.shutdown()


def one_run(seed, pattern="random"):
    work = Path(tempfile.mkdtemp(prefix="qcow2-race-"))
    try:
        base, top, sock = work / "base.qcow2", work / "top.qcow2", work / "nbd.sock"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "64M"], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x10 0 1M", base], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top],
                       check=True)
        daemon = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", json.dumps({"driver": "file", "node-name": "f", "filename": str(top),
                                       "discard": "unmap"}),
             "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top", "file": "f",
                                       "discard": "unmap"}),
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e,node-name=top,name=,writable=on",
             "--pidfile", str(work / "pid")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (work / "pid").exists():
                time.sleep(0.01)
            uri = f"nbd+unix:///?socket={sock}"
            clients = 4 if pattern == "random" else 1
            target = client if pattern == "random" else cluster_client
            threads = [threading.Thread(target=target, args=(uri, random.Random(seed * 100 + i)))
                       for i in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            daemon.terminate()
            daemon.wait()
        check = subprocess.run(["qemu-img", "check", top], capture_output=True, text=True)
        return check.returncode == 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pattern", choices=("random", "cluster"), default="random")
    args = parser.parse_args()
    bad = sum(not one_run(seed, args.pattern) for seed in range(args.runs))
    print(f"qcow2 image damaged in {bad} of {args.runs} runs (qemu-img check)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
