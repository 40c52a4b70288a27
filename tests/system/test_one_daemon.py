"""`--one-daemon`: both image sides exported by one qemu-storage-daemon (issue #21: one process fewer
in every mirrored write). The same guarantees as with a daemon per side: every write on both sides,
the switch, resume after kill -9; and what the shared process changes: a retired side's image is
closed (its lock released) while the other side keeps serving, and a crash takes both sides."""

import json
import random
import signal
import threading

import nbd
import psutil

from lib.commands import EXIT_ERROR, EXIT_USAGE, MIRRORFS, run
from lib.control import status_of
from lib.fio import FioLoad
from lib.images import MiB, images_identical, qemu_io
from lib.processes import still_running
from lib.waits import wait_until
from lib.writers import Model, lost_blocks, writer


def storage_daemons(disk):
    return [p for p in psutil.Process(disk.proc.pid).children() if p.name() == "qemu-storage-daemon"]


def open_images(daemon):
    return {f.path for f in daemon.open_files()}


def test_one_daemon_mirrors_switches_and_lets_the_source_go(migration, workdir):
    """A migration with --one-daemon under fio with verification: one daemon holds both overlays,
    the sides are identical at the switch, and after it the source overlay is closed (anyone may
    lock it again) while the same daemon serves the destination."""
    disk = migration.start("--one-daemon")
    (daemon,) = storage_daemons(disk)
    held = open_images(daemon)
    assert {str(migration.source_overlay), str(migration.dest_overlay)} <= held, held
    fio = FioLoad(workdir, disk.uri, "--rw=randwrite", "--bs=4k-64k", "--iodepth=8", "--size=24m",
                  "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
                  "--verify_state_save=0")
    try:
        wait_until(lambda: status_of(disk.control)["datapath"]["requests"].get("write", 0) >= 300
                   or not fio.running(), "fio writing")
        migration.ctl("copy")
        assert fio.running(), fio.err.read_text()
    finally:
        job = fio.stop()
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job
    assert "switched" in migration.ctl("pivot").stdout
    assert storage_daemons(disk) == [daemon]
    wait_until(lambda: str(migration.source_overlay) not in open_images(daemon), "source closed")
    # Closed, so not locked: qemu-img opens it for writing (no -U), and it equals the destination.
    run("qemu-img", "check", migration.source_overlay)
    # (-U: the destination is still open in the daemon.)
    res = run("qemu-img", "compare", "-U", migration.source_overlay, migration.dest_overlay, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    # The destination goes on alone, through the same process.
    qemu_io(disk.uri, "write -P 0x5c 3M 70000", "read -P 0x5c 3M 70000")
    assert disk.stop() == 0
    qemu_io(migration.dest_overlay, "read -P 0x5c 3M 70000", fmt="qcow2")


def test_kill_9_of_the_shared_daemon_stops_the_disk_and_the_same_command_resumes(
        chains, serve, workdir):
    """The shared daemon dies with writes in flight: mirrorfs stops everything it started (both
    sides were in that process) with an error; the same command line resumes from the state, the
    sides end identical, and every write acknowledged before a completed flush is there.

    (Writes acknowledged after the last flush may be lost with the daemon that held them: NBD
    makes a write durable at a flush or with FUA, and qcow2 keeps new clusters' metadata in the
    daemon's memory until then; with a daemon per side the source's crash loses them the same way,
    and the resync copies the source's loss to the destination.)"""
    state = workdir / "state"
    args = (chains.source, chains.dest, "--one-daemon", "--state-dir", state)
    disk = serve(*args)
    (daemon,) = storage_daemons(disk)
    tree = psutil.Process(disk.proc.pid).children(recursive=True)
    model = Model()
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(disk.uri, random.Random(i), i, model, stop))
               for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: model.errors or model.writes >= 300, "300 writes acknowledged")
        with model.lock:
            durable = dict(model.acked)     # acknowledged before the flush began: it covers them
        h = nbd.NBD()
        h.connect_uri(disk.uri)
        h.flush()                           # multi-conn: covers every connection's writes
        h.shutdown()
        wait_until(lambda: model.errors or model.writes >= len(durable) + 100, "writes after it")
        assert not model.errors, model.errors
        model.killing.set()         # from now on a write may fail: the disk is going away
        daemon.kill()
        assert disk.proc.wait(60) == EXIT_ERROR
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not still_running(tree, timeout=30), "a child outlived mirrorfs"
    assert "qemu-storage-daemon" in disk.stderr and "exited unexpectedly" in disk.stderr, disk.stderr

    again = serve(*args, name="again")
    wait_until(lambda: status_of(again.control)["datapath"]["synchronized"], "resynchronized")
    assert again.stop(signal.SIGTERM) == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
    # The blocks no writer touched after the flush hold what they held at it.
    untouched = {b: {v} for b, v in durable.items()
                 if model.acked.get(b) == v and b not in model.maybe}
    assert len(untouched) > 100, "the check would check little"
    lost = lost_blocks(chains.dest, untouched, workdir)
    assert not lost, f"{len(lost)} flushed writes lost, e.g. blocks {lost[:5]}"


def test_one_daemon_is_refused_where_it_cannot_help_or_must_not(chains, workdir):
    for extra, message in (
            (["--switch-first", "--state-dir", workdir / "state"],
             "--one-daemon cannot be used with --switch-first"),
            (["--readonly"], "--one-daemon shares a daemon between two sides")):
        dest = [] if "--readonly" in extra else [chains.dest]
        res = run(*MIRRORFS, "serve", chains.source, *dest, "--one-daemon", *extra,
                  "--socket", workdir / "x.sock", check=False)
        assert res.returncode == EXIT_USAGE, res.stderr
        assert message in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert not (workdir / "state").exists()


def test_status_says_one_daemon_serves_both_sides(chains, serve):
    disk = serve(chains.source, chains.dest, "--one-daemon")
    (daemon,) = storage_daemons(disk)
    status = json.loads(run(*MIRRORFS, "status", "--json", "--control", disk.control).stdout)
    assert status["storage_daemons"] == {"source": daemon.pid, "destination": daemon.pid}
    text = run(*MIRRORFS, "status", "--control", disk.control).stdout
    assert "one storage daemon for both sides" in text, text
    qemu_io(disk.uri, f"write -P 0x77 {MiB + 512} 4096")
    assert disk.stop() == 0
    same, detail = images_identical(chains.source, chains.dest)
    assert same, detail
