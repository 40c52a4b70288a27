#!/usr/bin/env python3
"""`make demo`: the seed's Mirrored-Snapshot migration, end to end, on generated images.

A client keeps writing to the disk through mirrorfs from Step 3 to after Step 5; at the end the demo
proves that the destination chain equals the source chain (as of the switch) and that every write the
client made is on the destination. Runs the real `mirrorfs` CLI and prints each command.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nbd

MiB = 1 << 20
BLOCK = 64 * 1024


MIRRORFS = [sys.executable, "-m", "mirrorfs"]


def shown(argv):
    """The command as a person would type it."""
    argv = [str(a) for a in argv]
    if argv[:3] == MIRRORFS:
        argv = ["mirrorfs"] + argv[3:]
    return "  $ " + " ".join(argv)


def sh(*argv, quiet=False):
    argv = [str(a) for a in argv]
    if not quiet:
        print(shown(argv))
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"demo: {' '.join(argv[:3])} failed: {res.stderr.strip()}")
    return res.stdout


class Writer(threading.Thread):
    """The guest: random writes of distinct patterns, remembered so they can be checked later."""

    def __init__(self, uri, size, seed):
        super().__init__(name="client", daemon=True)
        self.h = nbd.NBD()
        self.h.connect_uri(uri)
        self.size = size
        self.rng = random.Random(seed)
        self.written = {}               # block number -> the byte it was filled with
        self.count = 0
        self.running = threading.Event()
        self.running.set()
        self.paused = threading.Event()
        self.stopped = False

    def run(self):
        blocks = self.size // BLOCK
        while not self.stopped:
            if not self.running.is_set():
                self.h.flush()
                self.paused.set()
                self.running.wait()
                self.paused.clear()
                continue
            block = self.rng.randrange(blocks)
            value = self.rng.randrange(1, 256)
            self.h.pwrite(bytes([value]) * BLOCK, block * BLOCK)
            self.written[block] = value
            self.count += 1
            time.sleep(0.002)           # a guest, not a benchmark

    def pause(self):
        self.running.clear()
        self.paused.wait()

    def resume(self):
        self.running.set()

    def stop(self):
        self.stopped = True
        self.running.set()
        self.join()
        self.h.flush()
        self.h.shutdown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="disk size in MiB (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size = args.size * MiB
    mirrorfs = MIRRORFS
    work = Path(tempfile.mkdtemp(prefix="mirrorfs-demo-", dir="/tmp"))
    # Commands run in the work directory with relative paths, so they read like the seed's.
    os.chdir(work)
    src, dst = Path("src"), Path("dst")
    src.mkdir()
    dst.mkdir()
    sock, ctl = Path("vm.sock"), Path("vm.sock.ctl")
    server = None
    t0 = time.monotonic()
    timings = {}
    try:
        print(f"work directory: {work}\n")
        print("Step 1 - the VM's disk: src/base.qcow2 with data")
        sh("qemu-img", "create", "-q", "-f", "qcow2", src / "base.qcow2", str(size))
        writes = [f"write -P {0x20 + i % 200} {i * 4 * MiB} {2 * MiB}" for i in range(size // (4 * MiB))]
        sh("qemu-io", "-f", "qcow2", *[x for w in writes for x in ("-c", w)], src / "base.qcow2",
           quiet=True)
        print(f"  ({args.size} MiB virtual, {len(writes) * 2} MiB of data)\n")

        print("Step 3 - mirrored live snapshot: serve the disk, writes to both overlays")
        cmd = [*mirrorfs, "start", src / "base.qcow2", "--dest-dir", dst, "--socket", sock]
        print(shown(cmd))
        log = open(work / "mirrorfs.log", "w")
        server = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=log, text=True)
        line = server.stdout.readline()
        if not line.startswith("serving "):
            sys.exit(f"demo: mirrorfs start failed: {(work / 'mirrorfs.log').read_text().strip()}")
        uri = line.split()[1]
        print(f"  serving {uri}")
        uri = f"nbd+unix:///?socket={work / sock}"
        client = Writer(uri, size, seed=2012)
        client.start()
        print("  a client is writing 64 KiB blocks through the disk\n")
        time.sleep(1)

        print("Step 4 - base copy to the destination, while the client writes")
        started = time.monotonic()
        sh(*mirrorfs, "copy", "--control", ctl, "--rate", "1G")
        timings["copy"] = time.monotonic() - started
        copy = json.loads(sh(*mirrorfs, "status", "--json", "--control", ctl, quiet=True))["copy"]
        time.sleep(0.5)

        # The proof that both chains hold the same disk: hold the client a moment (it flushes),
        # compare the chains, let it go on. The daemons keep the images open, hence -U.
        client.pause()
        identical = subprocess.run(["qemu-img", "compare", "-U", str(src / "base-snap.qcow2"),
                                    str(dst / "base-snap.qcow2")], capture_output=True, text=True)
        writes_before_switch = client.count
        client.resume()
        print(f"  source chain vs destination chain: {identical.stdout.strip()}\n")

        print("Step 5 - switch to the destination, the client still writing")
        out = sh(*mirrorfs, "pivot", "--control", ctl)
        print("  " + out.strip())
        time.sleep(1)
        client.stop()
        status = json.loads(sh(*mirrorfs, "status", "--json", "--control", ctl, quiet=True))
        server.terminate()
        server.wait(30)
        server = None

        # Every write the client made, before and after the switch, is on the destination chain.
        h = nbd.NBD()
        check = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", str(work / "check.sock"),
                                  "--pid-file", str(work / "check.pid"), str(dst / "base-snap.qcow2")])
        while not (work / "check.pid").exists():
            time.sleep(0.01)
        h.connect_uri(f"nbd+unix:///?socket={work / 'check.sock'}")
        missing = [b for b, v in client.written.items() if h.pread(BLOCK, b * BLOCK) != bytes([v]) * BLOCK]
        h.shutdown()
        check.terminate()
        check.wait()
        chain = json.loads(sh("qemu-img", "info", "--output=json", "--backing-chain",
                              dst / "base-snap.qcow2", quiet=True))
        standalone = all(not os.path.abspath(layer["filename"]).startswith(str(work / src))
                         for layer in chain)

        ok = identical.returncode == 0 and not missing and standalone and status["phase"] == "switched"
        print("\nSummary")
        print(f"  disk                      {args.size} MiB, qcow2, {len(writes) * 2} MiB of data in the base")
        print(f"  base copy                 {copy['bytes_total'] / MiB:.0f} MiB in {copy['seconds']:.2f}s "
              f"(mirrorfs copy: sparse, over NBD, data extents only)")
        print(f"  client writes             {client.count} ({writes_before_switch} before the switch)")
        print(f"  chains compared           {'identical' if identical.returncode == 0 else 'DIFFERENT'}"
              f" (qemu-img compare, before the switch)")
        print(f"  switch                    clients held {status['switch']['stall_ms']:.1f} ms, "
              f"no disconnect")
        print(f"  writes on the destination {len(client.written) - len(missing)} of "
              f"{len(client.written)} blocks verified")
        print(f"  destination chain         {' <- '.join(os.path.relpath(l['filename']) for l in reversed(chain))}"
              f"{'' if standalone else ' (STILL USES THE SOURCE)'}")
        print(f"  total time                {time.monotonic() - t0:.1f}s")
        print(f"\n{'PASSED' if ok else 'FAILED'}: the disk moved from {work / src} to {work / dst} "
              "while it was in use.")
        return 0 if ok else 1
    finally:
        os.chdir("/")
        if server is not None:
            server.terminate()
            server.wait(30)
        if args.keep:
            print(f"(kept {work})")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
