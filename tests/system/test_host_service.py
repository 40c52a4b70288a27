"""The host service (`mirrorfs host`) with real processes: named disks added, served and removed; a
reconnecting writer across the service's SIGTERM and kill -9 and across a "reboot"; two `add`s
racing; a damaged record; an image of another disk; a borrower that dies."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading

import psutil
import pytest

from lib.commands import EXIT_ERROR, run
from lib.images import MiB, make_base, make_overlay, qemu_io
from lib.processes import still_running
from lib.reconnecting import ReconnectingWriter
from lib.waits import wait_until
from mirrorfs.common import jsonlines
from mirrorfs.host.registry import Registry


def _uri(socket):
    return f"nbd+unix:///?socket={socket}"


def _disk(workdir, name, fmt="qcow2"):
    """A chain top.qcow2 <- base.FMT with the base's pattern (lib.images.make_base)."""
    base = make_base(workdir / f"{name}-base.{fmt}", size=16 * MiB, fmt=fmt)
    return make_overlay(workdir / f"{name}.qcow2", base, backing_fmt=fmt), base


def test_add_serve_list_remove(workdir, host_service):
    host = host_service.start()
    top, base = _disk(workdir, "vm1", fmt="raw")
    raw = make_base(workdir / "vm2.raw", size=16 * MiB, fmt="raw")
    s1, s2 = host.add("vm1", top), host.add("vm2", raw)
    qemu_io(_uri(s1), "write -P 0xab 1M 64k", "read -P 0x10 0 64k")
    qemu_io(_uri(s2), "write -P 0xcd 0 64k")
    disks = host.list()
    assert disks["vm1"]["phase"] == "exporting" and disks["vm1"]["socket"] == str(s1)
    assert disks["vm1"]["top"] == str(top)
    assert disks["vm1"]["chain"] == [{"path": str(top), "format": "qcow2"},
                                     {"path": str(base), "format": "raw"}]
    assert oct(s1.stat().st_mode & 0o777) == "0o600"
    status = jsonlines.call(host.run_dir / "host.ctl", {"cmd": "status", "disk": "vm1"})["disk"]
    assert status["phase"] == "exporting" and status["history"][0]["event"] == "added"
    assert status["retired"] == [] and len(status["id"]) == 16
    with pytest.raises(jsonlines.ControlError, match="unknown command 'pivot': this is the mirrorfs host"):
        jsonlines.call(host.run_dir / "host.ctl", {"cmd": "pivot"})
    daemon = psutil.Process(disks["vm2"]["pid"])
    host.cli("remove", "vm2")
    assert not still_running([daemon], timeout=30)
    assert not s2.exists() and set(host.list()) == {"vm1"}
    qemu_io(raw, "read -P 0xcd 0 64k", fmt="raw")           # flushed and closed
    res = host.cli("remove", "vm2", check=False)
    assert res.returncode == EXIT_ERROR and "no disk named vm2" in res.stderr


def test_an_image_of_another_disk_is_refused(workdir, host_service):
    host = host_service.start()
    top, base = _disk(workdir, "vm1")
    host.add("vm1", top)
    for image in (top, base):
        res = host.cli("add", "vm2", image, "--socket", workdir / "vm2.sock", check=False)
        assert res.returncode == EXIT_ERROR
        assert f"belongs to the disk vm1 (chain {top} <- {base})" in res.stderr, res.stderr
        assert res.stderr.count("\n") == 1
    assert not (workdir / "vm2.sock").exists() and set(host.list()) == {"vm1"}


def test_a_writer_sees_nothing_of_the_service_restarting(workdir, host_service):
    """SIGTERM, then kill -9 of the service under a reconnecting writer: no error, every
    acknowledged write on the disk, and the very same daemon serving throughout (adopted)."""
    host = host_service.start()
    top, _ = _disk(workdir, "vm1")
    socket = host.add("vm1", top)
    pid = host.list()["vm1"]["pid"]
    writer = ReconnectingWriter(socket, blocks=600, spacing=0.005)
    for i, sig in enumerate((signal.SIGTERM, signal.SIGKILL)):
        writer.wait_sent(100 * (i + 1))
        host.kill(sig)
        writer.wait_sent(100 * (i + 1) + 50)         # served by the daemon while no service runs
        host.start()
        assert host.list()["vm1"]["pid"] == pid
        assert "exporting" in host.out.read_text() or "1 exporting" in host.stderr
    writer.wait_sent(400)
    writer.stop()
    host.close()
    writer.check(top, fmt="qcow2")


