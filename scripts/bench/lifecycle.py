"""The life of a disk, measured (issue #12): how long a client's request waits at a take-over, at a
hand-back and across restarts, and the plain export's speed next to a bare qemu-storage-daemon.

The probe is QEMU's NBD client with reconnection on (qemu-io, reconnect-delay), one 4 KiB write at a
time with 5 ms between them; a request's wait is from sending it to its "wrote" line. Goals: under
1 s at take-over and hand-back, under 3 s across a restart; the export at >= 0.95x a bare daemon.

    .venv/bin/python -m scripts.bench.lifecycle [--runs 3] [--json]
"""

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .common import MIRRORFS, MiB
from .fio import fio_argv, parse_fio

SIZE = 256 * MiB


class Probe:
    """Synchronous 4 KiB writes through a reconnecting qemu-io; (start time, seconds) per write."""

    def __init__(self, sock):
        self.proc = subprocess.Popen(
            ["qemu-io", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={sock},reconnect-delay=60"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1)
        self.samples = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        i = 0
        while not self._stop.is_set():
            started = time.monotonic()
            self.proc.stdin.write(f"write -P {i % 250 + 1} {(i % 4096) * 4096} 4k\n")
            self.proc.stdin.flush()
            while True:
                line = self.proc.stdout.readline()
                if not line:
                    return
                if "wrote" in line or "failed" in line:
                    break
            if "failed" in line:
                self.failed += 1
            self.samples.append((started, time.monotonic() - started))
            i += 1
            time.sleep(0.005)

    def worst(self, since, until):
        waits = [w for t, w in self.samples if since <= t <= until]
        return max(waits) if waits else None

    def stop(self):
        self._stop.set()
        self._thread.join(120)
        self.proc.communicate("quit\n", timeout=60)


class Background:
    def __init__(self, workdir, name, *args):
        self.out = workdir / f"{name}.out"
        self.proc = subprocess.Popen([*MIRRORFS, *map(str, args)], stdout=open(self.out, "w"),
                                     stderr=open(workdir / f"{name}.err", "w"))
        while "control " not in self.out.read_text():
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} failed: {(workdir / f'{name}.err').read_text()}")
            time.sleep(0.01)
        self.control = self.out.read_text().split("control ", 1)[1].split()[0]


def ctl(control, *args):
    subprocess.run([*MIRRORFS, *args, "--control", control], check=True, capture_output=True)


def window(probe, action, settle=1.0):
    """The worst wait of a request sent while `action` ran (and `settle` seconds after it)."""
    started = time.monotonic()
    action()
    ended = time.monotonic() + settle
    time.sleep(settle)
    return probe.worst(started, ended), ended - started


def stalls(workdir):
    """One life: export, take over, copy, pivot, hand back, then a restart of a migration (SIGTERM)
    and of a kill -9. Returns {event: worst wait in seconds}."""
    for d in ("a", "b", "c"):
        (workdir / d).mkdir()
    disk = workdir / "a" / "vm.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, str(SIZE)], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {SIZE // 2}", disk], check=True,
                   capture_output=True)
    sock = workdir / "vm.sock"
    export = Background(workdir, "export", "export", disk, "--socket", sock)
    probe = Probe(sock)
    result, procs = {}, [export]
    try:
        time.sleep(1)
        holder = {}

        def take_over(dest, name, *extra):
            holder["m"] = Background(workdir, name, "start", "--take-over", export.control,
                                     "--dest-dir", workdir / dest, *extra)
            procs.append(holder["m"])

        result["take-over"], _ = window(probe, lambda: take_over("b", "m1", "--state-dir",
                                                                 workdir / "state"))
        m = holder["m"]

        def restart_term():
            m.proc.send_signal(signal.SIGTERM)
            m.proc.wait(60)
            take_over("b", "m2", "--state-dir", workdir / "state")

        result["restart (SIGTERM)"], _ = window(probe, restart_term, settle=2)

        def restart_kill():
            holder["m"].proc.kill()
            holder["m"].proc.wait(60)
            take_over("b", "m3", "--state-dir", workdir / "state")

        result["restart (kill -9)"], _ = window(probe, restart_kill, settle=2)
        m = holder["m"]
        ctl(m.control, "copy")
        result["pivot"], _ = window(probe, lambda: ctl(m.control, "pivot"))
        result["hand-back"], _ = window(probe, lambda: (ctl(m.control, "hand-back"),
                                                        m.proc.wait(60)))
        result["between (plain export)"] = probe.worst(time.monotonic() - 1, time.monotonic())
    finally:
        probe.stop()
        for p in reversed(procs):
            if p.proc.poll() is None:
                p.proc.send_signal(signal.SIGTERM)
                p.proc.wait(60)
    result["failed requests"] = probe.failed
    return result


