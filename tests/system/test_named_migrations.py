"""Migrations of named disks (issue #26): `mirrorfs start vm1 --dest-dir DIR --state-dir DIR`, the
disk's record at every ending, and what a host "reboot" (every process killed with SIGKILL, then only
the host service started) serves afterwards.

The client is QEMU's NBD client with reconnection (lib.reconnecting): the question is whether any of
its writes failed, and whether every acknowledged write is what the name serves after the reboot.
Every image left on disk must open with `qemu-img info --backing-chain` and pass `qemu-img check`.
"""

import json
import os
import signal

import psutil
import pytest

from lib.commands import EXIT_ERROR, EXIT_USAGE, run
from lib.hosted import Host
from lib.images import MiB, make_base, qemu_io
from lib.reconnecting import BLOCK, ReconnectingWriter
from lib.waits import wait_until


SIZE = 128 * MiB         # the base's data in its first half: the writer's 48 MiB at most stay below


@pytest.fixture
def host(workdir):
    h = Host(workdir, take_back_after=1).start()
    yield h
    h.close()


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def check_every_chain(*dirs):
    """Every image file in `dirs` opens with its whole backing chain, and every qcow2 passes
    `qemu-img check`."""
    for d in dirs:
        for image in sorted(d.iterdir()):
            if image.suffix not in (".qcow2", ".img", ".raw"):
                continue
            layers = json.loads(run("qemu-img", "info", "-U", "--output=json", "--backing-chain",
                                    image).stdout)
            for layer in layers:
                if layer["format"] == "qcow2":
                    # 0: no errors; 3: leaked clusters only (allocated, unused: what a storage
                    # daemon killed with SIGKILL leaves, harmless). 2 would be corruption.
                    res = run("qemu-img", "check", "-U", layer["filename"], check=False)
                    assert res.returncode in (0, 3), res.stdout + res.stderr


def named_disk(host, workdir, fmt):
    """The disk vm1 on workdir/a/vm1.{qcow2,img} (data in its first half), served by the host."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / ("vm1.qcow2" if fmt == "qcow2" else "vm1.img"), SIZE, fmt=fmt)
    sock = workdir / "vm1.sock"
    host.mirrorfs("add", "vm1", base, "--socket", sock)
    return base, sock


def wait_served(host, phase="exporting"):
    return wait_until(lambda: host.disks().get("vm1", {}).get("phase") == phase and host.disks()["vm1"],
                      f"vm1 {phase}", timeout=60)


def check_base_data(sock, writer):
    """The base's own data (make_base: pattern 0x10 + i at MiB i, every third MiB of the first
    half) past what the writer wrote (block i at i * BLOCK)."""
    untouched = [i for i in range(0, SIZE // MiB // 2, 3) if i * MiB >= writer.sent * BLOCK]
    assert untouched, f"the writer wrote over all of the base's data ({writer.sent} blocks)"
    qemu_io(uri(sock), *[f"read -P {0x10 + i} {i * MiB} {MiB}" for i in untouched])


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("ending", ["pivot", "cancel"])
def test_reboot_after_the_end_of_a_migration(workdir, host, ending, fmt):
    """start vm1, then pivot (after copy) or cancel, then hand-back, under a reconnecting writer;
    then a reboot: the name serves every acknowledged write, on the chain the record names."""
    base, sock = named_disk(host, workdir, fmt)
    writer = ReconnectingWriter(sock)
    writer.wait_sent(30)
    m = host.background("m", "start", "vm1", "--dest-dir", workdir / "b",
                        "--state-dir", workdir / "state")
    assert host.record("vm1")["lent"]["migration"]
    writer.wait_sent(writer.sent + 30)
    if ending == "pivot":
        host.mirrorfs("copy", "vm1")
        assert "switched" in host.mirrorfs("pivot", "vm1").stdout
        expected = [workdir / "b" / "vm1-snap.qcow2", workdir / "b" / base.name]
    else:
        assert "cancelled" in host.mirrorfs("cancel", "vm1").stdout
        expected = [workdir / "a" / "vm1-snap.qcow2", base]
    writer.wait_sent(writer.sent + 30)
    assert "handed back" in host.mirrorfs("hand-back", "vm1").stdout
    assert m.wait(60) == 0, m.err.read_text()
    record = host.record("vm1")
    assert record["lent"] is None
    assert [layer["path"] for layer in record["chain"]] == [str(p) for p in expected]
    assert record["chain"][-1]["format"] == fmt
    wait_served(host)
    writer.wait_sent(writer.sent + 30)

    host.reboot()
    served = wait_served(host)
    assert served["top"] == str(expected[0])
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")
    # The side that lost is retired (a cancel removed the destination's overlay): nothing serves
    # it again under another name, nor the disk's own layers.
    if ending == "pivot":
        taken = [(workdir / "a" / "vm1-snap.qcow2", "retired"), (base, "retired")]
    else:
        taken = [(base, "current")]
    for image, role in taken:
        for argv in (("add", "vm2", image, "--socket", workdir / "vm2.sock"),
                     ("export", image, "--socket", workdir / "vm2.sock"),
                     ("serve", image, workdir / "b" / "copy.qcow2", "--socket", workdir / "vm2.sock")):
            res = host.mirrorfs(*argv, check=False)
            assert res.returncode != 0 and res.stderr.count("\n") == 1, (argv, res.stderr)
            assert "the disk vm1 (chain " in res.stderr and f"({role})" in res.stderr, res.stderr
    assert not (workdir / "vm2.sock").exists()


def test_everything_killed_after_the_switch_serves_the_destination(workdir, host):
    """The switch records the destination in the disk's record before any request is served from
    it: a power cut after the pivot (before any hand-back) ends, once the host service takes the
    disk back, on the destination, with every write acknowledged after the switch."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    m = host.background("m", "start", "vm1", "--dest-dir", workdir / "b",
                        "--state-dir", workdir / "state")
    host.mirrorfs("copy", "vm1")
    out = host.mirrorfs("pivot", "vm1", "--commit").stdout
    assert "switched" in out and "safety net" not in out, out
    writer.wait_sent(writer.sent + 60)          # these are on the destination alone
    host.reboot(also=[psutil.Process(m.pid)])
    served = wait_served(host)
    assert served["top"] == str(workdir / "b" / "vm1-snap.qcow2")
    assert host.record("vm1")["history"][-1]["event"] == "taken-back"
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")
    # The migration's state is stale now: resuming it is refused, in one line, nothing started.
    res = host.mirrorfs("start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state",
                        check=False)
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res.stderr
    assert "taken back" in res.stderr and "stale" in res.stderr
    assert wait_served(host)["top"] == str(workdir / "b" / "vm1-snap.qcow2")


