"""Endpoints other than image files, failures of one side, and requests the server must refuse."""

import errno

import nbd
import pytest

from lib.commands import run
from lib.images import MiB, images_identical, qemu_io, sha256
from lib.nbdservers import NbdkitFilter


def errno_of(e):
    """libnbd's Error carries the errno's name in .errno and its number in args[1]."""
    return e.args[1]


def test_both_sides_as_nbd_uris(chains, serve, qemu_nbd):
    src = qemu_nbd(chains.source, "src-export")
    dst = qemu_nbd(chains.dest, "dst-export")
    disk = serve(src.uri, dst.uri)
    qemu_io(disk.uri, "write -P 0x5a 100k 3M", "write -z 8M 1M", "read -P 0x5a 100k 3M")
    assert disk.stop() == 0
    src.stop()
    dst.stop()
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_image_source_and_uri_destination(chains, serve, qemu_nbd):
    dst = qemu_nbd(chains.dest, "dst-export")
    disk = serve(chains.source, dst.uri)
    qemu_io(disk.uri, "write -P 0x77 1M 5M")
    assert disk.stop() == 0
    dst.stop()
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_destination_error_reaches_the_client_and_is_logged(chains, serve, qemu_nbd, workdir):
    dst = qemu_nbd(chains.dest, "dst-export")
    faulty = NbdkitFilter(workdir, "faulty", dst.socket, "--filter=error",
                          "error-pwrite=EIO", "error-pwrite-rate=100%")
    try:
        disk = serve(chains.source, faulty.uri)
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        with pytest.raises(nbd.Error) as failure:
            h.pwrite(b"x" * 4096, 2 * MiB)
        assert errno_of(failure.value) == errno.EIO
        assert h.pread(4096, 0) == bytes([0x10]) * 4096      # reads still served by the source
        h.shutdown()
    finally:
        try:
            # The write reached the source alone and nothing records it: stopping says so (exit 3).
            assert disk.stop() == 3
        finally:
            faulty.stop()
    assert "destination write failed at offset 2097152 length 4096" in disk.stderr


def test_source_error_reaches_the_client(chains, serve, qemu_nbd, workdir):
    src = qemu_nbd(chains.source, "src-export")
    faulty = NbdkitFilter(workdir, "faulty", src.socket, "--filter=error",
                          "error-pread=ENOSPC", "error-pread-rate=100%")
    try:
        disk = serve(faulty.uri, chains.dest)
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        with pytest.raises(nbd.Error) as failure:
            h.pread(4096, 0)
        assert errno_of(failure.value) == errno.ENOSPC           # the side's errno, not a generic one
        h.shutdown()
    finally:
        assert disk.stop() == 0
        faulty.stop()
    assert "source read failed at offset 0 length 4096" in disk.stderr


def test_readonly_serves_the_source_and_refuses_writes(chains, serve):
    before = sha256(chains.source)
    disk = serve(chains.source, "--readonly")
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.is_read_only()
    assert h.pread(MiB, 3 * MiB) == bytes([0x13]) * MiB
    with pytest.raises(nbd.Error):
        h.pwrite(b"y" * 512, 0)
    h.shutdown()
    assert disk.stop() == 0
    assert sha256(chains.source) == before


def test_requests_past_the_end_are_refused(chains, serve):
    before = {p: sha256(p) for p in (chains.source, chains.dest, chains.base)}
    disk = serve(chains.source, chains.dest)
    h = nbd.NBD()
    h.set_strict_mode(0)            # let the requests reach the server, which must refuse them
    h.connect_uri(disk.uri)
    size = h.get_size()
    for request in (lambda: h.pwrite(b"z" * 4096, size - 2048), lambda: h.pread(4096, size),
                    lambda: h.zero(MiB, size - 4096), lambda: h.trim(MiB, size)):
        with pytest.raises(nbd.Error):
            request()
    h.shutdown()
    assert disk.stop() == 0
    # Nothing reached any image: not a byte of the header, the tables or the data changed.
    assert {p: sha256(p) for p in before} == before


