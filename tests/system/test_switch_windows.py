"""A switch at the worst moment, held there through real processes (the same windows in-process:
tests/unit/test_windows.py). Neither test writes and hopes: each stops the data path inside its
window and waits for the state that shows it is there.

Both in `--copy full`, so a pivot checks `synchronized` only (with `--copy none` it would first
compare the sides, and refuse a difference the way a compare does).

- A write in flight: the destination's pause filter holds it (seen in the data path's
  `in_flight`); pivot starts and the data path holds new requests (`paused` in its status); the
  held write then fails at the destination (error filter, degrade). The switch must have waited
  for it: refused, the sides differ. A switch that does not drain switches before the write fails,
  and the disk serves a destination without an acknowledged write.
- A region copied again, between two of its chunks: a write that reached only the source
  (degrade) makes region 2 (data in the source) one to copy again; at `mirrorfs rate 1K` the
  copier copies its first 256 KiB chunk at once and waits minutes for the second, holding no
  lock. A pivot there must be refused (the region still differs: its last bytes hold the write),
  and after kill -9 of everything the same command line must copy the region again.
"""

import threading

import nbd
import psutil

from lib.commands import EXIT_ERROR, MIRRORFS, run
from lib.control import control_request
from lib.images import MiB, images_identical, make_full_pair
from lib.nbdservers import NbdkitFilter, PausableFront
from lib.waits import wait_until

SIZE = 16 * MiB


def status(disk):
    return control_request(disk.control, {"cmd": "status"})["status"]


def wait_phase(disk, phase, timeout=120):
    return wait_until(lambda: status(disk)["phase"] == phase, phase, timeout=timeout)


def equal_sides(workdir):
    src, dst = make_full_pair(workdir, SIZE)
    run("qemu-img", "convert", "-n", "-f", "qcow2", "-O", "qcow2", src, dst)
    return src, dst


def pivot(disk):
    return run(*MIRRORFS, "pivot", "--control", disk.control, check=False)


def test_a_pivot_waits_for_a_write_in_flight_that_then_fails_at_the_destination(workdir, serve,
                                                                                 qemu_nbd):
    src, dst = equal_sides(workdir)
    export = qemu_nbd(dst, "dst-export")
    trigger = workdir / "fail-writes"
    front = PausableFront(workdir, "dst-front", export.socket, "--filter=error",
                          "error-pwrite=EIO", "error-pwrite-rate=100%",
                          f"error-pwrite-file={trigger}")
    try:
        disk = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                     "--on-dest-error", "degrade", src, front.uri)
        wait_phase(disk, "synchronized")
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        front.pause()
        data = b"\x6b" * 4096
        cookie = h.aio_pwrite(data, 5 * MiB + 4096)
        wait_until(lambda: status(disk)["datapath"]["in_flight"] == 1, "the write in flight")
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("pivot", pivot(disk)))
        t.start()
        # (A switch that does not drain may be done before its pause is seen: then on at once.
        # One that drains waits for the write up to its 10 s drain timeout: let go at once.)
        wait_until(lambda: not t.is_alive() or status(disk)["datapath"]["paused"],
                   "the switch holding requests")
        trigger.touch()                                 # the held write fails once let go
        front.resume()
        t.join(120)
        refused = result["pivot"]
        assert refused.returncode == EXIT_ERROR and "may still differ" in refused.stderr, \
            f"the switch did not wait for the write in flight: {refused.stdout}{refused.stderr}"
        while not h.aio_command_completed(cookie):      # degrade: the client is answered
            h.poll(-1)
        assert h.pread(4096, 5 * MiB + 4096) == data
        trigger.unlink()
        wait_phase(disk, "synchronized", timeout=60)
        assert "switched" in pivot(disk).stdout
        h.shutdown()
        assert disk.stop() == 0
    finally:
        front.stop()
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail


def kill_tree(disk):
    proc = psutil.Process(disk.proc.pid)
    tree = [proc, *proc.children(recursive=True)]
    for p in tree:
        p.kill()
    psutil.wait_procs(tree, timeout=30)


def test_a_pivot_between_two_chunks_of_a_region_copied_again_is_refused(workdir, serve,
                                                                        qemu_nbd):
    src, dst = equal_sides(workdir)
    export = qemu_nbd(dst, "dst-export")
    trigger = workdir / "fail-writes"
    faulty = NbdkitFilter(workdir, "faulty", export.socket, "--filter=error",
                          "error-pwrite=EIO", "error-pwrite-rate=100%",
                          f"error-pwrite-file={trigger}")
    command = ("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
               "--on-dest-error", "degrade", src, faulty.uri)
    try:
        disk = serve(*command)
        wait_phase(disk, "synchronized")
        run(*MIRRORFS, "rate", "1K", "--control", disk.control)
        trigger.touch()
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        data = b"\x5d" * 4096
        h.pwrite(data, 3 * MiB - 8192)                  # region 2's last chunk: source only
        h.shutdown()
        trigger.unlink()
        # The first chunk (256 KiB) copied at once; the next waits for its rate.
        copied = status(disk)["datapath"]["copy"]["bytes_read"]       # the first pass's
        wait_until(lambda: status(disk)["datapath"]["copy"]["bytes_read"] >= copied + 256 * 1024,
                   "the region's first chunk copied", timeout=60)
        refused = pivot(disk)
        assert refused.returncode == EXIT_ERROR and "may still differ" in refused.stderr, \
            f"a pivot while a region is copied again: {refused.stdout}{refused.stderr}"
        kill_tree(disk)                                 # there, kill -9 of every process
        disk = serve(*command)
        wait_phase(disk, "synchronized", timeout=60)
        assert "switched" in pivot(disk).stdout
        assert disk.stop() == 0
    finally:
        faulty.stop()
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail
