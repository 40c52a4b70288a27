"""Requests larger than the 32 MiB maximum mirrorfs advertises. nbdkit 1.32 passes them to the
plugin when the client did not negotiate block sizes; qemu-storage-daemon refuses requests over its
own 32 MiB. mirrorfs splits them into pieces the sides accept, under one range lock, and answers the
client once."""

import hashlib
import random

import nbd
import pytest

from lib.commands import run
from lib.images import MiB, images_identical, qemu_io

BIG = 40 * MiB
OFFSET = 8 * MiB
SIZE = 64 * MiB


@pytest.fixture
def big_pair(workdir):
    """A source with data everywhere (so a read or a zero of 40 MiB means something) and a copy."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, str(SIZE))
    qemu_io(src, *[f"write -P {0x20 + i} {i * MiB} {MiB}" for i in range(SIZE // MiB)], fmt="qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", src, dst)
    return src, dst


def lax_client(uri):
    """A client that neither asks for block size constraints nor checks its own requests."""
    h = nbd.NBD()
    h.set_request_block_size(False)
    h.set_strict_mode(0)
    h.connect_uri(uri)
    return h


def test_oversized_write_read_zero_trim(big_pair, serve):
    src, dst = big_pair
    disk = serve(src, dst)
    h = lax_client(disk.uri)
    try:
        data = random.Random(5).randbytes(BIG)
        h.pwrite(data, OFFSET)
        got = h.pread(BIG, OFFSET)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
        h.flush()
        for side in (src, dst):
            assert side_bytes_equal(side, OFFSET, data)
        # A zero and a trim of 40 MiB, overlapping the write.
        h.zero(BIG, 16 * MiB, nbd.CMD_FLAG_NO_HOLE)
        h.trim(BIG, 20 * MiB)
        h.zero(BIG, 4 * MiB)
        assert h.pread(BIG, 4 * MiB) == bytes(BIG)
        # Still in step: an ordinary request after them works.
        h.pwrite(b"\x61" * 65536, 0)
        h.flush()
    finally:
        h.shutdown()
    assert disk.stop() == 0, disk.stderr
    same, detail = images_identical(src, dst)
    assert same, detail
    qemu_io(dst, "read -P 0x61 0 64k", f"read -P 0 {4 * MiB} {BIG}", f"read -P {0x20 + 60} {60 * MiB} {MiB}",
            fmt="qcow2")


def side_bytes_equal(image, offset, data):
    """Whether `image` holds `data` at `offset` (read with qemu-io's pattern-free dump)."""
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile() as out:
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", "-U", str(image), out.name],
                       check=True)
        with open(out.name, "rb") as f:
            f.seek(offset)
            return f.read(len(data)) == data


@pytest.mark.parametrize("op", ["zero", "trim"])
def test_zero_and_trim_beyond_a_gibibyte(op, workdir, serve):
    """Zeroes and trims have no payload: they pass whole up to 1 GiB (QEMU sends discards of up to
    2 GiB) and are split above it. A sparse 3 GiB disk with marks on either side of each split."""
    src, dst = workdir / "src.qcow2", workdir / "dst.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, "3G")
    marks = [0, 1023 * MiB, 1024 * MiB, 2047 * MiB, 2048 * MiB, 2600 * MiB, 2700 * MiB]
    qemu_io(src, *[f"write -P 0x3e {m} 64k" for m in marks], fmt="qcow2")
    run("qemu-img", "convert", "-f", "qcow2", "-O", "qcow2", src, dst)
    disk = serve(src, dst)
    h = lax_client(disk.uri)
    try:
        length = 2600 * MiB                 # [0, 2600 MiB): three pieces
        if op == "zero":
            h.zero(length, 0)
        else:
            h.trim(length, 0)
        h.flush()
        if op == "zero":
            for m in marks[:5]:
                assert h.pread(65536, m) == bytes(65536), m
        assert h.pread(65536, 2600 * MiB) == b"\x3e" * 65536
    finally:
        h.shutdown()
    assert disk.stop() == 0, disk.stderr
    same, detail = images_identical(src, dst)
    assert same, detail