@pytest.mark.parametrize("how", ["sigint", "kill-9"])
@pytest.mark.parametrize("state", [True, False], ids=["state-dir", "no-state-dir"])
def test_a_borrower_that_dies_is_taken_back(workdir, host, how, state):
    """The migration dies while mirroring: within 30 s the host service serves the disk again, with
    every acknowledged write; the socket never went away, so the writer sees no error."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    args = ["--state-dir", workdir / "state"] if state else []
    m = host.background("m", "start", "vm1", "--dest-dir", workdir / "b", *args)
    writer.wait_sent(writer.sent + 50)
    if how == "sigint":
        m.send_signal(signal.SIGINT)
        m.wait(60)
        out = m.err.read_text() + m.out.read_text()
        assert "mirrorfs start vm1" in out, out     # the stop says the next step
    else:
        kids = m.children(recursive=True)
        m.kill()
        psutil.wait_procs([m, *kids], timeout=30)
    served = wait_until(lambda: host.disks()["vm1"]["phase"] == "exporting" and host.disks()["vm1"],
                        "taken back", timeout=30)
    assert served["top"] == str(workdir / "a" / "vm1-snap.qcow2")
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")


@pytest.fixture
def patient_host(workdir):
    """A host service that does not take a killed migration's disk back (it is resumed)."""
    h = Host(workdir, take_back_after=600).start()
    yield h
    h.close()