def test_a_reboot_serves_every_disk_on_its_records_chain(workdir, host_service):
    """Every process killed (the service and its daemons, -9), then only the service started: every
    disk is served again, on the chain its record names now (here one changed while all was down,
    as a migration's switch and hand-back would), with every acknowledged write."""
    host = host_service.start()
    tops = {}
    for name in ("vm1", "vm2", "vm3"):
        tops[name], _ = _disk(workdir, name, fmt="raw" if name == "vm2" else "qcow2")
    host.add("vm1", tops["vm1"])
    (workdir / "run-vms").mkdir()           # a directory a reboot empties, as /run
    host.add("vm2", tops["vm2"], workdir / "run-vms" / "vm2.sock")
    host.add("vm3", tops["vm3"])
    writer = ReconnectingWriter(workdir / "vm1.sock", blocks=400, spacing=0.005)
    writer.wait_sent(100)
    qemu_io(_uri(workdir / "vm3.sock"), "write -P 0x33 0 1M")
    daemons = host.daemons()
    assert len(daemons) == 3
    host.kill(signal.SIGKILL)
    for p in daemons:
        p.kill()
    assert not still_running(daemons, timeout=30)
    shutil.rmtree(workdir / "run-vms")
    # While nothing runs, vm3 moves: its record now names a copy of its chain elsewhere.
    (workdir / "b").mkdir()
    moved = workdir / "b" / "vm3.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", tops["vm3"], moved)
    registry = Registry(host.registry)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old = registry.get("vm3")["chain"]
        new = [{"path": str(moved), "format": "qcow2"}]
        registry.lend("vm3", migration="m1", pid=sleeper.pid, control=None, state_dir=None,
                      source=old, destination=new)
        registry.switched("vm3", "m1")
        registry.returned("vm3", "m1", new)
    finally:
        sleeper.kill()
        sleeper.wait()
    host.start()
    disks = host.list()
    assert {n: d["phase"] for n, d in disks.items()} == dict.fromkeys(tops, "exporting")
    assert disks["vm3"]["top"] == str(moved)
    qemu_io(_uri(workdir / "run-vms" / "vm2.sock"), "read -P 0x10 0 64k")
    assert {p.pid for p in host.daemons()}.isdisjoint({p.pid for p in daemons})
    writer.wait_sent(200)
    writer.stop()
    qemu_io(_uri(workdir / "vm3.sock"), "read -P 0x33 0 1M", "write -P 0x34 1M 1M")
    host.close()
    writer.check(tops["vm1"], fmt="qcow2")
    qemu_io(moved, "read -P 0x33 0 1M", "read -P 0x34 1M 1M", fmt="qcow2")
    qemu_io(tops["vm3"], "read -P 0x33 0 1M", "read -P 0 1M 1M", fmt="qcow2")   # the old chain: untouched


