"""`mirrorfs serve SOURCE DEST` (default `--copy none`: the operator says the sides start equal)
pivots only onto a destination that holds the source's bytes (docs/USING.md, "serve's pivot").

- A destination created empty, or differing by one byte: `status` reports no copy (none ran),
  `pivot` and the control socket's `verify` compare the sides and refuse with the first differing offset, and the disk
  stays on the source (a client still reads the source's data).
- Equal sides, a client writing all through the comparison: `pivot` compares (each chunk under its
  range lock, so a write in flight is no false difference) and switches; the destination then
  holds the source's bytes and every write.
"""

import random
import threading

import nbd
import pytest

from lib.commands import EXIT_ERROR, run
from lib.control import control_request, ctl, status
from lib.evacuation import raw_bytes
from lib.images import MiB, make_full_pair

SIZE = 64 * MiB


@pytest.mark.parametrize("dest,offset", [("created empty", 0),
                                         ("one byte different", 40 * MiB + 123)])
def test_pivot_refuses_a_destination_that_differs(workdir, serve, dest, offset):
    src, dst = make_full_pair(workdir, SIZE)
    if dest != "created empty":
        run("qemu-img", "convert", "-O", "qcow2", src, dst)
        run("qemu-io", "-f", "qcow2", "-c", f"write -P 0xee {offset} 1", dst)
    content = raw_bytes(workdir, src, "src")
    disk = serve(src, dst)
    s = status(disk.control)
    assert "copy" not in s, s                   # nothing was copied: no copy is reported
    text = ctl(disk.control, "status").stdout
    assert "copy:" not in text and "pivot compares them first" in text, text

    verified = control_request(disk.control, {"cmd": "verify"})
    assert verified["identical"] is False and f"at offset {offset}:" in verified["detail"], verified
    res = ctl(disk.control, "pivot", check=False)
    assert res.returncode == EXIT_ERROR, res
    assert f"differs from the source at offset {offset}:" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr

    s = status(disk.control)
    assert s["serving"] is None and s["phase"] in ("synchronized", "copying"), s
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.pread(MiB, 0) == content[:MiB]
    h.shutdown()
    assert disk.stop() == 0


def test_pivot_compares_equal_sides_under_writes_and_switches(workdir, serve):
    src, dst = make_full_pair(workdir, SIZE)
    run("qemu-img", "convert", "-O", "qcow2", src, dst)
    expected = bytearray(raw_bytes(workdir, src, "src"))
    disk = serve(src, dst)
    stop, written, failures = threading.Event(), [], []
    seed = random.randrange(1 << 30)
    print("seed", seed)

    def writer():
        rng = random.Random(seed)
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        try:
            while not stop.is_set():
                offset = rng.randrange(SIZE // 4096) * 4096
                data = bytes([rng.randrange(1, 256)]) * 4096
                h.pwrite(data, offset)
                written.append((offset, data))
        except nbd.Error as e:
            failures.append(e)
        finally:
            h.shutdown()

    t = threading.Thread(target=writer)
    t.start()
    try:
        res = ctl(disk.control, "pivot", check=False)
    finally:
        stop.set()
        t.join()
    assert res.returncode == 0, res.stderr
    assert not failures, failures
    assert written, "the writer wrote nothing"
    assert status(disk.control)["serving"] == "destination"
    assert disk.stop() == 0
    for offset, data in written:
        expected[offset:offset + len(data)] = data
    assert raw_bytes(workdir, dst, "dst") == bytes(expected)
