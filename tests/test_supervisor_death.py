"""`kill -9` of the supervisor: every child goes with it, even while a client (a VM) stays connected
and idle, and the same command line starts again at once. Nothing a client was told is lost."""

import os

import nbd
import pytest

from lib.images import MiB, check_images, qemu_io
from lib.processes import GONE_TIMEOUT, children, still_running


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
