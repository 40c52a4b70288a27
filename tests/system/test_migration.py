"""The Mirrored-Snapshot workflow end to end (oVirt's Steps 3–5), modelled on qemu-iotests 156."""

import json
import os
import random
import shutil
import signal
import subprocess
import threading

import psutil
import pytest

from lib.commands import EXIT_ERROR, EXIT_USAGE, MIRRORFS, run
from lib.control import saved_state, status_of
from lib.fio import FioLoad
from lib.images import MiB, images_identical, make_base, make_overlay, qemu_io, sha256
from lib.processes import kill_mirrorfs
from lib.waits import wait_until
from lib.writers import Model, acknowledged, lost_blocks, writer
from mirrorfs.common import jsonlines


def chain_of(image):
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain", image).stdout)
    return [layer["filename"] for layer in info]


def test_seed_flow_start_copy_pivot(migration):
    disk = migration.start()
    assert migration.source_overlay.exists() and migration.dest_overlay.exists()
    # Until the switch, the destination overlay is backed by the *source* base (sub-cluster hazard).
    assert chain_of(migration.dest_overlay)[1] == str(migration.base)
    qemu_io(disk.uri, "write -P 0xa1 0 1M", "write -P 0xa2 5M 3M")
    migration.ctl("copy")
    assert migration.dest_base.exists()
    qemu_io(disk.uri, "write -P 0xa3 40M 2M")            # after the copy, before the switch
    out = migration.ctl("pivot").stdout
    assert "switched" in out
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "switched"
    assert status["datapath"]["reader"] == "destination"
    # What pivot reports is what the data path measured holding clients.
    stall_ms = status["switch"]["stall_ms"]
    assert status["datapath"]["switch_stalls_ms"] == [stall_ms]
    assert f"clients held {stall_ms:.1f} ms" in out
    # Reads now come from the destination chain and see everything.
    qemu_io(disk.uri, "read -P 0xa1 0 1M", "read -P 0xa2 5M 3M", "read -P 0xa3 40M 2M",
            f"read -P {0x10 + 3} {3 * MiB} {MiB}")
    assert disk.stop() == 0
    # The destination chain stands alone and holds what the source chain held at the switch.
    assert chain_of(migration.dest_overlay) == [str(migration.dest_overlay), str(migration.dest_base)]
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, detail


def test_writes_after_the_switch_go_to_the_destination_only(migration):
    disk = migration.start()
    migration.ctl("copy")
    migration.ctl("pivot")
    before = sha256(migration.source_overlay)
    qemu_io(disk.uri, "write -P 0xb7 7M 1M")
    assert disk.stop() == 0
    assert sha256(migration.source_overlay) == before    # released: nothing writes it
    qemu_io(migration.dest_overlay, "read -P 0xb7 7M 1M", fmt="qcow2")


def test_sub_cluster_writes_before_the_base_exists_survive_the_switch(migration):
    """512-byte and 4 KiB writes at odd offsets, while dst/base does not exist yet: a qcow2 overlay
    on a missing backing would zero the rest of each cluster and hide the base after the switch."""
    disk = migration.start()
    writes = []
    for i, (offset, length) in enumerate([(512, 512), (65536 + 4096, 4096), (3 * MiB + 1536, 512),
                                          (6 * MiB + 12288, 4096), (31 * MiB - 512, 512)]):
        writes.append(f"write -P {0xc0 + i} {offset} {length}")
    qemu_io(disk.uri, *writes)
    assert not migration.dest_base.exists()
    migration.ctl("copy")
    migration.ctl("pivot")
    assert disk.stop() == 0
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, detail
    # And the base's data around each small write is intact on the destination chain.
    qemu_io(migration.dest_overlay, "read -P 0x10 0 512", "read -P 0x10 1024 64512",
            f"read -P {0x13} {3 * MiB} 1536", fmt="qcow2")


