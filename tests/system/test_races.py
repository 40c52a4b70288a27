"""Races the range locks (mirrorfs/inflight.py) exist for, made to happen every run instead of
hoping a stress test hits them.

- The copier against a client: a copy chunk reads old data from the source and writes it to the
  destination; a client change to the same bytes in between must not be overwritten by the
  chunk's older data. The destination's writes are delayed (nbdkit's delay filter), so the chunk
  is certainly in progress when the client's zero (not delayed) arrives.
- Changes that share a qcow2 cluster without sharing bytes: Debian 12's qemu-storage-daemon (QEMU
  7.2) loses track of a cluster's refcount when a sub-cluster write and a sub-cluster zero that
  may unmap run at once on a cluster that reads as zeros but is still allocated; mirrorfs holds
  whole clusters so they never do.
"""

import nbd

from lib.commands import run
from lib.control import status_of
from lib.images import Chains, MiB, images_identical, make_full_pair, qemu_io
from lib.nbdservers import NbdkitFilter
from lib.waits import wait_until

CLUSTER = 64 * 1024


def write_in_flight(log, offset, count=None):
    """Has a write at `offset` (of `count` bytes; any, if None) entered nbdkit (its log filter's
    file) and not yet returned?"""
    text = log.read_text() if log.exists() else ""
    for line in text.splitlines():
        if " Write id=" in line and (f"offset={offset:#x} count={count:#x} " if count is not None
                                     else f"offset={offset:#x} count=") in line:
            conn, rid = line.split("connection=")[1].split()[0], line.split(" id=")[1].split()[0]
            return f"connection={conn} ...Write id={rid} return" not in text
    return False


def test_a_client_change_during_a_copy_chunk_is_not_overwritten(workdir, serve, qemu_nbd):
    """The first copy chunk (from offset 0: 256 KiB, since the copier starts held for the host
    budget and a held copy takes its smallest chunk) writes the source's first bytes to the
    destination; that write is held 3 s. Meanwhile a client zeroes 64 KiB inside it. The copier
    holds the chunk's range lock until its writes are done, so the zero waits and lands after
    them; without the lock the zero goes first and the chunk's older data covers it on the
    destination alone."""
    src, dst = make_full_pair(workdir, 8 * MiB)         # 0x30 in [0, 1 MiB), 0x31 in [2, 3 MiB)...
    export = qemu_nbd(dst, "dst-export")
    log = workdir / "dst-front.log"
    front = NbdkitFilter(workdir, "dst-front", export.socket, "--filter=log", "--filter=delay",
                         f"logfile={log}", "delay-write=3")
    try:
        disk = serve("--copy", "full", "--io-timeout", "0", src, front.uri)
        # The chunk's first data write has reached the destination's front and is being held.
        wait_until(lambda: write_in_flight(log, 0), "the copy chunk's write in flight")
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        assert write_in_flight(log, 0)
        h.zero(CLUSTER, 4096)                           # a client change inside the chunk
        h.shutdown()
        wait_until(lambda: status_of(disk.control)["phase"] == "synchronized", "synchronized")
        assert disk.stop() == 0
    finally:
        front.stop()
    export.stop()
    qemu_io(src, f"read -P 0 4096 {CLUSTER}", "read -P 0x30 0 4096", fmt="qcow2")
    same, detail = images_identical(src, dst)
    assert same, f"the copier wrote older data over a client's change: {detail}"


def wait_all(h, cookies):
    for c in cookies:
        while not h.aio_command_completed(c):
            h.poll(-1)


def test_changes_sharing_a_qcow2_cluster_never_run_at_once(workdir, serve):
    """Per round, 16 fresh clusters: written whole, zeroed keeping their allocation (NO_HOLE), then
    at once a 4 KiB write at each cluster's start and a 4 KiB zero that may unmap in its middle.
    The bytes never overlap, so only locks widened to whole clusters keep them apart; QEMU 7.2
    racing them loses the acknowledged write and leaves data clusters with refcount 0 (`qemu-img
    check`), on every run against a bare export. So the clusters are read back after each round,
    and both images checked at the end."""
    chains = Chains(workdir)
    disk = serve(chains.source, chains.dest)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    first = 32 * MiB // CLUSTER                         # make_base leaves the second half empty
    expect = bytearray(CLUSTER)
    expect[:4096] = b"\x66" * 4096
    for r in range(20):
        clusters = range(first + r * 16, first + (r + 1) * 16)
        wait_all(h, [h.aio_pwrite(b"\x55" * CLUSTER, c * CLUSTER) for c in clusters])
        wait_all(h, [h.aio_zero(CLUSTER, c * CLUSTER, flags=nbd.CMD_FLAG_NO_HOLE) for c in clusters])
        racing = []
        for c in clusters:
            racing.append(h.aio_pwrite(b"\x66" * 4096, c * CLUSTER))
            racing.append(h.aio_zero(4096, c * CLUSTER + CLUSTER // 2))
        wait_all(h, racing)
        lost = [c for c in clusters if h.pread(CLUSTER, c * CLUSTER) != expect]
        assert not lost, f"round {r}: clusters {lost} do not read back what was acknowledged"
    h.shutdown()
    assert disk.stop() == 0
    for image in (chains.source, chains.dest):
        res = run("qemu-img", "check", image, check=False)
        assert res.returncode == 0, f"{image}: {res.stdout}{res.stderr}"
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