def iops(workdir, rw, runtime, order=("bare", "export")):
    """4k `rw` qd16 IOPS of a bare qemu-storage-daemon export and of `mirrorfs export`, each on a
    fresh, fully written image (`order`: which goes first; the runs alternate it)."""
    found = {}
    for target in order:
        image = workdir / f"{target}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE)], check=True)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {SIZE}", image], check=True,
                       capture_output=True)
        sock = workdir / f"{target}.sock"
        if target == "bare":
            proc = subprocess.Popen([
                "qemu-storage-daemon", "--blockdev",
                json.dumps({"driver": "file", "node-name": "f", "filename": str(image),
                            "cache": {"direct": True}, "aio": "native"}),
                "--blockdev", json.dumps({"driver": "qcow2", "node-name": "top", "file": "f",
                                          "cache": {"direct": True}}),
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=top,name=,writable=on"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not sock.exists():
                time.sleep(0.01)
        else:
            proc = Background(workdir, f"iops-{target}", "export", image, "--socket", sock,
                              "--cache", "none").proc
        try:
            out = subprocess.run(fio_argv(f"nbd+unix:///?socket={sock}", SIZE,
                                          (f"--rw={rw}", "--bs=4k", "--iodepth=16"), runtime, 1),
                                 capture_output=True, text=True, check=True).stdout
            job = parse_fio(out)
            found[target] = job["write" if "write" in rw else "read"]["iops"]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return found


def main():
    parser = argparse.ArgumentParser(prog="python -m scripts.bench.lifecycle", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="mfs-life-", dir="/tmp"))
    try:
        runs = []
        for i in range(args.runs):
            d = root / f"life{i}"
            d.mkdir()
            runs.append(stalls(d))
        speed = {}
        for rw in ("randwrite", "randread"):
            d = root / f"iops-{rw}"
            for i in range(args.runs):
                (d / str(i)).mkdir(parents=True)
            speed[rw] = [iops(d / str(i), rw, args.runtime,
                              ("bare", "export") if i % 2 == 0 else ("export", "bare"))
                         for i in range(args.runs)]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps({"stalls": runs, "iops": speed}, indent=1))
        return
    print(f"Longest wait of a 4 KiB write (qemu-io, reconnect-delay), worst of {args.runs} runs:")
    for event in runs[0]:
        values = [r[event] for r in runs]
        if event == "failed requests":
            print(f"  {event:24} {sum(values)}")
        else:
            print(f"  {event:24} {max(values) * 1000:8.1f} ms   (runs: "
                  f"{', '.join(f'{v * 1000:.0f}' for v in values)} ms)")
    print(f"\nfio 4k qd16, {args.runtime} s, median of {args.runs}: bare qemu-storage-daemon vs "
          "mirrorfs export")
    for rw, results in speed.items():
        bare = statistics.median(r["bare"] for r in results)
        export = statistics.median(r["export"] for r in results)
        print(f"  {rw:10} bare {bare:9.0f} IOPS   export {export:9.0f} IOPS   {export / bare:.2f}x")


if __name__ == "__main__":
    main()
