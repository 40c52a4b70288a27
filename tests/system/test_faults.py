"""A failing, slow or vanishing destination during a full copy (nbdkit's error and delay filters in
front of a qemu-nbd export), the degrade and fail policies, convergence under load, and the bad
inputs of the full-mode options."""

import json
import random
import signal
import time

import nbd
import pytest

from lib.commands import EXIT_ERROR, EXIT_USAGE, MIRRORFS, run
from lib.control import saved_state
from lib.fio import FioLoad
from lib.images import MiB, images_identical, make_full_pair, qemu_io, sha256
from lib.nbdservers import NbdkitFilter, QemuNbd
from lib.waits import wait_until
from mirrorfs.common import jsonlines

SIZE = 64 * MiB


@pytest.fixture
def pair(workdir):
    return make_full_pair(workdir, SIZE)


class Faulty(NbdkitFilter):
    """nbdkit in front of the destination's qemu-nbd, injecting EIO into writes while `trigger`
    exists, and delaying every write."""

    def __init__(self, workdir, target_socket, rate="10%", delay="2ms"):
        self.trigger = workdir / "inject-errors"
        super().__init__(workdir, "faulty", target_socket, "--filter=error", "--filter=delay",
                         "error-pwrite=EIO", f"error-pwrite-rate={rate}",
                         f"error-pwrite-file={self.trigger}", f"delay-write={delay}")


def status(disk):
    return json.loads(run(*MIRRORFS, "status", "--json", "--control", disk.control).stdout)


def wait_for(disk, phase, timeout=120):
    return wait_until(lambda: (s := status(disk))["phase"] == phase and s, f"phase {phase}",
                      timeout=timeout, interval=0.1)


def write_load(uri, seconds, seed, errors):
    """Random 4-64 KiB writes for `seconds`; errors the client sees are collected."""
    rng = random.Random(seed)
    h = nbd.NBD()
    h.connect_uri(uri)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        length = rng.choice([4096, 16384, 65536])
        offset = rng.randrange(0, SIZE - length, 4096)
        try:
            h.pwrite(rng.randbytes(length), offset)
        except nbd.Error as e:
            errors.append(e)
    h.shutdown()


def test_degrade_hides_destination_errors_and_resyncs(pair, workdir, serve, qemu_nbd):
    src, dst = pair
    export = qemu_nbd(dst, "dst-export")
    faulty = Faulty(workdir, export.socket)
    try:
        faulty.trigger.touch()
        disk = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                     "--on-dest-error", "degrade", src, faulty.uri)
        errors = []
        write_load(disk.uri, 3, seed=1, errors=errors)
        assert errors == []                              # the client never saw the failures
        s = status(disk)
        assert s["datapath"]["sides"]["destination"]["errors"] > 0
        assert s["datapath"]["sides"]["destination"]["degraded"] > 0
        assert any(e["event"] == "error" for e in s["events"])
        faulty.trigger.unlink()                          # the destination heals
        wait_for(disk, "synchronized")
        assert disk.stop() == 0
    finally:
        faulty.stop()
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail


def test_fail_policy_returns_errors_and_nothing_diverges_silently(pair, workdir, serve, qemu_nbd):
    src, dst = pair
    export = qemu_nbd(dst, "dst-export")
    faulty = Faulty(workdir, export.socket, rate="30%")
    try:
        disk = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                     "--on-dest-error", "fail", src, faulty.uri)
        wait_for(disk, "synchronized")
        faulty.trigger.touch()
        errors = []
        write_load(disk.uri, 2, seed=2, errors=errors)
        assert errors, "the fail policy must return the destination's errors"
        s = status(disk)
        # The failed writes reached the source: counted, and their regions copied again below.
        assert s["datapath"]["sides"]["destination"]["errors"] >= len(errors)
        faulty.trigger.unlink()
        wait_for(disk, "synchronized")
        assert disk.stop() == 0
    finally:
        faulty.stop()
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail


def test_destination_disconnects_and_comes_back(pair, workdir, serve):
    src, dst = pair
    export = QemuNbd(dst, workdir / "dst-export.sock")
    # 4M: the test must stop the destination before the copy's end, 14 s after it saw 8 MiB
    # copied (at 16M, 3.5 s: at a load average of 8-13 the copy had ended first).
    disk = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                 "--rate", "4M", src, export.uri)
    wait_until(lambda: status(disk)["datapath"]["copy"]["first_pass_bytes"] >= 8 * MiB,
               "8 MiB copied")
    export.stop()                                        # mid-copy: the destination is gone
    assert status(disk)["datapath"]["copy"]["first_pass_bytes"] < SIZE
    run(*MIRRORFS, "rate", "none", "--control", disk.control)   # the rest may go at full speed
    errors = []
    write_load(disk.uri, 1.5, seed=3, errors=errors)
    assert errors == []                                  # degrade (default with a state dir)
    assert status(disk)["phase"] == "copying"
    export = QemuNbd(dst, workdir / "dst-export.sock")   # back, same address
    s = wait_for(disk, "synchronized")
    # It noticed (the writes and the copy failed there), waited for the destination to settle
    # (mirrorfs.datapath.mirror.copier.SETTLE_FIRST), and came back.
    assert s["datapath"]["sides"]["destination"]["errors"] > 0
    assert disk.stop() == 0
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail


def test_copy_converges_under_a_full_speed_write_load(pair, workdir, serve):
    """fio writes as fast as it can from before the copy starts until the copy has converged:
    the copy must reach synchronized while the load goes on (the load stops only after)."""
    src, dst = pair
    disk = serve("--copy", "full", "--state-dir", workdir / "state", "--rate", "32M", src, dst)
    fio = FioLoad(workdir, disk.uri, "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={SIZE}")
    try:
        s = wait_for(disk, "synchronized", timeout=300)
        assert fio.running(), f"the load ended before the copy converged: {fio.err.read_text()}"
        assert s["datapath"]["requests"].get("write", 0) > 0
    finally:
        job = fio.stop()
    assert job["error"] == 0 and job["write"]["io_bytes"] > 0, job
    assert disk.stop() == 0
    same, detail = images_identical(src, dst)
    assert same, detail


def test_pivot_in_full_mode_switches_once_synchronized(pair, workdir, serve):
    src, dst = pair
    disk = serve("--copy", "full", "--state-dir", workdir / "state", src, dst)
    wait_for(disk, "synchronized")
    qemu_io(disk.uri, "write -P 0x99 3M 1M")
    out = run(*MIRRORFS, "pivot", "--control", disk.control).stdout
    assert "switched" in out
    qemu_io(disk.uri, "read -P 0x99 3M 1M", f"read -P {0x31} {2 * MiB} {MiB}")
    before = sha256(src)
    qemu_io(disk.uri, "write -P 0x9a 5M 1M")
    assert disk.stop() == 0
    assert sha256(src) == before                         # released at the switch
    # A restart serves the destination, as the state says.
    again = serve("--copy", "full", "--state-dir", workdir / "state", src, dst)
    qemu_io(again.uri, "read -P 0x9a 5M 1M")
    assert status(again)["phase"] == "switched"
    assert again.stop() == 0


def test_pivot_refused_while_copying(pair, workdir, serve):
    src, dst = pair
    disk = serve("--copy", "full", "--state-dir", workdir / "state", "--rate", "4M", src, dst)
    res = run(*MIRRORFS, "pivot", "--control", disk.control, check=False)
    assert res.returncode == EXIT_ERROR and "may still differ" in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1
    assert status(disk)["datapath"]["reader"] == "source"
    res = run(*MIRRORFS, "cancel", "--control", disk.control)
    assert disk.stop() == 0


def start_fails(*args):
    res = run(*MIRRORFS, "serve", *args, check=False)
    assert res.returncode == EXIT_USAGE, res.stderr
    assert res.stderr.startswith("mirrorfs: error:") and res.stderr.count("\n") == 1, res.stderr
    return res.stderr


def test_state_of_another_destination_is_refused(pair, workdir, serve):
    src, dst = pair
    disk = serve("--copy", "full", "--state-dir", workdir / "state", src, dst)
    wait_for(disk, "synchronized")
    assert disk.stop() == 0
    other = workdir / "other.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", other, str(SIZE))
    state = (workdir / "state" / "state.json").read_bytes()
    err = start_fails("--copy", "full", "--state-dir", workdir / "state", src, other,
                      "--socket", workdir / "x.sock")
    assert "belongs to another destination" in err
    assert (workdir / "state" / "state.json").read_bytes() == state


def test_state_of_another_copy_mode_is_refused(pair, workdir, serve):
    """A state saved by --copy full is not silently reused by --copy none (which would take the
    destination as already equal): refused with the reason, the state left as it was."""
    src, dst = pair
    disk = serve("--copy", "full", "--state-dir", workdir / "state", src, dst)
    assert disk.stop() == 0
    state = (workdir / "state" / "state.json").read_bytes()
    err = start_fails("--copy", "none", "--state-dir", workdir / "state", src, dst,
                      "--socket", workdir / "x.sock")
    assert "is for --copy full, not --copy none" in err
    assert (workdir / "state" / "state.json").read_bytes() == state