def test_two_adds_race_for_one_name_and_one_socket(workdir, host_service):
    host = host_service.start()
    images = [make_base(workdir / f"i{i}.raw", size=MiB, fmt="raw") for i in range(4)]

    def add_all(argvs):
        results = [None] * len(argvs)

        def one(i):
            results[i] = host.cli(*argvs[i], check=False)
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(argvs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    same_name = add_all([("add", "vm1", images[i], "--socket", workdir / f"s{i}.sock") for i in (0, 1)])
    assert sorted(r.returncode for r in same_name) == [0, EXIT_ERROR], [r.stderr for r in same_name]
    same_socket = add_all([("add", f"vm{i}", images[i], "--socket", workdir / "t.sock") for i in (2, 3)])
    assert sorted(r.returncode for r in same_socket) == [0, EXIT_ERROR], [r.stderr for r in same_socket]
    disks = host.list()
    assert len(disks) == 2 and all(d["phase"] == "exporting" for d in disks.values())
    assert len(host.daemons()) == 2
    # The loser left no socket behind: exactly one of s0/s1 exists.
    assert sum((workdir / f"s{i}.sock").exists() for i in (0, 1)) == 1


def test_a_damaged_record_is_reported_and_the_others_served(workdir, host_service):
    host = host_service.start()
    for name in ("vm1", "vm2", "vm3"):
        host.add(name, _disk(workdir, name)[0])
    host.kill(signal.SIGTERM)
    record = host.registry / "vm2.json"
    record.write_text(record.read_text().replace('"generation": 1', '"generation": 7'))
    host.start()
    disks = host.list()
    assert disks["vm1"]["phase"] == disks["vm3"]["phase"] == "exporting"
    assert disks["vm2"]["phase"] == "failed"
    assert f"{record}: corrupt record (checksum mismatch)" in disks["vm2"]["error"]
    assert f"{record}: corrupt record (checksum mismatch)" in host.stderr
    # Its daemon, adopted by nobody, is left alone: the socket still answers with the old data.
    qemu_io(_uri(workdir / "vm1.sock"), "read -P 0x10 0 64k")


BORROWER = """
import os, sys, time
from mirrorfs.host import hostctl
from mirrorfs.host.rundir import RunDir
source, destination = eval(sys.argv[3]), eval(sys.argv[4])
listener, reply = hostctl.borrow(RunDir(sys.argv[1], create=False), sys.argv[2], pid=os.getpid(),
                                 migration="m1", control=None, state_dir=None, source=source,
                                 destination=destination, evacuation=sys.argv[5] == "1")
if sys.argv[5] == "1":
    from mirrorfs.host.registry import Registry
    Registry(os.environ["MIRRORFS_REGISTRY"]).switched(sys.argv[2], "m1")
print("borrowed", reply["record"]["lent"]["migration"], flush=True)
time.sleep(600)
"""


@pytest.fixture
def borrowers():
    """Fake migrations started by a test (_borrow), killed at its end whatever happened."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _borrow(borrowers, host, name, source, destination, evacuation=False):
    """A fake migration that borrows the disk and then does nothing until it is killed."""
    proc = subprocess.Popen([sys.executable, "-c", BORROWER, str(host.run_dir), name, repr(source),
                             repr(destination), "1" if evacuation else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=host.env())
    borrowers.append(proc)
    line = proc.stdout.readline()
    assert line.startswith("borrowed m1"), proc.stderr.read() if proc.poll() is not None else line
    return proc


def test_a_dead_borrower_is_taken_back(workdir, host_service, borrowers):
    """The borrower is killed (-9) while a reconnecting writer waits: after --take-back-after the
    host serves the chain the record says (the source's new overlay), and the writer goes on."""
    host = host_service.start()
    top, base = _disk(workdir, "vm1")
    socket = host.add("vm1", top)
    writer = ReconnectingWriter(socket, blocks=300, spacing=0.005)
    writer.wait_sent(50)
    overlay = make_overlay(workdir / "vm1-snap.qcow2", top)
    (workdir / "b").mkdir()
    dest = make_overlay(workdir / "b" / "vm1-snap.qcow2", base)
    source = [{"path": str(overlay), "format": "qcow2"}, {"path": str(top), "format": "qcow2"},
              {"path": str(base), "format": "qcow2"}]
    destination = [{"path": str(dest), "format": "qcow2"}, {"path": str(base), "format": "qcow2"}]
    borrower = _borrow(borrowers, host, "vm1", source, destination)
    disks = host.list()
    assert disks["vm1"]["phase"] == "lent" and disks["vm1"]["pid"] is None
    assert disks["vm1"]["lent"]["pid"] == borrower.pid and disks["vm1"]["lent"]["alive"]
    # A second borrower is refused while the first lives.
    res = run(sys.executable, "-c", BORROWER, host.run_dir, "vm1", repr(source), repr(destination), "0",
              check=False, env=host.env())
    assert "lent to migration m1" in res.stderr, res.stderr
    borrower.kill()
    borrower.wait()
    wait_until(lambda: host.list()["vm1"]["phase"] == "exporting", "taken back", timeout=60)
    disks = host.list()
    assert disks["vm1"]["top"] == str(overlay) and disks["vm1"]["lent"] is None
    record = Registry(host.registry).get("vm1")
    assert record["history"][-1]["event"] == "taken-back"
    assert str(dest) in {r["path"] for r in record["retired"]}
    writer.wait_sent(200)
    writer.stop()
    host.close()
    writer.check(overlay, fmt="qcow2")


def test_a_dead_evacuation_serving_its_destination_is_left_to_resume(workdir, host_service, borrowers):
    host = host_service.start()
    top, base = _disk(workdir, "vm1")
    host.add("vm1", top)
    (workdir / "b").mkdir()
    dest = workdir / "b" / "vm1.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", dest, str(16 * MiB))
    borrower = _borrow(borrowers, host, "vm1", [{"path": str(top), "format": "qcow2"},
                                     {"path": str(base), "format": "qcow2"}],
                       [{"path": str(dest), "format": "qcow2"}], evacuation=True)
    borrower.kill()
    borrower.wait()
    disk = wait_until(lambda: host.list()["vm1"]["phase"] == "stranded" and host.list()["vm1"],
                      "left stranded", timeout=60)
    assert "resume it" in disk["error"] and disk["pid"] is None
    assert json.loads(host.cli("list", "--json").stdout)[0]["lent"]["migration"] == "m1"
    assert host.daemons() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM])
def test_shutdown_stops_every_disk(workdir, host_service, sig):
    host = host_service.start()
    host.add("vm1", _disk(workdir, "vm1")[0])
    assert len(host.daemons()) == 1
    host.cli("shutdown")
    assert host.proc.wait(60) == 0
    assert not still_running(host.daemons(), timeout=30) and not (workdir / "vm1.sock").exists()


