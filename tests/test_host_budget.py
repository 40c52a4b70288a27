"""One bandwidth budget for the host's copies (mirrorfs.host.budget), on real `mirrorfs serve --copy
full` processes: shared max-min fair, re-divided within a second when a copy starts or ends or the
budget changes, a per-disk --rate kept as a cap under it, and a limit on concurrent copies.

Rates are measured from the copies' own byte counts (the copier's, as each process writes them
into its budget entry with the time it read them, every 0.25 s), interpolated at window edges;
the destinations are then compared with their sources byte for byte."""

import bisect
import json
import time


from lib.commands import MIRRORFS, run
from lib.control import control_request
from lib.images import MiB, images_identical, make_base, make_full_pair
from lib.waits import wait_until

BUDGET = 32 * MiB
WINDOW = 1.0


class Recorder:
    """The run directory's copy entries, sampled: per pid, a list of (time, bytes done)."""

    def __init__(self, rundir):
        self.dir = rundir / "copies"
        self.series = {}
        self.seen = set()

    def sample(self):
        for path in self.dir.glob("*.json"):
            try:
                e = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            points = self.series.setdefault(e["pid"], [])
            if not points or e["time"] > points[-1][0]:
                points.append((e["time"], e["done"]))

    def done_at(self, pid, t):
        """Bytes done by `pid` at time `t`, interpolated (0 before its first sample, its last
        value after its last)."""
        points = self.series.get(pid, [])
        if not points or t <= points[0][0]:
            return points[0][1] if points and t >= points[0][0] else 0
        i = bisect.bisect_left(points, (t,))
        if i >= len(points):
            return points[-1][1]
        (t0, d0), (t1, d1) = points[i - 1], points[i]
        return d0 + (d1 - d0) * (t - t0) / (t1 - t0)

    def rate(self, pid, start, end):
        return (self.done_at(pid, end) - self.done_at(pid, start)) / (end - start)


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


def test_four_copies_share_the_host_budget(workdir, processes):
    rundir = workdir / "run"
    run(*MIRRORFS, "budget", "set", "32M", "--run-dir", rundir)
    rec = Recorder(rundir)
    for name, size in (("a", 192), ("b", 320), ("c", 256), ("d", 96)):
        prepare(workdir, name, size * MiB)
    a = serve_copy(processes, workdir, "a", 192 * MiB)
    b = serve_copy(processes, workdir, "b", 320 * MiB)
    d = serve_copy(processes, workdir, "d", 96 * MiB, "--rate", "4M")
    copies = {"a": a, "b": b, "d": d}
    events = [time.time()]              # times after which shares may take a second to settle
    budgets = [(0.0, BUDGET)]           # (from time, budget)

    def sample_for(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rec.sample()
            time.sleep(0.05)

    sample_for(3)
    c = serve_copy(processes, workdir, "c", 256 * MiB)
    copies["c"] = c
    events.append(time.time())
    finished = {}
    changed = False
    deadline = time.monotonic() + 240
    while len(finished) < len(copies):
        assert time.monotonic() < deadline, f"copies not done: {set(copies) - set(finished)}"
        sample_for(0.25)
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
    names = running(change)
    total = sum(rec.rate(pids[n], change, change + WINDOW) for n in names)
    assert names and abs(total - 16 * MiB) <= 0.10 * 16 * MiB, (names, total)

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

    def sample_for(seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            rec.sample()
            time.sleep(0.05)

    sample_for(2.5)
    pid = m.proc.pid
    now = time.time()
    assert abs(rec.rate(pid, now - 1.2, now - 0.2) - 8 * MiB) <= 0.15 * 8 * MiB
    run(*MIRRORFS, "budget", "set", "2M", "--run-dir", rundir)
    changed = time.time()
    sample_for(2.5)
    assert abs(rec.rate(pid, changed + 1, changed + 2) - 2 * MiB) <= 0.2 * 2 * MiB
    run(*MIRRORFS, "budget", "clear", "--run-dir", rundir)
    wait_until(lambda: control_request(ctl, {"cmd": "status"})["status"]["copy"]["ready_to_pivot"],
               "base copied")
    assert "switched" in run(*MIRRORFS, "pivot", "--control", ctl).stdout
    assert m.stop() == 0
    same, detail = images_identical(base, workdir / "dst" / "base.qcow2")
    assert same, detail