def test_a_named_disk_pivots_to_a_safety_net(workdir, patient_host):
    """A single named disk behaves like a group of one (issue #27): a bare pivot keeps the net
    (reads from the destination, writes to both; status says for how long and what it costs);
    revert needs no copy (the two overlays are equal, byte for byte, at the revert); a kill -9
    under the net resumes under the net with the same command line; commit ends it (the source
    stops receiving writes); revert after commit is refused in one line; hand-back serves the
    destination with every acknowledged write."""
    host = patient_host
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    argv = ("start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state")
    m = host.background("m", *argv)
    src, dst = workdir / "a" / "vm1-snap.qcow2", workdir / "b" / "vm1-snap.qcow2"
    res = host.mirrorfs("commit", "vm1", check=False)
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res
    assert "cannot commit while mirroring" in res.stderr, res.stderr
    host.mirrorfs("copy", "vm1")
    out = host.mirrorfs("pivot", "vm1").stdout
    assert "switched" in out and "safety net is up" in out and "mirrorfs revert vm1" in out, out
    assert host.record("vm1")["lent"]["serving"] == "destination"
    writer.wait_sent(writer.sent + 50)
    status = json.loads(host.mirrorfs("status", "vm1", "--json").stdout)
    assert status["phase"] == "pivoted" and status["net"]["revert_possible"], status.get("net")
    assert status["datapath"]["reader"] == "destination"
    assert status["datapath"]["writers"] == ["destination", "source"]
    text = host.mirrorfs("status", "vm1").stdout
    assert "safety net:   up for" in text and "cost: write p50 source" in text, text
    # The two overlays compared at the revert, with the writer held (every write it sent
    # answered): compared while it writes, a write between the two reads made them differ.
    with writer.paused():
        out = host.mirrorfs("revert", "vm1").stdout
        assert "reverted" in out, out
        res = run("qemu-img", "compare", "-U", src, dst, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert host.record("vm1")["lent"]["serving"] == "source"
    host.mirrorfs("pivot", "vm1")
    writer.wait_sent(writer.sent + 30)
    kids = m.children(recursive=True)
    m.kill()
    psutil.wait_procs([m, *kids], timeout=30)
    m = host.background("m2", *argv)
    status = json.loads(host.mirrorfs("status", "vm1", "--json").stdout)
    assert status["phase"] == "pivoted" and status["datapath"]["reader"] == "destination", status
    assert host.record("vm1")["lent"]["serving"] == "destination"
    writer.wait_sent(writer.sent + 30)
    out = host.mirrorfs("commit", "vm1").stdout
    assert "committed" in out and str(src) in out, out
    status = json.loads(host.mirrorfs("status", "vm1", "--json").stdout)
    assert status["phase"] == "switched" and status["snapshot"]["consistent"], status
    res = host.mirrorfs("revert", "vm1", check=False)
    assert res.returncode != 0 and res.stderr.count("\n") == 1, res
    assert "cannot revert while switched" in res.stderr, res.stderr
    qemu_io(uri(sock), f"write -P 0xee {SIZE - MiB} {MiB}")
    # The retired source is closed (flushed) at the commit; the disk is read where it is served.
    assert run("qemu-img", "compare", "-U", "-F", "raw", src, uri(sock),
               check=False).returncode == 1, "the source took writes after the commit"
    host.mirrorfs("hand-back", "vm1")
    assert m.wait(60) == 0, m.err.read_text()
    record = host.record("vm1")
    assert record["chain"][0]["path"] == str(dst)
    assert str(src) in [r["path"] for r in record["retired"]]
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)