def test_external_copy_by_a_manager(migration):
    """Step 4 as in the seed: the manager copies the base with cp -a while the disk is mirrored."""
    disk = migration.start()
    qemu_io(disk.uri, "write -P 0xd1 2M 2M")
    subprocess.run(["cp", "-a", migration.base, migration.dest_base], check=True)
    migration.ctl("pivot")
    qemu_io(disk.uri, "read -P 0xd1 2M 2M", "read -P 0x10 0 1M")
    assert disk.stop() == 0
    assert chain_of(migration.dest_overlay) == [str(migration.dest_overlay), str(migration.dest_base)]


def test_switch_is_refused_until_the_base_is_a_faithful_copy(migration):
    disk = migration.start()
    res = migration.ctl("pivot", check=False)
    assert res.returncode == EXIT_ERROR and "does not exist" in res.stderr, res.stderr
    # A copy that differs from the source base.
    shutil.copy(migration.base, migration.dest_base)
    qemu_io(migration.dest_base, "write -P 0xee 9M 4k", fmt="qcow2")
    res = migration.ctl("pivot", check=False)
    assert res.returncode == EXIT_ERROR, res.stderr
    assert res.stderr.count("\n") == 1 and "differs" in res.stderr
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "mirroring" and status["datapath"]["reader"] == "source"
    # --force switches anyway: the operator's call, recorded as an event before the switch.
    assert "switched" in migration.ctl("pivot", "--force").stdout
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "switched" and status["datapath"]["reader"] == "destination"
    events = events_until(disk.control, lambda e: e.get("phase") == "switched")
    kinds = [(e["event"], e.get("phase") or e.get("what")) for e in events]
    assert ("warning", "switching without verification (forced)") in kinds
    assert kinds.index(("warning", "switching without verification (forced)")) < kinds.index(
        ("phase", "switched"))
    qemu_io(disk.uri, "read -P 0xee 9M 4k")          # the operator's copy is the disk's base now
    assert disk.stop() == 0


def events_until(control, last):
    """The control socket's `events` stream from the start, read until an event for which
    `last(event)` is true."""
    found = []
    for reply in jsonlines.stream(control, {"cmd": "events", "since": 0}, timeout=60):
        found.append(reply["event"])
        if last(reply["event"]):
            return found
    raise AssertionError(f"the event stream ended: {found}")


def test_cancel_keeps_the_source_authoritative(migration):
    disk = migration.start()
    qemu_io(disk.uri, "write -P 0xf1 1M 1M")
    migration.ctl("copy")
    out = migration.ctl("cancel").stdout
    assert "cancelled" in out
    assert not migration.dest_overlay.exists() and not migration.dest_base.exists()
    qemu_io(disk.uri, "write -P 0xf2 3M 1M", "read -P 0xf1 1M 1M", "read -P 0x10 0 1M")
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "cancelled" and status["datapath"]["writers"] == ["source"]
    assert disk.stop() == 0
    run("qemu-img", "check", migration.source_overlay)
    qemu_io(migration.source_overlay, "read -P 0xf1 1M 1M", "read -P 0xf2 3M 1M", fmt="qcow2")


def test_switch_under_continuous_writes_loses_nothing(migration, workdir):
    """Random writes, each block read back and checked (verify_backlog) while the load runs,
    through the copy, the switch, and a thousand writes after it."""
    disk = migration.start()
    fio = FioLoad(workdir, disk.uri, "--rw=randwrite", "--bs=4k-64k", "--iodepth=8", "--size=24m",
                  "--verify=crc32c", "--verify_backlog=64", "--verify_fatal=1",
                  "--verify_state_save=0")
    try:
        def writes():
            return status_of(disk.control)["datapath"]["requests"].get("write", 0)

        wait_until(lambda: writes() >= 200 or not fio.running(), "fio writing")
        migration.ctl("copy")
        migration.ctl("pivot")
        assert fio.running(), fio.err.read_text()
        switched_at = writes()
        wait_until(lambda: writes() >= switched_at + 1000 or not fio.running(),
                   "writes after the switch")
        assert fio.running(), fio.err.read_text()
    finally:
        job = fio.stop()
    # No error, and fio read back and checked what it wrote, before and after the switch.
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0, job
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "switched"
    print("switch stall", status["switch"])
    assert disk.stop() == 0