def test_corrupt_state_is_refused_not_reset(pair, workdir):
    src, dst = pair
    (workdir / "state").mkdir()
    (workdir / "state" / "state.json").write_text('{"format": 1, "mode": "full", "cursor": 5}')
    before = sha256(dst)
    err = start_fails("--copy", "full", "--state-dir", workdir / "state", src, dst,
                      "--socket", workdir / "x.sock")
    assert "corrupt" in err
    assert sha256(dst) == before
    assert (workdir / "state" / "state.json").read_text().endswith('"cursor": 5}')


@pytest.mark.parametrize("args,message", [
    (["--copy", "bogus"], "--copy 'bogus': expected one of none, full"),
    (["--on-dest-error", "maybe"], "--on-dest-error 'maybe': expected one of fail, degrade"),
    (["--rate", "0"], "--rate"),
    (["--rate", "fast"], "--rate"),
    (["--region", "3M"], "power of two"),
    (["--state-dir", "/nonexistent/dir/state"], "does not exist"),
])
def test_bad_full_mode_options(pair, workdir, args, message):
    src, dst = pair
    before = sha256(dst)
    err = start_fails("--copy", "full", src, dst, "--socket", workdir / "x.sock", *args)
    assert message in err
    assert sha256(dst) == before


def test_a_destination_that_stops_answering_is_cut_off(pair, workdir, serve):
    """SIGSTOP the destination's server: without a timeout every mirrored write would wait for it
    forever. With --io-timeout, its connections are cut, the writes are recorded (degrade) and the
    client goes on; once the server answers again the copier makes the sides identical."""
    src, dst = pair
    export = QemuNbd(dst, workdir / "dst-export.sock")
    disk = serve("--copy", "full", "--state-dir", workdir / "state", "--region", "1M",
                 "--io-timeout", "2", src, export.uri)
    wait_for(disk, "synchronized")
    export.proc.send_signal(signal.SIGSTOP)
    try:
        errors = []
        write_load(disk.uri, 4, seed=4, errors=errors)
        assert errors == []
        s = status(disk)
        assert s["datapath"]["sides"]["destination"]["timeouts"] > 0
        assert s["phase"] == "copying"                   # the stalled writes are to be copied
    finally:
        export.proc.send_signal(signal.SIGCONT)
    wait_for(disk, "synchronized")
    assert disk.stop() == 0
    export.stop()
    same, detail = images_identical(src, dst)
    assert same, detail


def test_restart_after_a_cancel_serves_the_source_alone(pair, workdir, serve):
    """After `cancel` the state says the source is the disk: a restart serves it alone and never
    writes the destination again. An operator follows it on the events stream: synchronized,
    then (after the cancel) cancelled, in order."""
    src, dst = pair
    state = workdir / "state"
    disk = serve("--copy", "full", "--state-dir", state, src, dst)
    events = jsonlines.stream(disk.control, {"cmd": "events", "since": 0}, timeout=120)
    seen = [next(events)["event"]]
    while seen[-1]["event"] != "synchronized":
        seen.append(next(events)["event"])
    assert "cancelled" in run(*MIRRORFS, "cancel", "--control", disk.control).stdout
    seen.append(next(events)["event"])
    events.close()
    assert [e.get("phase") or e["event"] for e in seen] == ["mirroring", "synchronized", "cancelled"]
    assert [e["seq"] for e in seen] == [1, 2, 3]
    s = status(disk)
    assert s["phase"] == "cancelled" and s["datapath"]["writers"] == ["source"]
    dst_after_cancel = sha256(dst)
    qemu_io(disk.uri, "write -P 0x9b 5M 1M")
    assert disk.stop() == 0
    assert saved_state(state)["phase"] == "cancelled"

    again = serve("--copy", "full", "--state-dir", state, src, dst)
    s = status(again)
    assert s["phase"] == "cancelled" and s["datapath"]["writers"] == ["source"], s
    qemu_io(again.uri, "read -P 0x9b 5M 1M", "write -P 0x9c 7M 1M")
    assert again.stop() == 0
    assert sha256(dst) == dst_after_cancel
    qemu_io(src, "read -P 0x9b 5M 1M", "read -P 0x9c 7M 1M", fmt="qcow2")