def test_a_source_that_fails_under_the_net_degrades_the_disk(workdir, host):
    """The source's storage daemon killed under a named disk's net: no write of the writer
    fails, the disk commits on its own to its destination alone and says so (status: the
    retired source is not the disk at the commit), and hand-back serves every write."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    m = host.background("m", "start", "vm1", "--dest-dir", workdir / "b",
                        "--state-dir", workdir / "state")
    host.mirrorfs("copy", "vm1")
    host.mirrorfs("pivot", "vm1")
    writer.wait_sent(writer.sent + 30)
    victim = next(p for p in m.children(recursive=True) if p.name() == "qemu-storage-daemon"
                  and str(workdir / "a" / "vm1-snap.qcow2") in " ".join(p.cmdline()))
    victim.send_signal(signal.SIGKILL)
    status = wait_until(lambda: (s := json.loads(host.mirrorfs("status", "vm1", "--json").stdout))
                        ["phase"] == "switched" and s, "the disk degraded", timeout=60)
    assert "NOT the disk at the commit" in status["snapshot"]["what"], status["snapshot"]
    assert "NOT the disk at the commit" in host.mirrorfs("status", "vm1").stdout
    writer.wait_sent(writer.sent + 30)
    host.mirrorfs("hand-back", "vm1")
    assert m.wait(60) == 0, m.err.read_text()
    assert host.record("vm1")["chain"][0]["path"] == str(workdir / "b" / "vm1-snap.qcow2")
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))


def test_a_migration_of_an_image_path_has_no_net(workdir, host):
    """`start SOURCE_TOP` (no name): its pivot is final, as the oVirt flow expects; revert and
    commit are refused in one line that says where a net exists."""
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    base = make_base(workdir / "a" / "img.qcow2", SIZE)
    ctl = workdir / "img.ctl"
    host.background("p", "start", base, "--dest-dir", workdir / "b", "--socket",
                    workdir / "img.sock", "--control", ctl)
    host.mirrorfs("copy", "--control", ctl)
    out = host.mirrorfs("pivot", "--control", ctl).stdout
    assert "switched" in out and "safety net" not in out, out
    for cmd in ("revert", "commit"):
        res = host.mirrorfs(cmd, "--control", ctl, check=False)
        assert res.returncode != 0 and res.stderr.count("\n") == 1, res
        assert "no safety net" in res.stderr and "mirrorfs start NAME" in res.stderr, res.stderr


def test_commands_by_name_say_what_the_disk_does(workdir, host):
    """status/pivot/cancel/hand-back NAME of a disk that is not lent: one line, what it does and
    what to do. A disk's image given as a path to `start` is refused with the disk's name."""
    base, sock = named_disk(host, workdir, "qcow2")
    for cmd in ("status", "pivot", "cancel", "hand-back", "copy"):
        res = host.mirrorfs(cmd, "vm1", check=False)
        assert res.returncode == EXIT_USAGE and res.stderr.count("\n") == 1, res.stderr
        assert "not lent to a migration" in res.stderr and "mirrorfs start vm1" in res.stderr
    res = host.mirrorfs("start", base, "--dest-dir", workdir / "b", "--socket", workdir / "x.sock",
                        check=False)
    assert res.returncode == EXIT_USAGE and "belongs to the disk vm1" in res.stderr, res.stderr
    assert sorted(os.listdir(workdir / "b")) == []
    res = host.mirrorfs("start", "vm9", "--dest-dir", workdir / "b", check=False)
    assert res.returncode == EXIT_USAGE and "no disk named vm9" in res.stderr, res.stderr


def test_a_switch_the_record_cannot_take_is_refused(workdir, host):
    """The record is the switch's commit point, inside the switch's hold: when it cannot be
    written (the registry made immutable), the pivot is refused, nothing is served from the
    destination, and the disk goes on mirroring; once it can, the same pivot switches. Both
    pivots: the bare one (to the safety net, `Migration.net_pivot`) and `--commit` (the
    destination alone, `Migration.pivot`), each with its own commit."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    host.background("m", "start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state")
    host.mirrorfs("copy", "vm1")
    run("chattr", "+i", host.registry)
    try:
        refused = [host.mirrorfs("pivot", "vm1", *extra, check=False) for extra in ([], ["--commit"])]
    finally:
        run("chattr", "-i", host.registry)
    for res in refused:
        assert res.returncode != 0 and "still mirroring" in res.stderr, res.stderr
        assert "cannot write" in res.stderr and "vm1.json" in res.stderr, res.stderr
    status = json.loads(host.mirrorfs("status", "vm1", "--json").stdout)
    assert status["phase"] == "mirroring" and status["datapath"]["writers"] == ["source", "destination"]
    assert host.record("vm1")["lent"]["serving"] == "source"
    writer.wait_sent(writer.sent + 30)
    host.mirrorfs("pivot", "vm1")
    assert host.record("vm1")["lent"]["serving"] == "destination"
    writer.wait_sent(writer.sent + 30)
    host.mirrorfs("hand-back", "vm1")
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_reboot_after_an_evacuation(workdir, host, fmt):
    """start vm1 --switch-first: the record says destination before the evacuation serves it;
    once hydrated, hand-back; a reboot then serves the evacuated image with every write."""
    base, sock = named_disk(host, workdir, fmt)
    writer = ReconnectingWriter(sock)
    writer.wait_sent(30)
    host.background("m", "start", "vm1", "--switch-first", "--dest-dir", workdir / "b",
                    "--state-dir", workdir / "state")
    assert host.record("vm1")["lent"]["serving"] == "destination"
    wait_until(lambda: json.loads(host.mirrorfs("status", "vm1", "--json").stdout)["phase"]
               == "hydrated", "hydrated")
    writer.wait_sent(writer.sent + 30)
    host.mirrorfs("hand-back", "vm1")
    record = host.record("vm1")
    assert record["chain"] == [{"path": str(workdir / "b" / base.name), "format": fmt}]
    assert record["retired"][0]["path"] == str(base)
    host.reboot()
    assert wait_served(host)["top"] == str(workdir / "b" / base.name)
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")