@pytest.mark.parametrize("command,phase_setup,message", [
    ("pivot", "switched", "cannot pivot while switched"),
    ("cancel", "switched", "cannot cancel while switched"),
    ("copy", "switched", "cannot copy while switched"),
    ("pivot", "cancelled", "cannot pivot while cancelled"),
    ("copy", "copied", "already exists"),
])
def test_control_commands_in_the_wrong_phase_are_refused(migration, command, phase_setup, message):
    disk = migration.start()
    if phase_setup in ("switched", "copied"):
        migration.ctl("copy")
    if phase_setup == "switched":
        migration.ctl("pivot")
    if phase_setup == "cancelled":
        migration.ctl("cancel")
    files = {p: sha256(p) for p in (migration.source_overlay, migration.base)}
    res = migration.ctl(command, check=False)
    assert res.returncode == EXIT_ERROR, res.stderr
    assert res.stderr.startswith("mirrorfs: error:") and res.stderr.count("\n") == 1
    assert message in res.stderr
    assert {p: sha256(p) for p in files} == files
    assert disk.stop() == 0


def start_fails(migration, *extra):
    res = run(*MIRRORFS, "start", migration.base, "--dest-dir", migration.workdir / "dst",
              "--socket", migration.workdir / "x.sock", *extra, check=False)
    assert res.returncode == EXIT_USAGE, res.stderr
    assert res.stderr.startswith("mirrorfs: error:") and res.stderr.count("\n") == 1, res.stderr
    assert not (migration.workdir / "x.sock").exists()
    return res.stderr


def test_start_refuses_an_existing_overlay(migration):
    migration.source_overlay.write_bytes(b"somebody's data")
    err = start_fails(migration)
    assert "already exists" in err
    assert migration.source_overlay.read_bytes() == b"somebody's data"
    assert not migration.dest_overlay.exists()


def test_start_refuses_a_source_whose_backing_is_missing(migration, workdir):
    top = workdir / "src" / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", workdir / "src" / "gone.qcow2", "-F", "qcow2",
        "-u", top, "64M")
    res = run(*MIRRORFS, "start", top, "--dest-dir", workdir / "dst", "--socket", workdir / "x.sock",
              check=False)
    # README: a missing backing file is bad input (2); found when the image is opened, it exits 1.
    assert res.returncode == EXIT_ERROR and "gone.qcow2" in res.stderr and res.stderr.count("\n") == 1, \
        res.stderr
    assert not (workdir / "src" / "top-snap.qcow2").exists()


def test_start_refuses_a_missing_destination_directory(migration, workdir):
    res = run(*MIRRORFS, "start", migration.base, "--dest-dir", workdir / "nowhere",
              "--socket", workdir / "x.sock", check=False)
    assert res.returncode == EXIT_USAGE and "does not exist" in res.stderr, res.stderr
    assert not migration.source_overlay.exists()


def test_a_destination_base_that_uses_the_source_is_refused(migration):
    disk = migration.start()
    # A "copy" that is only an overlay on the source base: same content, but still on the source.
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", migration.base, "-F", "qcow2",
        migration.dest_base)
    res = migration.ctl("pivot", check=False)
    assert res.returncode == EXIT_ERROR and "as backing" in res.stderr, res.stderr
    assert disk.stop() == 0


def test_python_api_drives_the_workflow(migration):
    from mirrorfs.control.migration import Migration
    m = Migration(migration.base, migration.workdir / "dst", socket=migration.workdir / "api.sock")
    m.start()
    try:
        qemu_io(m.uris[0], "write -P 0x99 4M 1M")
        m.copy(rate=512 * MiB)
        stall = m.pivot()
        status = m.status()
        assert status["phase"] == "switched"
        assert status["datapath"]["switch_stalls_ms"] == [round(stall * 1000, 3)]
        events = [e for e in m.events(timeout=0) if e["event"] == "phase"]
        assert [e["phase"] for e in events] == ["mirroring", "copying-base", "mirroring",
                                                "switching", "switched"]
        assert events[-1]["stall_ms"] == round(stall * 1000, 3)
    finally:
        m.stop()
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, detail


