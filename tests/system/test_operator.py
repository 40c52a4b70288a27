"""What an operator sees: status in text and JSON for both controllers, the event stream, copy
progress, and the commands' behaviour at the edges of a terminal (a pipe closed early, a follower
that goes away). Each test here was a bug a new user hit (issue #10)."""

import json
import socket
import subprocess

import pytest

from lib.commands import EXIT_ERROR, MIRRORFS, run
from lib.control import status_of
from lib.images import MiB, make_full_pair, qemu_io
from lib.served import MigrationSetup
from lib.waits import wait_until


def test_status_text_for_serve_and_start(workdir, serve, migration):
    """`mirrorfs status` (text) once crashed with TypeError against any serve control socket."""
    src, dst = make_full_pair(workdir, 16 * MiB)
    disk = serve("--copy", "full", src, dst, name="full")
    wait_until(lambda: status_of(disk.control)["phase"] == "synchronized", "synchronized")
    text = run(*MIRRORFS, "status", "--control", disk.control).stdout
    assert text.startswith("phase:        synchronized")
    assert f"source:       {src}" in text and f"destination:  {dst}" in text
    assert "mirror:       copy full" in text

    disk2 = migration.start()
    text = run(*MIRRORFS, "status", "--control", disk2.control).stdout
    assert text.startswith("phase:        mirroring")
    assert f"source:       {migration.source_overlay} on {migration.base}" in text
    assert "(base not copied yet)" in text


def test_status_piped_into_head_leaves_no_traceback(workdir, serve, chains):
    disk = serve(chains.source, chains.dest)
    res = subprocess.run(f"{' '.join(MIRRORFS)} status --control {disk.control} | head -1",
                         shell=True, capture_output=True, text=True)
    assert res.stdout.startswith("phase:") and res.stdout.count("\n") == 1
    assert res.stderr == ""


def test_the_event_stream_carries_the_data_paths_events_under_start(migration):
    """Under `start`, the data path's events (synchronized, errors) went to another log than the
    one the control socket streams."""
    disk = migration.start()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(disk.control))
        s.sendall(b'{"cmd": "events", "since": 0}\n')
        f = s.makefile("rb")
        kinds = []
        while "synchronized" not in kinds:
            kinds.append(json.loads(f.readline())["event"]["event"])
    assert kinds[0] == "phase"


def test_an_events_follower_that_goes_away_leaves_no_traceback(migration):
    disk = migration.start()
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(disk.control))
            s.sendall(b'{"cmd": "events", "since": 0}\n')
            s.recv(10)                     # the first event is on its way; go away mid-stream
    qemu_io(disk.uri, "write -P 0x11 0 64k")
    migration.ctl("pivot", check=False)    # more events for the followers that left
    assert status_of(disk.control)["phase"] == "mirroring"
    assert disk.stop() == 0
    assert "Traceback" not in disk.stderr, disk.stderr


# serial: it asserts the copy's rate, and that a `mirrorfs status` started once 40 MiB are copied
# still sees the last 8 MiB running (one second at the limit): in a parallel pass at a load average
# of 8, the copy had ended by then.
@pytest.mark.serial
def test_copy_progress_counts_the_data_and_the_real_rate(workdir, serve):
    """A 128 MiB base holding 48 MiB of data, copied at --rate 8M. Progress is a share of the data
    (qemu-img convert -p's own measure), the rate is what the limit allows (measured over the last
    seconds: convert starts with a burst of ~20 MiB), and an ETA is shown; once done, status says
    the disk is ready to pivot. (It once showed "1.0 GiB of 1.0 GiB" at 5x the limit.)"""
    setup = MigrationSetup(workdir, serve, size=16 * MiB)
    run("qemu-img", "create", "-q", "-f", "qcow2", setup.base, str(128 * MiB))
    qemu_io(setup.base, "write -P 0x40 0 48M", fmt="qcow2")
    disk = setup.start()
    run(*MIRRORFS, "copy", "--background", "--rate", "8M", "--control", disk.control)
    copy = wait_until(lambda: (c := status_of(disk.control).get("copy")) and c["running"]
                      and c["bytes_done"] >= 40 * MiB and c, "40 MiB copied")
    assert copy["bytes_total"] == 48 * MiB
    assert 4 * MiB <= copy["rate"] <= 12 * MiB, copy        # the limit's, not 5x it
    assert copy["eta_seconds"] is not None
    text = run(*MIRRORFS, "status", "--control", disk.control).stdout
    assert "MiB of 48.0 MiB" in text and "left" in text, text
    done = wait_until(lambda: (c := status_of(disk.control)["copy"]) and not c["running"] and c,
                      "copied", timeout=120)
    assert done["bytes_done"] == 48 * MiB and done["ready_to_pivot"] is True
    assert "ready to pivot" in run(*MIRRORFS, "status", "--control", disk.control).stdout


def test_status_after_a_resumed_switch_names_the_destination(migration, workdir):
    """After a restart of a switched migration the data path served the destination under the name
    "source"; status said "reads from: source" next to the source's paths."""
    state = workdir / "state"
    disk = migration.start("--state-dir", state)
    migration.ctl("copy")
    migration.ctl("pivot")
    assert disk.stop() == 0
    migration.start("--state-dir", state)
    s = json.loads(migration.ctl("status", "--json").stdout)
    assert s["phase"] == "switched" and s["serving"] == "destination"
    assert s["datapath"]["reader"] == "destination" and s["datapath"]["writers"] == ["destination"]
    text = migration.ctl("status").stdout
    assert f"destination:  {migration.dest_overlay} on {migration.dest_base} <= serves the disk" in text
    assert "reads from:   destination" in text


def test_status_after_a_cancel_does_not_list_removed_files(migration):
    disk = migration.start()
    migration.ctl("cancel")
    assert not migration.dest_overlay.exists()
    s = status_of(disk.control)
    assert s["destination"]["removed"] is True and s["serving"] == "source"
    assert "(removed by cancel)" in migration.ctl("status").stdout


def test_a_refusal_speaks_in_human_sizes(workdir, serve):
    src, dst = make_full_pair(workdir, 64 * MiB)
    disk = serve("--copy", "full", "--rate", "1M", src, dst)
    res = run(*MIRRORFS, "pivot", "--control", disk.control, check=False)
    assert res.returncode == EXIT_ERROR, res.stderr
    assert "MiB may still differ" in res.stderr and "bytes" not in res.stderr, res.stderr
    dp = status_of(disk.control)["datapath"]
    assert 0 < dp["dirty_bytes"] <= 64 * MiB             # exact bytes in --json, counted once