def test_a_migration_resumed_before_the_take_back_keeps_its_loan(workdir):
    """kill -9 of a migration with a state directory, started again with the same command line
    before the host takes the disk back: the same loan (same migration id), resumed; then copy,
    pivot, hand-back as usual."""
    host = Host(workdir, take_back_after=600).start()
    try:
        base, sock = named_disk(host, workdir, "qcow2")
        writer = ReconnectingWriter(sock)
        argv = ("start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state")
        first = host.background("m1", *argv)
        loan = host.record("vm1")["lent"]
        writer.wait_sent(writer.sent + 30)
        kids = first.children(recursive=True)
        first.kill()
        psutil.wait_procs([first, *kids], timeout=30)
        again = host.background("m2", *argv)
        resumed = host.record("vm1")["lent"]
        assert resumed["migration"] == loan["migration"] and resumed["pid"] == again.pid
        host.mirrorfs("copy", "vm1")
        host.mirrorfs("pivot", "vm1")
        writer.wait_sent(writer.sent + 30)
        host.mirrorfs("hand-back", "vm1")
        assert again.wait(60) == 0
        writer.wait_sent(writer.sent + 30)
        writer.stop()
        writer.check(uri(sock))
        assert host.record("vm1")["chain"][0]["path"] == str(workdir / "b" / "vm1-snap.qcow2")
    finally:
        host.close()


def test_an_evacuation_killed_while_hydrating_is_resumed_after_a_reboot(workdir, host):
    """A power cut while an evacuation hydrates: the service cannot serve the destination alone
    (regions not hydrated yet are on the source only) nor the source (it lacks the writes), so the
    disk stays unserved and `list` says how to resume; the same command line resumes the loan, and
    the hand-back serves every write."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    argv = ("start", "vm1", "--switch-first", "--dest-dir", workdir / "b",
            "--state-dir", workdir / "state", "--rate", "1M")
    m = host.background("m1", *argv)
    writer.wait_sent(writer.sent + 30)
    host.reboot(also=[psutil.Process(m.pid)])
    stranded = wait_until(lambda: host.disks()["vm1"]["phase"] == "stranded" and host.disks()["vm1"],
                          "stranded", timeout=30)
    assert "resume it" in stranded["error"], stranded
    again = host.background("m2", *argv)
    host.mirrorfs("rate", "vm1", "none")
    wait_until(lambda: json.loads(host.mirrorfs("status", "vm1", "--json").stdout)["phase"]
               == "hydrated", "hydrated")
    host.mirrorfs("hand-back", "vm1")
    assert again.wait(60) == 0
    assert wait_served(host)["top"] == str(workdir / "b" / base.name)
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")


def test_an_evacuation_that_died_once_hydrated_is_taken_back_onto_its_destination(workdir, host):
    """An evacuation killed (-9) after it hydrated, before its hand-back: its saved map says the
    destination holds everything, so the host takes the disk back onto the destination alone (not
    stranded, and never onto the source, which lacks the writes made since the switch)."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    writer.wait_sent(30)
    m = host.background("m", "start", "vm1", "--switch-first", "--dest-dir", workdir / "b",
                        "--state-dir", workdir / "state")
    wait_until(lambda: json.loads(host.mirrorfs("status", "vm1", "--json").stdout)["phase"]
               == "hydrated", "hydrated")
    writer.wait_sent(writer.sent + 30)
    kids = m.children(recursive=True)
    m.kill()
    psutil.wait_procs([m, *kids], timeout=30)
    served = wait_until(lambda: host.disks()["vm1"]["phase"] == "exporting" and host.disks()["vm1"],
                        "taken back", timeout=30)
    assert served["top"] == str(workdir / "b" / base.name)
    assert host.record("vm1")["chain"] == [{"path": str(workdir / "b" / base.name), "format": "qcow2"}]
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    check_base_data(sock, writer)
    check_every_chain(workdir / "a", workdir / "b")


