"""Group migrations (issue #27): `mirrorfs start A B C --dest-dir DIR --state-dir DIR` moves the
named disks of one VM as one; its pivot and cancel end every member or none, whatever is killed when.

The writer (lib.dependent) makes cross-disk dependencies: block k goes to A, then, once A
acknowledged it, to B, then to C. After any ending, and after a kill -9 of any process followed by
the same command line, one side serves every member, every dependency holds on it (A >= B >= C at
every slot), and every acknowledged write is there.
"""

import json
import os
import random
import signal
import time

import psutil
import pytest

from lib import dependent
from lib.commands import EXIT_USAGE, run
from lib.hosted import Host
from lib.images import MiB
from lib.waits import wait_until

NAMES = ["sys", "data", "log"]
SIZE = 64 * MiB


@pytest.fixture
def host(workdir):
    # A long take-back: a killed group is resumed by its command line, not taken back meanwhile.
    h = Host(workdir, take_back_after=600).start()
    yield h
    h.shutdown()


def make_disks(host, workdir, names=NAMES):
    """Named disks on workdir/a/NAME.qcow2, each with 8 MiB of its own data at the start."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    socks = []
    for i, name in enumerate(names):
        image = workdir / "a" / f"{name}.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", image, str(SIZE))
        run("qemu-io", "-f", "qcow2", "-c", f"write -P {0x30 + i} 0 8M", image)
        sock = workdir / f"{name}.sock"
        host.mirrorfs("add", name, image, "--socket", sock)
        socks.append(sock)
    wait_until(lambda: all(host.disks().get(n, {}).get("phase") == "exporting" for n in names),
               "every disk served", timeout=60)
    return socks


def start_group(host, workdir, names=NAMES, name="g"):
    return host.background(name, "start", *names, "--dest-dir", workdir / "b",
                           "--state-dir", workdir / "state")


def group_record(workdir):
    path = workdir / "state" / "group.json"
    return json.loads(path.read_text()) if path.exists() else None


def sides(host, names=NAMES):
    """The side each member's record says it is on (the loan's, or the chain's directory)."""
    found = {}
    for n in names:
        record = host.record(n)
        lent = record["lent"]
        found[n] = lent["serving"] if lent else ("destination" if "/b/" in record["chain"][0]["path"]
                                                 else "source")
    return found


def check_served(socks, writer):
    dependent.check([dependent.read_slots(s) for s in socks], writer.acked)


def test_group_moves_as_one(workdir, host):
    """start, copy, pivot, hand-back of three disks under the dependent writer: one switch (every
    member's hold reported), every dependency and acknowledged write on the destinations; status
    and pivot by any member's name act on the group; list shows it."""
    socks = make_disks(host, workdir)
    g = start_group(host, workdir)
    # The writer does not reconnect: it connects once the group serves the disks.
    writer = dependent.DependentWriter(socks)
    for n in NAMES:
        assert host.record(n)["lent"]["control"].endswith("sys.group.ctl")
    status = json.loads(host.mirrorfs("status", "log", "--json").stdout)
    assert status["kind"] == "group" and status["group"]["members"] == NAMES
    listed = json.loads(host.mirrorfs("list", "--json").stdout)
    assert any(d.get("group") == NAMES for d in listed), listed
    writer.wait_steps(writer.steps + 50)
    host.mirrorfs("copy", "data")
    out = host.mirrorfs("pivot", "log").stdout
    assert "switched" in out and "sys" in out and "data" in out, out
    assert group_record(workdir)["end"] == "switched"
    assert set(sides(host).values()) == {"destination"}
    writer.wait_steps(writer.steps + 50)
    # The writer does not reconnect: it stops before the hand-back drops its connections.
    writer.stop()
    assert writer.error is None, writer.error
    check_served(socks, writer)
    assert "handed back" in host.mirrorfs("hand-back", "sys").stdout
    assert g.wait(60) == 0, g.err.read_text()
    wait_until(lambda: all(host.disks().get(n, {}).get("phase") == "exporting" for n in NAMES),
               "every disk served by the host again", timeout=60)
    for n in NAMES:
        assert host.record(n)["chain"][0]["path"] == str(workdir / "b" / f"{n}-snap.qcow2")
    check_served(socks, writer)


