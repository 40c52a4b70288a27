"""Writes a client queues right before NBD_CMD_DISC.

The protocol says the server must finish them. nbdkit 1.32 sometimes does not: a worker thread that
has read a write checks, before calling the plugin, whether the connection is still up
(server/protocol.c: `if (quit || !connection_get_status ()) error = ESHUTDOWN;`), and another worker
thread may meanwhile have read the NBD_CMD_DISC behind it and marked the connection done. The plugin
never sees that write, so mirrorfs cannot perform it on either side; what mirrorfs guarantees is that
the sides stay identical. docs/GUARANTEES.md has the measured rate; `python3 tests/system/test_disconnect.py`
measures it again (mirrorfs, and plain nbdkit for comparison)."""

import subprocess
import sys
import time

import nbd

from lib.commands import run
from lib.images import MiB, images_identical
from lib.nbdservers import wait_for_pidfile

ROUNDS = 30
CHUNK = 64 * 1024


def write_then_disconnect(uri, rounds):
    """Each round: a new connection queues one write (a pattern of its own, in a region of its
    own) and disconnects at once, without waiting for the reply. Returns the patterns written."""
    patterns = []
    for i in range(rounds):
        h = nbd.NBD()
        h.connect_uri(uri)
        pattern = i % 250 + 1
        h.aio_pwrite(bytes([pattern]) * CHUNK, i * CHUNK)
        h.shutdown()            # NBD_CMD_DISC goes out right behind the write
        patterns.append(pattern)
    return patterns


def performed(uri, patterns):
    """How many of the rounds' writes the server performed (read back through `uri`)."""
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return sum(h.pread(CHUNK, i * CHUNK) == bytes([p]) * CHUNK for i, p in enumerate(patterns))
    finally:
        h.shutdown()


def test_writes_before_a_disconnect_never_leave_the_sides_different(chains, serve):
    disk = serve(chains.source, chains.dest)
    patterns = write_then_disconnect(disk.uri, ROUNDS)
    done = performed(disk.uri, patterns)
    assert disk.stop() == 0, disk.stderr
    print(f"{done} of {ROUNDS} writes queued before NBD_CMD_DISC were performed")
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def measure(rounds, workdir):
    """The rate for mirrorfs and for plain nbdkit (file plugin), as docs/GUARANTEES.md reports."""
    from pathlib import Path
    workdir = Path(workdir)
    results = {}
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    for image in (src, dst):
        run("qemu-img", "create", "-q", "-f", "qcow2", image, str(64 * MiB))
    served = subprocess.Popen([sys.executable, "-m", "mirrorfs", "serve", src, dst, "--socket",
                               workdir / "m.sock"], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in served.stdout.readline()
        uri = f"nbd+unix:///?socket={workdir}/m.sock"
        results["mirrorfs"] = performed(uri, write_then_disconnect(uri, rounds))
    finally:
        served.terminate()
        served.wait(30)
    same, _ = images_identical(src, dst)
    raw = workdir / "plain.raw"
    run("truncate", "-s", str(64 * MiB), raw)
    plain = subprocess.Popen(["nbdkit", "-f", "-U", workdir / "p.sock", "--pidfile",
                              workdir / "p.pid", "file", raw])
    try:
        assert wait_for_pidfile(plain, workdir / "p.pid")
        uri = f"nbd+unix:///?socket={workdir}/p.sock"
        results["plain nbdkit"] = performed(uri, write_then_disconnect(uri, rounds))
    finally:
        plain.terminate()
        plain.wait(30)
    return results, same


if __name__ == "__main__":
    import tempfile
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        started = time.monotonic()
        results, same = measure(rounds, d)
    for name, done in results.items():
        print(f"{name}: {rounds - done} of {rounds} writes queued before NBD_CMD_DISC not performed")
    print(f"mirrorfs's sides identical: {same}")
