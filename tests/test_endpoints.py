"""Endpoints other than image files, failures of one side, and requests the server must refuse."""

import errno

import nbd
import pytest

from conftest import MiB, NbdkitFilter, images_identical, qemu_io, run, sha256


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
    assert "0x7a" not in run("qemu-img", "map", "--output=json", chains.dest).stdout
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


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