def test_bad_input_changes_nothing(workdir, host):
    """An unknown name, the same disk twice, a member lent to another migration: one line each,
    no record changed, nothing created."""
    make_disks(host, workdir, ["sys", "data"])
    other = host.background("m", "start", "data", "--dest-dir", workdir / "b",
                            "--state-dir", workdir / "other")
    before = {n: host.record(n)["generation"] for n in ("sys", "data")}
    cases = [(["sys", "nosuch"], "no disk named nosuch"),
             (["sys", "sys"], "named twice"),
             (["sys", "data"], "lent to migration")]
    for names, said in cases:
        res = host.mirrorfs("start", *names, "--dest-dir", workdir / "b", "--state-dir",
                            workdir / "state", check=False)
        assert res.returncode == EXIT_USAGE, res
        assert res.stderr.count("\n") == 1 and said in res.stderr, res.stderr
        assert {n: host.record(n)["generation"] for n in ("sys", "data")} == before
        assert not (workdir / "a" / "sys-snap.qcow2").exists()
        assert not list((workdir / "b").glob("sys*"))
    other.send_signal(signal.SIGTERM)
    other.wait(60)


def _victims(host, g, seed_rng):
    """The processes a kill may hit: the group's process, each member's nbdkit and storage
    daemons, the host service."""
    kids = [p for p in g.children(recursive=True) if p.is_running()]
    found = {"supervisor": [g], "host": [host.proc]}
    for p in kids:
        try:
            name = p.name()
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        member = next((n for n in NAMES if f"{n}-snap" in line or f"/{n}.qcow2" in line), None)
        if name == "nbdkit":
            found.setdefault("nbdkit", []).append(p)
        elif name == "qemu-storage-daemon":
            found.setdefault("daemon", []).append(p)
        _ = member
    return found


@pytest.mark.parametrize("victim", ["supervisor", "nbdkit", "daemon", "host"])
@pytest.mark.parametrize("ending", ["pivot", "cancel"])
def test_kill_during_the_group_switch(workdir, host, victim, ending):
    """kill -9 of one process at a random instant of the group's pivot (or cancel), seeded (the
    seed is printed; MIRRORFS_SEED=N reruns one); then the same command line: every member on one
    side, every dependency and every acknowledged write there."""
    seed = int(os.environ.get("MIRRORFS_SEED", random.randrange(1 << 30)))
    print(f"seed {seed}")
    rng = random.Random(seed)
    socks = make_disks(host, workdir)
    g = start_group(host, workdir)
    writer = dependent.DependentWriter(socks)
    writer.wait_steps(30)
    if ending == "pivot":
        host.mirrorfs("copy", "sys")
    command = host.background.__self__ if False else None
    _ = command
    victims = _victims(host, g, rng)
    target = rng.choice(victims[victim])
    at_record = rng.random() < 0.5
    delay = rng.uniform(0, 1.0)
    print(f"kill -9 of {victim} ({target.pid}) {'as the group record is written' if at_record else f'after {delay:.3f}s'}")
    proc = psutil.Popen([*__import__("lib.commands", fromlist=["MIRRORFS"]).MIRRORFS, ending, "data"],
                        env=host.env, stdout=open(workdir / "cmd.out", "w"),
                        stderr=open(workdir / "cmd.err", "w"))
    if at_record:
        wait_until(lambda: (group_record(workdir) or {}).get("end") or proc.poll() is not None,
                   "the group record's end", timeout=120, interval=0.0005)
    else:
        time.sleep(delay)
    try:
        target.send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        pass
    proc.wait(120)
    if victim == "host":
        host.proc.wait(30)
        host.start()
    # A member's process killed: the group stops (every member), or finishes on its own.
    if g.is_running() and victim != "host":
        wait_until(lambda: g.poll() is not None or "switched" in (workdir / "cmd.out").read_text()
                   or "cancelled" in (workdir / "cmd.out").read_text(),
                   "the group stops or ends", timeout=120)
    writer.stop()
    end = (group_record(workdir) or {}).get("end")
    print(f"group record: {end}; writer: {writer.steps} steps, {writer.error}")
    if g.poll() is not None:
        for p in host.daemons():
            if p.pid in [d.pid for d in victims.get("daemon", [])]:
                p.wait(30)
        again = start_group(host, workdir, name="g2") if end != "cancelled" else None
        if again is None:
            res = host.mirrorfs("start", *NAMES, "--dest-dir", workdir / "b", "--state-dir",
                                workdir / "state", check=False)
            assert res.returncode == EXIT_USAGE and "was cancelled" in res.stderr, res
    on = set(sides(host).values())
    assert len(on) == 1, sides(host)
    if end == "switched":
        assert on == {"destination"}
    else:
        assert on == {"source"}
    if end == "cancelled" and g.poll() is not None:
        # The host takes the cancelled group's disks back on their sources.
        host_restart(host)
        wait_until(lambda: all(host.disks().get(n, {}).get("phase") == "exporting"
                               for n in NAMES), "every member taken back", timeout=120)
    dependent.check([dependent.read_slots(s) for s in socks], writer.acked)


def host_restart(host):
    host.proc.send_signal(signal.SIGTERM)
    host.proc.wait(60)
    host.take_back_after = 1
    host.start()
