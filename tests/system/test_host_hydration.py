"""Hydration (`serve --copy full --switch-first`, docs/EVACUATION.md) under the host budget
(mirrorfs.host.budget), on real processes: two evacuations share the budget max-min fair, a budget
changed live applies within a second, and the concurrent-copy limit queues a hydration like any
copy while its disk is served from the destination.

Rates are measured from each hydration's own byte count (`status`: the data path's hydrator,
`bytes_read`), sampled over the control sockets and interpolated; the destinations are compared
with their sources byte for byte at the end, and the sources' files are hashed before and after."""

import json
import time

import nbd
import pytest

from lib.commands import MIRRORFS, run
from lib.control import status
from lib.images import MiB, images_identical, qemu_io, sha256
from lib.rates import Counts
from lib.waits import wait_until

BUDGET = 16 * MiB
RAISED = 24 * MiB
WINDOW = 1.0

# In place (an empty qcow2 destination: its daemon copies from the source) and through nbdkit
# (a raw destination): the hydrator pays for a batch differently in each (hydrator.py).
MODES = {"in-place": True, "through-nbdkit": False}


def full_source(path, size):
    """A qcow2 image with data in every MiB, each MiB its own pattern."""
    run("qemu-img", "create", "-q", "-f", "qcow2", path, str(size))
    qemu_io(path, *[f"write -P {0x40 + i % 128} {i * MiB} {MiB}" for i in range(size // MiB)],
            fmt="qcow2")
    return path


class Evacuating:
    """One `mirrorfs serve --copy full --switch-first` of a source full of data, registered in
    `rundir` (`start`); `images` are (source, destination)."""

    def __init__(self, workdir, name, size, in_place):
        self.workdir, self.name, self.in_place = workdir, name, in_place
        d = self.dir = workdir / name
        d.mkdir()
        src = full_source(d / "src.qcow2", size)
        if in_place:
            dst = d / "dst.qcow2"
            run("qemu-img", "create", "-q", "-f", "qcow2", dst, str(size))
        else:
            dst = d / "dst.img"
            run("qemu-img", "create", "-q", "-f", "raw", dst, str(size))
        self.images = (src, dst)
        self.source_hash = sha256(src)
        self.socket = workdir / f"{name}.sock"
        self.control = workdir / f"{name}.sock.ctl"
        self.proc = None

    def start(self, processes, rundir):
        self.proc = processes(self.workdir, self.name, "serve", "--copy", "full", "--switch-first",
                              "--state-dir", self.dir / "state", *self.images, "--socket",
                              self.socket, rundir=rundir)
        assert status(self.control)["datapath"]["hydration"]["in_place"] is self.in_place
        return self

    def sample(self):
        """(when, bytes the hydrator copied, phase), asked over the control socket."""
        before = time.monotonic()
        s = status(self.control)
        return (before + time.monotonic()) / 2, s["datapath"]["hydrator"]["bytes_read"], s["phase"]

    def check(self):
        assert self.proc.stop() == 0
        src, dst = self.images
        assert sha256(src) == self.source_hash, "the source image changed"
        same, detail = images_identical(src, dst)
        assert same, detail


def listed(rundir):
    return {d["socket"]: d for d in json.loads(run(*MIRRORFS, "list", "--json", "--run-dir",
                                                   rundir).stdout)}


@pytest.mark.serial         # measures rates, second by second
@pytest.mark.parametrize("mode", list(MODES))
def test_two_hydrations_share_the_host_budget(workdir, processes, mode):
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "16M", "--run-dir", rundir)
    evacs = {name: Evacuating(workdir, name, 128 * MiB, MODES[mode]) for name in ("a", "b")}
    for e in evacs.values():
        e.start(processes, rundir)
    counts = Counts()
    budgets = [(0.0, BUDGET)]           # (from time, budget)
    ended = {}
    started = changed = None
    checked_list = False
    begun = time.monotonic()
    while len(ended) < len(evacs):
        assert started is not None or time.monotonic() < begun + 30, \
            f"the hydrations did not start within 30 s (held?): {counts.series.get('a', [])[-1:]}"
        assert time.monotonic() < begun + 240, f"not hydrated: {set(evacs) - set(ended)}"
        for name, e in evacs.items():
            t, done, phase = e.sample()
            counts.add(name, t, done)
            if phase == "hydrated" and name not in ended:
                ended[name] = counts.reached(name)
        moved = [counts.first_moved(n) for n in evacs]
        if started is None and all(moved):
            started = max(moved)
        if started is not None and not checked_list and time.monotonic() > started + 1.5:
            # Each hydration is a running copy of the host, with its half of the budget.
            disks = listed(rundir)
            for e in evacs.values():
                d = disks[str(e.socket)]
                assert d["phase"] == "hydrating", d
                assert d["copy"]["share"] == BUDGET // 2, d["copy"]
                assert d["copy"]["bytes_total"] == 128 * MiB, d["copy"]
            checked_list = True
        if started is not None and changed is None and time.monotonic() > started + 5:
            run(*MIRRORFS, "budget", "set", "24M", "--run-dir", rundir)
            changed = time.monotonic()
            budgets.append((changed, RAISED))
        time.sleep(0.05)
    assert changed is not None and changed + 2 * WINDOW < min(ended.values()), \
        "the hydrations ended before the budget's change could be measured"

    def budget_at(t):
        return [b for since, b in budgets if since <= t][-1]

    # Every second past the first while both run, away from the change: the total is the budget
    # within 10%, and the two share it within 20% of equal.
    wrong, checked = [], 0
    t = started + WINDOW
    while t + WINDOW <= min(ended.values()):
        if not changed - WINDOW < t < changed + WINDOW:
            budget = budget_at(t)
            rates = {n: counts.rate(n, t, t + WINDOW) for n in evacs}
            shown = {n: round(r / MiB, 2) for n, r in rates.items()}
            if abs(sum(rates.values()) - budget) > 0.10 * budget:
                wrong.append(f"{t - started:.1f}s: total {sum(shown.values()):.2f} MiB/s of "
                             f"{budget / MiB:.0f}: {shown}")
            for n, r in rates.items():
                if abs(r - budget / 2) > 0.20 * budget / 2:
                    wrong.append(f"{t - started:.1f}s: {n} {r / MiB:.2f} MiB/s, expected "
                                 f"{budget / 2 / MiB:.0f}: {shown}")
            checked += 1
        t += 0.25
    assert not wrong, "\n".join(wrong)
    assert checked >= 12, f"only {checked} windows were checked"
    # The budget raised live took effect within a second.
    total = sum(counts.rate(n, changed + WINDOW, changed + 2 * WINDOW) for n in evacs)
    assert abs(total - RAISED) <= 0.10 * RAISED, total / MiB

    for e in evacs.values():
        e.check()


def test_a_hydration_waits_for_a_copy_slot_while_its_disk_is_served(workdir, processes):
    """--max-copies 1: the second evacuation is `queued`, its hydrator copies nothing, and yet
    its disk takes writes (on the destination) and reads (of the source, not hydrated yet) at
    once; it hydrates when the first one is done."""
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "8M", "--max-copies", "1", "--run-dir", rundir)
    first = Evacuating(workdir, "first", 96 * MiB, True)         # 12 s at 8 MiB/s
    second = Evacuating(workdir, "second", 32 * MiB, True)
    first.start(processes, rundir)
    second.start(processes, rundir)
    wait_until(lambda: second.sample()[2] == "queued", "second queued")
    assert first.sample()[2] == "hydrating", "the first ended before the test could look"
    assert listed(rundir)[str(second.socket)]["copy"]["share"] == 0
    h = nbd.NBD()
    h.connect_uri(f"nbd+unix:///?socket={second.socket}")
    try:
        h.pwrite(b"\x5a" * (3 * MiB + 1000), MiB + 12345)         # partial regions at both ends
        assert h.pread(3 * MiB + 1000, MiB + 12345) == b"\x5a" * (3 * MiB + 1000)
        assert h.pread(MiB, 20 * MiB) == bytes([0x40 + 20]) * MiB  # the source's, not hydrated
        h.flush()
    finally:
        h.shutdown()
    # In place, the destination's daemon filled the write's clusters from the source itself;
    # the hydrator copied nothing.
    assert second.sample()[1:] == (0, "queued")
    assert first.sample()[2] == "hydrating", "the first ended before the test could look"
    # What the slot means is seen: the rest at full speed, one copy at a time still.
    run(*MIRRORFS, "budget", "set", "10G", "--max-copies", "1", "--run-dir", rundir)
    wait_until(lambda: first.sample()[2] == "hydrated", "first hydrated", timeout=120)
    wait_until(lambda: second.sample()[2] == "hydrated", "second hydrated", timeout=120)
    first.check()
    assert second.proc.stop() == 0
    src, dst = second.images
    assert sha256(src) == second.source_hash
    run("qemu-img", "convert", "-U", "-O", "raw", dst, workdir / "second.raw")
    got = (workdir / "second.raw").read_bytes()
    assert got[MiB + 12345:4 * MiB + 13345] == b"\x5a" * (3 * MiB + 1000)
    assert got[:MiB] == bytes([0x40]) * MiB and got[20 * MiB:21 * MiB] == bytes([0x54]) * MiB