def test_destination_larger_than_source_serves_the_source_size(chains, serve, workdir):
    big = workdir / "dst" / "big.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", chains.base, "-F", "qcow2", big, "128M")
    disk = serve(chains.source, big)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    assert h.get_size() == 64 * MiB
    h.pwrite(b"q" * 4096, 64 * MiB - 4096)
    h.shutdown()
    assert disk.stop() == 0
    assert run("qemu-io", "-f", "qcow2", "-c", f"read -P 0x71 {64 * MiB - 4096} 4096",
               big).stdout.count("read 4096/4096") == 1


CAPABILITIES = ("can_fua", "can_zero", "can_fast_zero", "can_trim", "can_flush", "can_multi_conn")


@pytest.mark.parametrize("filters,missing", [
    ([], ()),
    # fuamode=none (the default): FUA is still offered, emulated with a flush after the write;
    # sending the flag to a side that does not advertise it would fail the write.
    (["--filter=fua"], ()),
    (["--filter=nozero", "zeromode=plugin", "fastzeromode=none"], ("can_fast_zero",)),
    # nbdkit still offers zero to mirrorfs's clients, and turns them into writes of zeros.
    (["--filter=nozero", "zeromode=none"], ("can_fast_zero",)),
    (["--filter=multi-conn", "multi-conn-mode=disable"], ("can_multi_conn",)),
], ids=["all", "no-fua", "no-fast-zero", "no-zero", "no-multi-conn"])
def test_a_destination_without_a_capability(chains, serve, qemu_nbd, workdir, filters, missing):
    """A client learns the disk's capabilities once, at connect time, and keeps them across a
    switch: the disk offers only what every side can do. Nothing the client may then send leaves
    the sides different."""
    export = qemu_nbd(chains.dest, "dst-export")
    front = NbdkitFilter(workdir, "dst-front", export.socket, *filters)
    try:
        disk = serve(chains.source, front.uri)
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        caps = {c: getattr(h, c)() for c in CAPABILITIES}
        assert [c for c, offered in caps.items() if not offered] == list(missing), caps
        fua = nbd.CMD_FLAG_FUA if caps["can_fua"] else 0
        h.pwrite(b"\x71" * 65536, MiB + 4096, flags=fua)
        if caps["can_zero"]:
            h.zero(MiB, 6 * MiB, flags=fua)
        if caps["can_fast_zero"]:
            h.zero(MiB, 9 * MiB, flags=nbd.CMD_FLAG_FAST_ZERO)
        h.trim(128 * 1024, 12 * MiB)
        h.flush()
        h.shutdown()
        assert disk.stop() == 0
    finally:
        front.stop()
    export.stop()
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    qemu_io(chains.dest, f"read -P 0x71 {MiB + 4096} 65536", fmt="qcow2")


def test_a_fast_zero_only_the_destination_refuses_is_finished_the_slow_way(chains, serve, qemu_nbd,
                                                                            workdir):
    """The destination advertises fast zero but refuses every one (ENOTSUP): the source zeroes
    fast, the destination the slow way, and the client gets success with both sides zero."""
    export = qemu_nbd(chains.dest, "dst-export")
    front = NbdkitFilter(workdir, "dst-front", export.socket, "--filter=nozero", "zeromode=plugin",
                         "fastzeromode=slow")
    try:
        disk = serve(chains.source, front.uri)
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        assert h.can_fast_zero()
        h.zero(2 * MiB, 6 * MiB, flags=nbd.CMD_FLAG_FAST_ZERO)   # over the base's 0x16 MiB
        assert h.pread(2 * MiB, 6 * MiB) == bytes(2 * MiB)
        h.shutdown()
        assert disk.stop() == 0
    finally:
        front.stop()
    export.stop()
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    qemu_io(chains.dest, f"read -P 0 {6 * MiB} {2 * MiB}", fmt="qcow2")
