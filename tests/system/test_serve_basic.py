"""The served disk, driven by QEMU's own clients: reads from the source, writes on both sides."""

import dataclasses
import os
from pathlib import Path

import nbd
import psutil
import pytest

from lib.commands import run
from lib.images import MiB, images_identical, qemu_io, sha256
from mirrorfs.sides import images
from mirrorfs.daemons import storage


def test_writes_reach_both_sides_and_reads_come_from_source(chains, serve):
    base = sha256(chains.base)
    disk = serve(chains.source, chains.dest)
    qemu_io(disk.uri, "write -P 0xaa 512 7000", "write -P 0xbb 3M 1M", "write -z 10M 2M",
            "discard 0 64k",
            "read -P 0xbb 3M 1M")
    # The base's data shows through where nothing was written.
    qemu_io(disk.uri, f"read -P {0x10 + 6} {6 * MiB} {MiB}")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    # The base was not touched: both overlays hold the writes.
    assert sha256(chains.base) == base
    qemu_io(chains.dest, "read -P 0xbb 3M 1M", "read -P 0 10M 2M", fmt="qcow2")


def test_qemu_img_convert_through_the_disk_copies_the_source(chains, serve, workdir):
    disk = serve(chains.source, chains.dest)
    qemu_io(disk.uri, "write -P 0x42 20M 64k")
    out = workdir / "copy.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", disk.uri, out)
    disk.stop()
    same, detail = images_identical(chains.source, out)
    assert same, detail


def test_extents_come_from_the_source(chains, serve):
    disk = serve(chains.source, chains.dest)
    lines = run("nbdinfo", "--map", disk.uri).stdout.splitlines()
    disk.stop()
    extents = [(int(a), int(b), int(c)) for a, b, c, *_ in (l.split() for l in lines)]
    # make_base writes 1 MiB at every 3rd MiB of the first half and leaves the second half unallocated.
    assert extents[0] == (0, MiB, 0)
    assert extents[1] == (MiB, 2 * MiB, 3)
    assert extents[-1][2] == 3 and extents[-1][0] + extents[-1][1] == 64 * MiB


def test_capabilities_come_from_the_backends(chains, serve):
    disk = serve(chains.source, chains.dest)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    try:
        assert h.get_size() == 64 * MiB
        assert h.can_multi_conn()       # both qemu-storage-daemon exports allow it
        assert h.can_fua() and h.can_trim() and h.can_zero() and h.can_fast_zero() and h.can_flush()
        assert not h.is_read_only()
        assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
    finally:
        h.shutdown()
    disk.stop()


def image_fd_flags(disk, image):
    """{qemu-storage-daemon pid: the open flags of its fds on `image`} (from /proc/PID/fdinfo)."""
    found = {}
    for p in psutil.Process(disk.proc.pid).children(recursive=True):
        if p.name() != "qemu-storage-daemon":
            continue
        for f in p.open_files():
            if f.path == str(image):
                fdinfo = Path(f"/proc/{p.pid}/fdinfo/{f.fd}").read_text()
                found.setdefault(p.pid, []).append(int(fdinfo.split("flags:")[1].split()[0], 8))
    return found


@pytest.mark.parametrize("cache", ["auto", "none", "writeback"])
def test_cache_mode_reaches_the_storage_daemons(chains, serve, cache):
    """--cache none opens every image file of both chains with O_DIRECT; writeback never; auto is
    none on a file system that accepts O_DIRECT (this one does: the test checks that first)."""
    disk = serve(chains.source, chains.dest, "--cache", cache)
    qemu_io(disk.uri, "write -P 0x5c 1000 70000", "read -P 0x5c 1000 70000")
    direct = cache == "none" or (cache == "auto" and storage.direct_io_supported(chains.source))
    for image in (chains.source, chains.dest, chains.base):
        flags = image_fd_flags(disk, image)
        assert flags, f"no storage daemon has {image} open"
        for pid, fds in flags.items():
            assert all(bool(f & os.O_DIRECT) == direct for f in fds), (image, pid, [oct(f) for f in fds])
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail


def test_auto_cache_falls_back_where_o_direct_is_refused(chains):
    """auto picks writeback when any file of the chain refuses O_DIRECT (tmpfs before Linux 6.6;
    here a procfs file, which refuses it on every kernel)."""
    assert not storage.direct_io_supported("/proc/version")
    assert storage.direct_io_supported(chains.source)
    image = images.info(chains.source)
    assert storage.cache_mode(image) == "none"
    refused = dataclasses.replace(image, chain=(*image.chain, Path("/proc/version")))
    assert storage.cache_mode(refused) == "writeback"
    assert storage.cache_mode(refused, "none") == "none"        # asked for explicitly: kept