def test_migration_resumes_after_kill_9(migration, workdir):
    """kill -9 of mirrorfs and nbdkit in the middle of writes; `start` with the same state
    directory resumes, re-copies what may differ, and the migration completes."""
    state = workdir / "state"
    disk = migration.start("--state-dir", state)
    model = Model()
    stop = threading.Event()
    threads = [threading.Thread(target=writer, args=(disk.uri, random.Random(i), i, model, stop)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: model.errors or model.writes >= 200, "200 writes acknowledged")
        assert not model.errors, model.errors
        assert status_of(disk.control)["phase"] == "mirroring"
    finally:
        model.killing.set()
        kill_mirrorfs(disk.proc.pid)
        stop.set()
        for t in threads:
            t.join()
    disk.proc.wait()
    assert not model.errors, model.errors
    assert saved_state(state)["dirty"], "writes were in flight, yet no region was marked"

    again = migration.start("--state-dir", state)        # the same command line resumes
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "mirroring"
    migration.ctl("copy")
    wait_until(lambda: status_of(again.control)["datapath"]["synchronized"], "resynchronized")
    migration.ctl("pivot")
    assert again.stop(signal.SIGTERM) == 0
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, detail
    lost = lost_blocks(migration.dest_overlay, acknowledged(model), workdir)
    assert not lost, f"{len(lost)} acknowledged writes lost, e.g. blocks {lost[:5]}"


def test_a_destination_base_in_another_format_is_refused(migration):
    """A raw dst/base with the very bytes of the qcow2 source base: qemu-img compare calls them
    identical, but the destination overlay's header names its backing as qcow2, so the switch is
    refused on the format alone, with the reason, and nothing changes."""
    disk = migration.start()
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", migration.base, migration.dest_base)
    assert images_identical(migration.base, migration.dest_base)[0]
    before = sha256(migration.dest_base)
    verify = jsonlines.call(disk.control, {"cmd": "verify"})
    assert verify["identical"] is False and "is raw" in verify["detail"], verify
    res = migration.ctl("pivot", check=False)
    assert res.returncode == EXIT_ERROR and res.stderr.count("\n") == 1, res.stderr
    assert "is raw, the source base is qcow2" in res.stderr, res.stderr
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "mirroring" and status["datapath"]["reader"] == "source"
    assert chain_of(migration.dest_overlay)[1] == str(migration.base)
    assert sha256(migration.dest_base) == before
    assert disk.stop() == 0


def test_a_source_base_with_its_own_backing_chain(workdir, serve):
    """src/base.qcow2 is itself an overlay on src/older.qcow2: the copy flattens the chain into one
    dst/base.qcow2 that needs nothing from the source, and the switch keeps every byte."""
    (workdir / "src").mkdir()
    (workdir / "dst").mkdir()
    older = make_base(workdir / "src" / "older.qcow2")           # 0x10, 0x13, ... every 3rd MiB
    base = make_overlay(workdir / "src" / "base.qcow2", older)
    qemu_io(base, "write -P 0x44 3M 512k", "write -P 0x45 40M 1M", fmt="qcow2")
    disk = serve(base, "--dest-dir", workdir / "dst", command="start")
    qemu_io(disk.uri, "write -P 0x46 3M 4k", "write -P 0x47 50M 64k")
    res = run(*MIRRORFS, "copy", "--control", disk.control)
    assert "base copied" in res.stdout
    dest_base = workdir / "dst" / "base.qcow2"
    assert chain_of(dest_base) == [str(dest_base)]                  # flattened: stands alone
    run(*MIRRORFS, "pivot", "--control", disk.control)
    qemu_io(disk.uri, "read -P 0x46 3M 4k", f"read -P 0x44 {3 * MiB + 4096} {512 * 1024 - 4096}",
            "read -P 0x10 0 1M", f"read -P {0x10 + 6} {6 * MiB} {MiB}", "read -P 0x45 40M 1M",
            "read -P 0x47 50M 64k")
    assert disk.stop() == 0
    dest_overlay, source_overlay = workdir / "dst" / "base-snap.qcow2", workdir / "src" / "base-snap.qcow2"
    assert chain_of(dest_overlay) == [str(dest_overlay), str(dest_base)]
    same, detail = images_identical(source_overlay, dest_overlay)
    assert same, detail


def test_cancel_during_the_base_copy(migration):
    """cancel while qemu-img convert is copying the base: the copy stops, its partial file and the
    destination overlay are removed, and the source chain keeps serving every write."""
    disk = migration.start()
    qemu_io(disk.uri, "write -P 0x61 2M 1M")
    res = migration.ctl("copy", "--background", "--rate", "2M")
    assert res.stdout.strip() == "copy started"
    copying = wait_until(lambda: (s := json.loads(migration.ctl("status", "--json").stdout))
                         ["copy"]["bytes_done"] > 0 and s, "some of the base copied")
    assert copying["phase"] == "copying-base" and copying["copy"]["running"], copying
    assert "cancelled" in migration.ctl("cancel").stdout
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "cancelled" and not status["copy"]["running"], status
    assert status["datapath"]["writers"] == ["source"]
    left = sorted(p.name for p in migration.dest_overlay.parent.iterdir())
    assert left == [], left                     # no overlay, no base, no .partial
    qemu_io(disk.uri, "write -P 0x62 5M 1M", "read -P 0x61 2M 1M")
    assert disk.stop() == 0
    run("qemu-img", "check", migration.source_overlay)
    qemu_io(migration.source_overlay, "read -P 0x61 2M 1M", "read -P 0x62 5M 1M",
            f"read -P {0x10 + 3} {3 * MiB} {MiB}", fmt="qcow2")


def test_the_commands_as_an_operator_types_them(migration, workdir):
    """--overlay-name, MIRRORFS_CONTROL instead of --control, copy --json (progress lines until
    done), status --watch --json (a line a second until stopped), and the refusal without either."""
    disk = migration.start("--overlay-name", "vm1-next.qcow2")
    source_overlay = migration.base.parent / "vm1-next.qcow2"
    dest_overlay = workdir / "dst" / "vm1-next.qcow2"
    assert source_overlay.exists() and dest_overlay.exists()
    assert not migration.source_overlay.exists() and not migration.dest_overlay.exists()
    qemu_io(disk.uri, "write -P 0x81 1M 64k")

    env = dict(os.environ, MIRRORFS_CONTROL=str(disk.control))
    bare = {k: v for k, v in os.environ.items() if k != "MIRRORFS_CONTROL"}
    res = subprocess.run([*MIRRORFS, "status"], env=bare, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "MIRRORFS_CONTROL" in res.stderr, res.stderr

    res = subprocess.run([*MIRRORFS, "copy", "--json", "--rate", "64M"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    progress = [json.loads(line) for line in res.stdout.splitlines()]
    assert progress and not progress[-1]["running"] and progress[-1]["error"] is None, progress
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] > 0
    copied = [p["bytes_done"] for p in progress]
    assert copied == sorted(copied)

    watch = subprocess.Popen([*MIRRORFS, "status", "--watch", "--json"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(120, watch.kill)       # a hang fails below instead of blocking
    timer.start()
    try:
        first, second = json.loads(watch.stdout.readline()), json.loads(watch.stdout.readline())
    finally:
        timer.cancel()
        watch.terminate()
        watch.communicate(timeout=30)
    assert first["phase"] == second["phase"] == "mirroring"
    assert second["phase_seconds"] > first["phase_seconds"]
    assert first["destination"]["overlay"] == str(dest_overlay)

    res = subprocess.run([*MIRRORFS, "pivot"], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "switched" in res.stdout, res.stderr
    assert disk.stop() == 0
    assert chain_of(dest_overlay) == [str(dest_overlay), str(migration.dest_base)]
    same, detail = images_identical(source_overlay, dest_overlay)
    assert same, detail


def test_start_again_after_a_cancel_is_refused(migration, workdir):
    state = workdir / "state"
    disk = migration.start("--state-dir", state)
    migration.ctl("cancel")
    assert disk.stop() == 0
    assert saved_state(state)["phase"] == "cancelled"
    res = run(*MIRRORFS, "start", migration.base, "--dest-dir", workdir / "dst", "--state-dir", state,
              "--socket", workdir / "x.sock", check=False)
    assert res.returncode == EXIT_USAGE and res.stderr.count("\n") == 1, res.stderr
    assert "was cancelled" in res.stderr and str(migration.source_overlay) in res.stderr
    assert not migration.dest_overlay.exists()


def test_start_again_after_the_switch_serves_the_destination(migration, workdir):
    state = workdir / "state"
    disk = migration.start("--state-dir", state)
    migration.ctl("copy")
    migration.ctl("pivot")
    qemu_io(disk.uri, "write -P 0x82 6M 1M")
    assert disk.stop() == 0
    source = sha256(migration.source_overlay)
    assert saved_state(state)["phase"] == "switched"

    again = migration.start("--state-dir", state)
    status = json.loads(migration.ctl("status", "--json").stdout)
    # (The data path then holds one side, which its status calls "source": it is the destination
    # chain, as the bytes below show.)
    assert status["phase"] == "switched" and len(status["datapath"]["writers"]) == 1, status
    qemu_io(again.uri, "read -P 0x82 6M 1M", "write -P 0x83 8M 1M")
    assert again.stop() == 0
    assert sha256(migration.source_overlay) == source          # released for good
    qemu_io(migration.dest_overlay, "read -P 0x82 6M 1M", "read -P 0x83 8M 1M",
            f"read -P {0x10 + 9} {9 * MiB} {MiB}", fmt="qcow2")


def test_kill_9_between_the_rebase_and_the_switch(migration, workdir):
    """GUARANTEES.md: a crash of `start`'s pivot after the destination overlay was rebased onto the
    verified copy and before the data path switched leaves a mirror that serves again, and `pivot`
    works again. The data path is SIGSTOPped so the pivot stops exactly there: the rebase (in the
    storage daemon) completes, the switch (in nbdkit) cannot start."""
    state = workdir / "state"
    disk = migration.start("--state-dir", state)
    qemu_io(disk.uri, "write -P 0x91 1M 1M")
    migration.ctl("copy")
    [nbdkit] = [p for p in psutil.Process(disk.proc.pid).children() if p.name() == "nbdkit"]
    nbdkit.suspend()
    pivot = subprocess.Popen([*MIRRORFS, "pivot", "--control", disk.control],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: chain_of(migration.dest_overlay)[1] == str(migration.dest_base),
                   "the destination overlay rebased onto the copy")
        assert pivot.poll() is None                 # waiting for the data path's switch
        assert saved_state(state)["phase"] == "synchronized"
    finally:
        kill_mirrorfs(disk.proc.pid)
    disk.proc.wait()
    _, err = pivot.communicate(timeout=60)
    assert pivot.returncode == EXIT_ERROR, err

    again = migration.start("--state-dir", state)
    status = json.loads(migration.ctl("status", "--json").stdout)
    assert status["phase"] == "mirroring" and status["datapath"]["writers"] == ["source", "destination"]
    qemu_io(again.uri, "write -P 0x92 3M 1M", "read -P 0x91 1M 1M")
    assert "switched" in migration.ctl("pivot").stdout
    qemu_io(again.uri, "read -P 0x92 3M 1M", f"read -P {0x10 + 6} {6 * MiB} {MiB}")
    assert again.stop() == 0
    assert chain_of(migration.dest_overlay) == [str(migration.dest_overlay), str(migration.dest_base)]
    same, detail = images_identical(migration.source_overlay, migration.dest_overlay)
    assert same, detail