def test_a_switch_recorded_but_not_made_is_undone_by_the_resume(workdir):
    """The record is written inside the switch's hold, just before the state: a crash between the
    two leaves the record saying destination while the state still mirrors. The resume, which
    reads the source again, makes the record say source before it serves (the crash is simulated
    by recording the switch while the migration is dead)."""
    from mirrorfs.host.registry import Registry
    host = Host(workdir, take_back_after=600).start()
    try:
        base, sock = named_disk(host, workdir, "qcow2")
        argv = ("start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state")
        first = host.background("m1", *argv)
        qemu_io(uri(sock), "write -P 0x77 0 1M")
        loan = host.record("vm1")["lent"]
        kids = first.children(recursive=True)
        first.kill()
        psutil.wait_procs([first, *kids], timeout=30)
        Registry(host.registry).switched("vm1", loan["migration"])
        assert host.record("vm1")["lent"]["serving"] == "destination"
        host.background("m2", *argv)
        record = host.record("vm1")
        assert record["lent"]["serving"] == "source" and record["lent"]["migration"] == loan["migration"]
        assert record["chain"][0]["path"] == str(workdir / "a" / "vm1-snap.qcow2")
        qemu_io(uri(sock), "read -P 0x77 0 1M")
        host.mirrorfs("copy", "vm1")
        host.mirrorfs("pivot", "vm1")
        host.mirrorfs("hand-back", "vm1")
        qemu_io(uri(sock), "read -P 0x77 0 1M")
    finally:
        host.close()


def test_hand_back_waits_for_the_host_service(workdir, host):
    """hand-back while the service is down is refused before the migration stops serving (the
    writer goes on); once the service runs again, the same command hands the disk back."""
    base, sock = named_disk(host, workdir, "qcow2")
    writer = ReconnectingWriter(sock)
    m = host.background("m", "start", "vm1", "--dest-dir", workdir / "b", "--state-dir", workdir / "state")
    host.mirrorfs("cancel", "vm1")
    host.kill(signal.SIGKILL)
    res = host.mirrorfs("hand-back", "vm1", check=False)
    assert res.returncode == EXIT_ERROR and "no host service" in res.stderr, res.stderr
    assert m.poll() is None
    writer.wait_sent(writer.sent + 30)          # still served by the migration
    host.start()
    host.mirrorfs("hand-back", "vm1")
    assert m.wait(60) == 0
    writer.wait_sent(writer.sent + 30)
    writer.stop()
    writer.check(uri(sock))
    assert wait_served(host)["top"] == str(workdir / "a" / "vm1-snap.qcow2")


@pytest.mark.ceph
def test_reboot_after_an_evacuation_to_ceph(ceph_cluster, workdir, host):
    """start vm1 --switch-first --dest-dir rbd:POOL: the disk moves into a new RBD image of the
    session's cluster; after the hand-back the record's chain is that image (raw), and a reboot
    serves it with every write."""
    (workdir / "a").mkdir()
    name = f"nm-{workdir.name}"                 # the session's cluster is shared: a name of our own
    base = make_base(workdir / "a" / f"{name}.qcow2", SIZE)
    sock = workdir / "vm1.sock"
    host.mirrorfs("add", "vm1", base, "--socket", sock)
    writer = ReconnectingWriter(sock)
    pool = f"rbd:rbd:conf={ceph_cluster.conf}"
    image = f"rbd:rbd/{name}:conf={ceph_cluster.conf}"
    try:
        host.background("m", "start", "vm1", "--switch-first", "--dest-dir", pool,
                        "--state-dir", workdir / "state")
        assert host.record("vm1")["lent"]["destination"] == [{"path": image, "format": "raw"}]
        wait_until(lambda: json.loads(host.mirrorfs("status", "vm1", "--json").stdout)["phase"]
                   == "hydrated", "hydrated")
        writer.wait_sent(writer.sent + 30)
        host.mirrorfs("hand-back", "vm1")
        assert host.record("vm1")["chain"] == [{"path": image, "format": "raw"}]
        host.reboot()
        assert wait_served(host)["top"] == image
        writer.wait_sent(writer.sent + 30)
        writer.stop()
        writer.check(uri(sock))
        check_base_data(sock, writer)
        check_every_chain(workdir / "a")
    finally:
        host.close()
        ceph_cluster.rbd("rm", "--no-progress", f"rbd/{name}")