GIVER = """
import os, sys
from mirrorfs.host import hostctl
from mirrorfs.host.rundir import RunDir
source, destination = eval(sys.argv[3]), eval(sys.argv[4])
listener, reply = hostctl.borrow(RunDir(sys.argv[1], create=False), sys.argv[2], pid=os.getpid(),
                                 migration="m1", control=None, state_dir=None, source=source,
                                 destination=destination)
print("borrowed", flush=True)
sys.stdin.readline()
reply = hostctl.give_back(RunDir(sys.argv[1], create=False), sys.argv[2], migration="m1", chain=source)
print("given", reply["serving"], flush=True)
"""


def test_a_loan_outlives_the_service(workdir, host_service, borrowers):
    """The service is killed (-9) while the disk is lent; the next one finds the borrower alive,
    takes its copy of the socket back from it, and serves the chain the borrower gives back."""
    host = host_service.start()
    top, base = _disk(workdir, "vm1")
    socket = host.add("vm1", top)
    writer = ReconnectingWriter(socket, blocks=300, spacing=0.005)
    writer.wait_sent(50)
    (workdir / "b").mkdir()
    dest = make_overlay(workdir / "b" / "vm1-snap.qcow2", base)
    source = [{"path": str(top), "format": "qcow2"}, {"path": str(base), "format": "qcow2"}]
    giver = subprocess.Popen([sys.executable, "-c", GIVER, str(host.run_dir), "vm1", repr(source),
                              repr([{"path": str(dest), "format": "qcow2"}])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=host.env())
    borrowers.append(giver)
    assert giver.stdout.readline().startswith("borrowed")
    host.kill(signal.SIGKILL)
    host.start()
    disk = host.list()["vm1"]
    assert disk["phase"] == "lent" and disk["lent"]["alive"] and disk["lent"]["pid"] == giver.pid
    giver.stdin.write("give-back\n")
    giver.stdin.flush()
    assert giver.stdout.readline().split() == ["given", str(top)]
    assert giver.wait(30) == 0
    disk = host.list()["vm1"]
    assert disk["phase"] == "exporting" and disk["lent"] is None and disk["top"] == str(top)
    writer.wait_sent(150)
    writer.stop()
    host.close()
    writer.check(top, fmt="qcow2")
    record = Registry(host.registry).get("vm1")
    assert [e["event"] for e in record["history"]] == ["added", "lent", "handed-back"]
    assert {r["path"] for r in record["retired"]} == {str(dest)}


@pytest.mark.slow
@pytest.mark.serial           # 300 storage daemons: not beside the parallel pass's tests
def test_300_disks_and_a_kill_9_under_a_writer(workdir, host_service):
    """The issue's host: 300 named disks registered; the service killed -9 under a reconnecting
    writer and started again adopts every daemon (same pids), and the writer sees no error."""
    registry = Registry(host_service.registry)
    (workdir / "img").mkdir()
    for i in range(300):
        image = workdir / "img" / f"d{i}.raw"
        with open(image, "wb") as f:
            f.truncate(4 * MiB)
        registry.add(f"d{i}", image, workdir / "img" / f"d{i}.sock")
    host = host_service.start(timeout=300)
    disks = host.list()
    assert len(disks) == 300 and {d["phase"] for d in disks.values()} == {"exporting"}
    pids = {d["pid"] for d in disks.values()}
    writer = ReconnectingWriter(workdir / "img" / "d7.sock", blocks=250, spacing=0.005)
    writer.wait_sent(50)
    host.kill(signal.SIGKILL)
    writer.wait_sent(100)
    host.start(timeout=300)
    assert {d["pid"] for d in host.list().values()} == pids
    writer.wait_sent(200)
    writer.stop()
    host.close()
    writer.check(workdir / "img" / "d7.raw")


def test_ready_once_every_disk_is_served(workdir, host_service):
    """systemd's READY=1 (Type=notify) comes once every disk is served: a unit ordered after the
    service finds every socket answering."""
    registry = Registry(host_service.registry)
    for name in ("vm1", "vm2"):
        registry.add(name, _disk(workdir, name)[0], workdir / f"{name}.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(workdir / "notify"))
    notify.settimeout(120)
    with notify:
        host_service.start(env={"NOTIFY_SOCKET": str(workdir / "notify")})
        message = notify.recv(4096).decode()
        assert "READY=1" in message and "2 exporting" in message, message
    for name in ("vm1", "vm2"):
        qemu_io(_uri(workdir / f"{name}.sock"), "read -P 0x10 0 64k")
