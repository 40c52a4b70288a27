"""One bandwidth budget for the host's copies (mirrorfs.host.budget), on real `mirrorfs serve --copy
full` processes: shared max-min fair, re-divided within a second when a copy starts or ends or the
budget changes, a per-disk --rate kept as a cap under it, and a limit on concurrent copies; and a
migration's copies (`mirrorfs start`): its base copy, and its resync of degraded writes.
Hydration (--switch-first) under the budget: tests/system/test_host_hydration.py.

Rates are measured from the copies' own byte counts (the copier's, as each process writes them
into its budget entry with the time it read them, every 0.25 s; for the resync, the data path's
copier in `status`), interpolated at window edges (lib.rates); the destinations are then compared
with their sources byte for byte."""

import json
import time

import nbd
import psutil
import pytest

from lib.commands import MIRRORFS, run
from lib.control import control_request, status
from lib.images import MiB, images_identical, make_base, make_full_pair
from lib.rates import Counts
from lib.waits import wait_until

BUDGET = 32 * MiB
WINDOW = 1.0


class Recorder(Counts):
    """The run directory's copy entries, sampled: per pid, a list of (time, bytes done)."""

    def __init__(self, rundir):
        super().__init__()
        self.dir = rundir / "copies"

    def sample(self):
        for path in self.dir.glob("*.json"):
            try:
                e = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            self.add(e["pid"], e["time"], e["done"])

    def sample_for(self, seconds):
        """Sample every 50 ms for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sample()
            time.sleep(0.05)


def serve_copy(processes, workdir, name, size, *extra):
    if not (workdir / name).exists():
        prepare(workdir, name, size)
    src, dst = workdir / name / "src.qcow2", workdir / name / "dst.qcow2"
    p = processes(workdir, name, "serve", src, dst, "--copy", "full",
                  "--socket", workdir / f"{name}.sock", *extra, rundir=workdir / "run")
    p.images = (src, dst)
    p.control = workdir / f"{name}.sock.ctl"
    return p


def prepare(workdir, name, size):
    (workdir / name).mkdir()
    make_full_pair(workdir / name, size)


def phase(p):
    return control_request(p.control, {"cmd": "status"})["status"]["phase"]


@pytest.mark.serial         # measures rates, second by second
def test_four_copies_share_the_host_budget(workdir, processes):
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "32M", "--run-dir", rundir)
    rec = Recorder(rundir)
    # Half of each disk is data (make_full_pair). D, capped at 4 MiB/s, must still run well after
    # the live change's window (below): at 96 MiB it ended 0.7 s after that window, and when it
    # ended inside it the check summed B and C alone (6 + 6 MiB/s of 16) and failed.
    for name, size in (("a", 192), ("b", 320), ("c", 256), ("d", 128)):
        prepare(workdir, name, size * MiB)
    a = serve_copy(processes, workdir, "a", 192 * MiB)
    b = serve_copy(processes, workdir, "b", 320 * MiB)
    d = serve_copy(processes, workdir, "d", 128 * MiB, "--rate", "4M")
    copies = {"a": a, "b": b, "d": d}
    events = [time.time()]              # times after which shares may take a second to settle
    budgets = [(0.0, BUDGET)]           # (from time, budget)

    rec.sample_for(3)
    c = serve_copy(processes, workdir, "c", 256 * MiB)
    copies["c"] = c
    events.append(time.time())
    finished = {}
    changed = False
    deadline = time.monotonic() + 240
    while len(finished) < len(copies):
        assert time.monotonic() < deadline, f"copies not done: {set(copies) - set(finished)}"
        rec.sample_for(0.25)
        for name, p in copies.items():
            if name not in finished and phase(p) == "synchronized":
                # When its count reached its end, by its own entries.
                points = rec.series[p.proc.pid]
                finished[name] = next(t for t, d in points if d == points[-1][1])
                events.append(finished[name])
        if "a" in finished and not changed and time.time() > finished["a"] + 2.5:
            run(*MIRRORFS, "budget", "set", "16M", "--run-dir", rundir)
            changed = True
            events.append(time.time())
            budgets.append((events[-1], 16 * MiB))
    pids = {name: p.proc.pid for name, p in copies.items()}
    unlimited = [n for n in copies if n != "d"]

    def running(t):
        """The copies that ran during all of [t, t + WINDOW]."""
        return [n for n in copies if rec.series.get(pids[n]) and
                rec.series[pids[n]][0][0] <= t and finished[n] >= t + WINDOW]

    def budget_at(t):
        return [b for since, b in budgets if since <= t][-1]

    checked, wrong = 0, []
    start, end = events[0] + WINDOW, max(finished.values())
    t = start
    while t + WINDOW <= end:
        window = (t, t + WINDOW)
        settling = any(e - WINDOW < t < e + WINDOW for e in events[1:])
        names = running(t)
        if not settling and budget_at(t) == budget_at(t + WINDOW) and \
                any(n in unlimited for n in names):
            rates = {n: rec.rate(pids[n], *window) for n in names}
            budget = budget_at(t)
            shown = {n: round(r / MiB, 2) for n, r in rates.items()}
            if abs(sum(rates.values()) - budget) > 0.10 * budget:
                wrong.append(f"{t - events[0]:.1f}s: total {sum(shown.values()):.2f} MiB/s of "
                             f"{budget / MiB:.0f}: {shown}")
            # The others share the rest (what the capped copy leaves) within 20% of equal.
            others = [n for n in names if n != "d"]
            fair = (budget - rates.get("d", 0)) / len(others)
            for n in others:
                if abs(rates[n] - fair) > 0.20 * fair:
                    wrong.append(f"{t - events[0]:.1f}s: {n} {rates[n] / MiB:.2f} MiB/s, expected "
                                 f"{fair / MiB:.2f}: {shown}")
            checked += 1
        t += 0.5
    assert not wrong, "\n".join(wrong)
    # The capped copy kept its own --rate, a cap under the budget (over its whole copy: its pieces
    # come in bursts of a few hundred KiB, which one second's window sees unevenly).
    points = rec.series[pids["d"]]
    d_rate = rec.rate(pids["d"], points[0][0] + WINDOW, finished["d"])
    assert abs(d_rate - 4 * MiB) <= 0.10 * 4 * MiB, d_rate / MiB
    assert checked >= 10, f"only {checked} windows were checked"

    # Re-divided within a second of A's end: B and C (and D's cap) now share all of it.
    after = finished["a"] + WINDOW
    rates = {n: rec.rate(pids[n], after, after + WINDOW) for n in ("b", "c", "d")}
    assert abs(sum(rates.values()) - BUDGET) <= 0.10 * BUDGET, rates
    assert abs(rates["b"] - 14 * MiB) <= 0.2 * 14 * MiB, rates
    # The budget changed live took effect within a second.
    change = budgets[1][0] + WINDOW
    # The window's premise: the same copies run through all of it (a copy that ends inside it
    # leaves its share to the others only at their next tick, and is not summed).
    ended = [n for n in copies if change < finished[n] < change + WINDOW]
    assert not ended, f"{ended} ended inside the live change's window: the sizes no longer fit it"
    names = running(change)
    total = sum(rec.rate(pids[n], change, change + WINDOW) for n in names)
    when = {n: round(finished[n] - events[0], 2) for n in finished}
    every = {n: round(rec.rate(pids[n], change, change + WINDOW) / MiB, 2) for n in copies}
    assert names and abs(total - 16 * MiB) <= 0.10 * 16 * MiB, \
        (names, total / MiB, f"changed at {budgets[1][0] - events[0]:.2f}s, finished {when}, "
         f"MiB/s in the window {every}")

    # Complete and identical, by the destinations' bytes.
    for name, p in copies.items():
        assert p.stop() == 0
        same, detail = images_identical(*p.images)
        assert same, (name, detail)


def test_concurrent_copies_beyond_the_limit_wait_their_turn_in_order(workdir, processes):
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "16M", "--max-copies", "1", "--run-dir", rundir)
    first = serve_copy(processes, workdir, "first", 128 * MiB)
    second = serve_copy(processes, workdir, "second", 32 * MiB)
    third = serve_copy(processes, workdir, "third", 32 * MiB)
    wait_until(lambda: phase(second) == "queued" and phase(third) == "queued", "queued")
    assert phase(first) == "copying"
    listed = {d["socket"]: d for d in json.loads(run(*MIRRORFS, "list", "--json", "--run-dir",
                                                     rundir).stdout)}
    assert listed[str(workdir / "second.sock")]["phase"] == "queued"
    assert listed[str(workdir / "second.sock")]["copy"]["share"] == 0
    # Nothing of a queued copy moves.
    done = control_request(third.control, {"cmd": "status"})["status"]["copy"]["bytes_done"]
    wait_until(lambda: phase(first) == "synchronized", "first synchronized")
    # The slot goes to the one registered first; the third still waits.
    wait_until(lambda: phase(second) in ("copying", "synchronized"), "second copying")
    order = []
    wait_until(lambda: phase(second) == "synchronized" or order.append(phase(third)),
               "second synchronized")
    assert set(order) <= {"queued"}, order
    assert done == 0
    wait_until(lambda: phase(third) == "synchronized", "third synchronized")
    for p in (first, second, third):
        assert p.stop() == 0
        same, detail = images_identical(*p.images)
        assert same, detail


@pytest.mark.serial         # measures rates, second by second
def test_the_base_copy_of_a_migration_draws_from_the_budget(workdir, processes):
    """Step 4's copy (through NBD, mirrorfs.control.basecopy) holds the host's rate too, and its
    share changes live: a budget set while it runs applies within a second."""
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "8M", "--run-dir", rundir)
    (workdir / "src").mkdir()
    (workdir / "dst").mkdir()
    base = make_base(workdir / "src" / "base.qcow2", 256 * MiB)      # 43 MiB of data
    m = processes(workdir, "m", "start", base, "--dest-dir", workdir / "dst",
                  "--socket", workdir / "m.sock", rundir=rundir)
    ctl = workdir / "m.sock.ctl"
    run(*MIRRORFS, "copy", "--background", "--control", ctl)
    rec = Recorder(rundir)
    pid = m.proc.pid
    # From its first byte: on a cold machine (the suite's first qemu-img) the copy may start
    # a second late, and a window before it would measure nothing.
    wait_until(lambda: rec.sample() or rec.first_moved(pid) is not None, "the copy started")
    rec.sample_for(2.5)
    now = time.time()
    assert abs(rec.rate(pid, now - 1.2, now - 0.2) - 8 * MiB) <= 0.15 * 8 * MiB
    run(*MIRRORFS, "budget", "set", "2M", "--run-dir", rundir)
    changed = time.time()
    rec.sample_for(2.5)
    assert abs(rec.rate(pid, changed + 1, changed + 2) - 2 * MiB) <= 0.2 * 2 * MiB
    run(*MIRRORFS, "budget", "clear", "--run-dir", rundir)
    wait_until(lambda: control_request(ctl, {"cmd": "status"})["status"]["copy"]["ready_to_pivot"],
               "base copied")
    assert "switched" in run(*MIRRORFS, "pivot", "--control", ctl).stdout
    assert m.stop() == 0
    same, detail = images_identical(base, workdir / "dst" / "base.qcow2")
    assert same, detail


@pytest.mark.serial         # measures rates, second by second
def test_the_resync_of_a_migrations_degraded_writes_draws_from_the_budget(workdir, processes):
    """A migration whose destination stopped answering (its storage daemon SIGSTOPped; writes cut
    after --io-timeout and recorded, --on-dest-error degrade) copies the regions again once it is
    back: that resync, the data path's copier, holds the host's rate as a copy of its own."""
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "8M", "--run-dir", rundir)
    (workdir / "src").mkdir()
    (workdir / "dst").mkdir()
    base = make_base(workdir / "src" / "base.qcow2", 128 * MiB)
    m = processes(workdir, "m", "start", base, "--dest-dir", workdir / "dst", "--socket",
                  workdir / "m.sock", "--state-dir", workdir / "state", "--io-timeout", "1",
                  rundir=rundir)
    ctl = workdir / "m.sock.ctl"
    wait_until(lambda: status(ctl)["datapath"]["synchronized"], "synchronized")
    [dst_daemon] = [p for p in psutil.Process(m.proc.pid).children()
                    if p.name() == "qemu-storage-daemon" and "/dst.pid" in " ".join(p.cmdline())]
    dst_daemon.suspend()
    try:
        # 40 MiB of new data while the destination is held: every write reaches the source, is
        # cut at the destination after a second, and its region is marked to copy again.
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={workdir / 'm.sock'}")
        pending = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([0x80 + i]) * MiB), i * MiB)
                   for i in range(40)]
        deadline = time.monotonic() + 120
        while pending:                  # a completed command is retired: asked about once
            assert time.monotonic() < deadline, f"{len(pending)} writes never answered"
            h.poll(1)
            pending = [c for c in pending if not h.aio_command_completed(c)]
        h.shutdown()
    finally:
        dst_daemon.resume()
    s = status(ctl)
    assert s["datapath"]["sides"]["destination"]["degraded"] > 0, s["datapath"]["sides"]
    assert not s["datapath"]["synchronized"]
    counts = Counts()
    deadline = time.monotonic() + 120
    while not (s := status(ctl))["datapath"]["synchronized"]:
        counts.add("resync", time.monotonic(), s["datapath"]["copy"]["bytes_read"])
        assert time.monotonic() < deadline, "the resync did not end"
        time.sleep(0.05)
    counts.add("resync", time.monotonic(), s["datapath"]["copy"]["bytes_read"])
    start, end = counts.first_moved("resync"), counts.reached("resync")
    # The resync copied the region the writes marked (its data: the writes and the base's).
    assert counts.series["resync"][-1][1] >= 40 * MiB
    assert end - start >= 4, "the resync ran too fast to be under the budget"
    # Never above the budget in any second past the first, and at it over the whole resync (one
    # worker copies a region's chunks one after the other, so a busy machine may slow a second).
    rates = {round(t - start, 2): counts.rate("resync", t, t + WINDOW)
             for t in (start + WINDOW + 0.25 * i for i in range(int((end - start - 2) * 4)))}
    wrong = {t: round(r / MiB, 2) for t, r in rates.items() if r > 1.10 * 8 * MiB}
    assert rates and not wrong, f"seconds after the start: MiB/s {wrong}"
    mean = counts.rate("resync", start + WINDOW, end)
    assert abs(mean - 8 * MiB) <= 0.10 * 8 * MiB, mean / MiB
    assert m.stop() == 0
    same, detail = images_identical(workdir / "src" / "base-snap.qcow2",
                                    workdir / "dst" / "base-snap.qcow2")
    assert same, detail
