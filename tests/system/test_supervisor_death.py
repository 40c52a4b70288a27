"""`kill -9` of the supervisor: every child goes with it, even while a client (a VM) stays connected
and idle, and the same command line starts again at once. Nothing a client was told is lost, and
no request is answered with an error: a reconnecting client sends it again to the restart."""

import os
import subprocess

import nbd
import pytest

from lib.control import status
from lib.images import MiB, check_images, qemu_io
from lib.processes import GONE_TIMEOUT, children, still_running
from lib.reconnecting import RECONNECT_DELAY
from lib.waits import wait_until


@pytest.fixture(autouse=True)
def rundir_in_workdir(workdir, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", os.fspath(workdir))


@pytest.mark.parametrize("flush", [True, False], ids=["flushed", "unflushed"])
def test_sigkill_of_mirrorfs_with_an_idle_client_leaves_no_orphan(flush, chains, serve):
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    # Acknowledged writes (one with FUA, one without): both sides had answered before the reply.
    h.pwrite(b"\x5e" * MiB, 2 * MiB, nbd.CMD_FLAG_FUA)
    h.pwrite(b"\x5f" * 65536, 5 * MiB)
    if flush:
        h.flush()
    # The client now stays connected and sends nothing, as an idle VM does.
    disk.proc.kill()
    disk.proc.wait(GONE_TIMEOUT)
    left = still_running(kids.values(), timeout=GONE_TIMEOUT)
    assert not left, f"orphans: {[' '.join(p.cmdline()) for p in left]}"
    with pytest.raises(nbd.Error):
        h.pread(4096, 0)                    # the server is gone, not waiting for us
    del h

    again = serve(chains.source, chains.dest)          # the same command line
    qemu_io(again.uri, f"read -P 0x5e {2 * MiB} {MiB}", f"read -P 0x5f {5 * MiB} 64k")
    assert again.stop() == 0, again.stderr
    check_images(chains)
    qemu_io(chains.dest, f"read -P 0x5e {2 * MiB} {MiB}", f"read -P 0x5f {5 * MiB} 64k", fmt="qcow2")


def test_sigkill_of_start_with_an_idle_client_leaves_no_orphan(migration):
    disk = migration.start()
    kids = children(disk)
    h = nbd.NBD()
    h.connect_uri(disk.uri)
    h.pwrite(b"\x6e" * 65536, 3 * MiB)
    disk.proc.kill()
    disk.proc.wait(GONE_TIMEOUT)
    left = still_running(kids.values(), timeout=GONE_TIMEOUT)
    assert not left, f"orphans: {[' '.join(p.cmdline()) for p in left]}"
    del h
    for overlay in (migration.source_overlay, migration.dest_overlay):
        qemu_io(overlay, f"read -P 0x6e {3 * MiB} 64k", fmt="qcow2")


def test_no_error_for_writes_in_flight_when_the_supervisor_is_killed(chains, serve):
    """The supervisor is killed while writes wait on a slow destination (SIGSTOPped here). The
    kernel tells both storage daemons to stop at that moment, and they drop their connections: the
    destination's without answering the writes (here it is killed outright, which is sure to drop
    them unanswered; its SIGTERM may answer first). Those failures must reach no one: nbdkit goes
    with its supervisor (SIGKILL from the kernel) before a storage daemon can close anything, and
    the client, QEMU's NBD client with reconnect-delay, sends the writes again to the restarted
    server. (They used to get EINVAL: nbdkit lived on for the data path's quiesce and answered the
    destination's ENOTCONN, which the guest of
    test_guest.py::test_guest_through_the_life_of_its_disk saw as an I/O error. Eight writes, not
    one: the old quiesce ended the process as the last one finished, sometimes before its answer.)"""
    disk = serve(chains.source, chains.dest)
    kids = children(disk)
    kids["dst"].suspend()
    offsets = [(4 + i) * MiB for i in range(8)]
    client = subprocess.Popen(
        ["qemu-io", "--image-opts", *[a for off in offsets for a in ("-c", f"aio_write -P 0x7a {off} 64k")],
         "-c", "aio_flush",
         f"driver=nbd,server.type=unix,server.path={disk.socket},reconnect-delay={RECONNECT_DELAY}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: status(disk.control)["datapath"]["in_flight"] >= len(offsets),
                   "the writes in flight")
        disk.proc.kill()
        disk.proc.wait(GONE_TIMEOUT)
        kids["dst"].kill()              # its connections drop, the writes unanswered
        left = still_running(kids.values(), timeout=GONE_TIMEOUT)
        assert not left, f"orphans: {[' '.join(p.cmdline()) for p in left]}"
        again = serve(chains.source, chains.dest)          # the same command line
        out, _ = client.communicate(timeout=RECONNECT_DELAY + 30)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert "failed" not in out, out
    assert [f"wrote 65536/65536 bytes at offset {off}" in out for off in offsets] == [True] * 8, out
    qemu_io(again.uri, *[f"read -P 0x7a {off} 64k" for off in offsets])
    assert again.stop() == 0, again.stderr
    check_images(chains)
