"""The write-intent rule (docs/GUARANTEES.md), byte for byte: a write that reached the source and not
the destination when mirrorfs was killed is copied to the destination by the restart.

Nothing here is left to timing. The destination is held on purpose: nbdkit's pause filter in front
of its export for `serve`, SIGSTOP of its storage daemon for `start`. A client's write then reaches
the source (read back through the disk) and waits for the destination; mirrorfs and its nbdkit get
kill -9, and so does whatever holds the write, so it never reaches the destination. Restarted on
the same state directory, with the destination answering again, mirrorfs must find the region in
the saved intent, copy it, and leave both sides identical (qemu-img compare).

Saving the intent after the write instead of before it (disk.py, Disk._change) makes every one of
these fail: the kill lands before anything was saved, the restart sees nothing to copy, and the
destination lacks the write.
"""

import nbd
import psutil
import pytest

from lib.commands import run
from lib.control import saved_state, status_of
from lib.images import MiB, images_identical, make_full_pair
from lib.nbdservers import PausableFront
from lib.processes import kill_mirrorfs
from lib.waits import wait_until

SIZE = 16 * MiB
OFFSET = 5 * MiB + 4096         # inside the region [5 MiB, 6 MiB): --region 1M
DATA = b"\xe1" * 65536


def synchronized_and_saved(control, state_dir):
    """The mirror is synchronized, and the saved state says so: no region marked and, in full mode,
    the first pass's cursor saved at the end. From here only the intent of a new write can make a
    restart copy anything."""
    def check():
        s = status_of(control)
        saved = saved_state(state_dir)
        done = (s["phase"] in ("mirroring", "synchronized") and s["datapath"]["synchronized"]
                and saved["phase"] == "synchronized" and saved["dirty"] == []
                and (saved["copy"] == "none" or saved["cursor"] == saved["size"]))
        return s if done else None
    return check


def write_held_at_the_destination(uri, control):
    """Start a write through the disk and wait until the source has it (reads come from the
    source). Returns the client handle with the write still unanswered."""
    h = nbd.NBD()
    h.connect_uri(uri)
    cookie = h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(DATA)), OFFSET)
    reader = nbd.NBD()
    reader.connect_uri(uri)
    wait_until(lambda: reader.pread(len(DATA), OFFSET) == DATA, "the write on the source")
    reader.shutdown()
    h.poll(0)
    assert not h.aio_command_completed(cookie), "the write was answered: the destination was not held"
    # Nothing failed or timed out: the kill below lands on a write in flight, not on an error
    # path (a destination error marks the region too, which would hide a broken rule).
    dest = status_of(control)["datapath"]["sides"]["destination"]
    assert (dest["errors"], dest["timeouts"], dest["degraded"]) == (0, 0, 0), dest
    return h


def not_on(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(len(DATA), OFFSET) != DATA
    finally:
        h.shutdown()


@pytest.mark.parametrize("copy", ["full", "none"])
def test_a_write_only_the_source_has_when_killed_is_copied_by_the_restart(workdir, serve, qemu_nbd,
                                                                           copy):
    src, dst = make_full_pair(workdir, SIZE)
    if copy == "none":
        run("cp", src, dst)                             # --copy none: the sides start equal
    export = qemu_nbd(dst, "dst-export")
    front = PausableFront(workdir, "dst-front", export.socket)
    state = workdir / "state"
    args = ["--copy", copy, "--state-dir", state, "--region", "1M", "--io-timeout", "0",
            src, front.uri]
    try:
        disk = serve(*args)
        wait_until(synchronized_and_saved(disk.control, state), "synchronized with nothing marked")
        front.pause()
        h = write_held_at_the_destination(disk.uri, disk.control)
        assert not_on(export.uri)
        kill_mirrorfs(disk.proc.pid)
        disk.proc.wait()
        del h                                           # its connection died with nbdkit
        front.kill()                                    # the held write never reaches the export
        assert not_on(export.uri)

        front = PausableFront(workdir, "dst-front", export.socket)   # the same URI, answering
        again = serve(*args)
        assert status_of(again.control)["mirror"]["resumed"] is True
        wait_until(lambda: status_of(again.control)["datapath"]["synchronized"], "synchronized")
        assert again.stop() == 0
    finally:
        front.stop()
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, f"the destination lacks a write the source has: {detail}"
    assert run("qemu-io", "-f", "qcow2", "-c", f"read -P 0xe1 {OFFSET} {len(DATA)}",
               src).stdout.count("read 65536/65536") == 1


def test_migration_write_only_the_source_overlay_has_when_killed_is_copied(migration, workdir):
    """`mirrorfs start --state-dir`: the same data path, the destination overlay in a storage
    daemon mirrorfs owns; held with SIGSTOP, then killed with the rest."""
    state = workdir / "state"
    disk = migration.start("--state-dir", state, "--io-timeout", "0")
    wait_until(synchronized_and_saved(disk.control, state), "synchronized with nothing marked")
    [dst_daemon] = [p for p in psutil.Process(disk.proc.pid).children()
                    if p.name() == "qemu-storage-daemon" and "/dst.pid" in " ".join(p.cmdline())]
    dst_daemon.suspend()                                # SIGSTOP: the write waits in its socket
    try:
        h = write_held_at_the_destination(disk.uri, disk.control)
        kill_mirrorfs(disk.proc.pid, also=[dst_daemon])  # it never reads the write
    finally:
        if dst_daemon.is_running():
            dst_daemon.kill()
    disk.proc.wait()
    del h

    again = migration.start("--state-dir", state, "--io-timeout", "0")
    s = status_of(again.control)
    assert s["phase"] == "mirroring" and s["datapath"]["writers"] == ["source", "destination"]
    wait_until(lambda: status_of(again.control)["datapath"]["synchronized"], "synchronized")
    assert again.stop() == 0
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, f"the destination overlay lacks a write the source has: {detail}"
    qemu_io_out = run("qemu-io", "-f", "qcow2", "-c", f"read -P 0xe1 {OFFSET} {len(DATA)}",
                      migration.dest_overlay).stdout
    assert "read 65536/65536" in qemu_io_out
